//! What running under a service manager takes: systemd's notify protocol and watchdog,
//! socket activation, and signals. Only the daemon (src/main.rs) uses this; libchat does not.

pub mod activation;
pub mod notify;
pub mod signals;
