//! systemd's notify protocol: `KEY=VALUE` lines in one datagram to `$NOTIFY_SOCKET` (a path,
//! or an abstract socket name starting with `@`). Without the variable every call is a no-op.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
}

/// A socket to send from, and the address `NOTIFY_SOCKET` names.
fn target(path: &str) -> Option<(UnixDatagram, SocketAddr)> {
    let addr = match path.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(path),
    };
    match (UnixDatagram::unbound(), addr) {
        (Ok(socket), Ok(addr)) => Some((socket, addr)),
        (Err(e), _) | (_, Err(e)) => {
            log::warn!("NOTIFY_SOCKET={path} is unusable: {e}");
            None
        }
    }
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET` and `$WATCHDOG_USEC` (meant for this process when `$WATCHDOG_PID`
    /// is unset or is our pid).
    pub fn from_env() -> Self {
        let target = std::env::var("NOTIFY_SOCKET").ok().filter(|s| !s.is_empty()).and_then(|path| target(&path));
        let ours = std::env::var("WATCHDOG_PID").map_or(true, |pid| pid.trim() == std::process::id().to_string());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|&us| us > 0 && ours)
            .map(Duration::from_micros);
        Self { target, watchdog }
    }

    /// How often systemd wants `WATCHDOG=1`, if it does.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends one message, e.g. "READY=1\nSTATUS=serving". Failures are logged, never fatal.
    pub fn send(&self, message: &str) {
        if let Some((socket, addr)) = &self.target
            && let Err(e) = socket.send_to_addr(message.as_bytes(), addr)
        {
            log::warn!("sd_notify({}) failed: {e}", message.replace('\n', " "));
        }
    }

    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={status}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_a_path_socket() {
        let path = std::env::temp_dir().join(format!("chatd-notify-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier { target: target(path.to_str().unwrap()), watchdog: None };
        notifier.send("READY=1\nSTATUS=ready");
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=ready");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn messages_reach_an_abstract_socket() {
        let name = format!("chatd-notify-test-{}", std::process::id());
        let listener = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        // As systemd writes an abstract name in NOTIFY_SOCKET.
        let notifier = Notifier { target: target(&format!("@{name}")), watchdog: None };
        notifier.send("WATCHDOG=1");
        let mut buf = [0u8; 16];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");
    }
}
