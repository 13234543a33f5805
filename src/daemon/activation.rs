//! systemd socket activation: a listening socket passed as fd 3 with `$LISTEN_FDS` and
//! `$LISTEN_PID` (see sd_listen_fds(3)).

use std::net::TcpListener;
use std::os::fd::FromRawFd;

const FIRST_FD: i32 = 3;

/// The inherited listening socket, if systemd passed one to this process. The variables are
/// removed so that no child process takes them for its own.
///
/// Call it first thing in `main`: editing the environment is unsound once another thread
/// may read it.
pub fn inherited_listener() -> Result<Option<TcpListener>, String> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    // SAFETY: called first in `main`, before any other thread exists to read the environment.
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    let (Some(pid), Some(fds)) = (pid, fds) else { return Ok(None) };
    if pid.trim() != std::process::id().to_string() {
        return Ok(None);
    }
    let count: i32 = fds.trim().parse().map_err(|_| format!("LISTEN_FDS={fds:?} is not a number"))?;
    if count != 1 {
        return Err(format!(
            "systemd passed {count} sockets; chatd serves exactly one (one ListenStream= in chatd.socket)"
        ));
    }
    // SAFETY: fstat and getsockopt only inspect the descriptor systemd says it passed.
    let is_listening_stream = unsafe {
        let mut accepting: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        libc::getsockopt(FIRST_FD, libc::SOL_SOCKET, libc::SO_ACCEPTCONN, (&raw mut accepting).cast(), &mut len) == 0
            && accepting == 1
    };
    if !is_listening_stream {
        return Err("fd 3 from systemd is not a listening stream socket (ListenStream= in chatd.socket)".into());
    }
    // SAFETY: fd 3 is a listening socket handed to this process, owned by nothing else here.
    let listener = unsafe { TcpListener::from_raw_fd(FIRST_FD) };
    // SAFETY: marks our own descriptor close-on-exec.
    unsafe { libc::fcntl(FIRST_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(Some(listener))
}
