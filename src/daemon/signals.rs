//! Signals as messages: SIGTERM, SIGINT and SIGHUP are blocked in every thread and taken one
//! at a time with sigwait, so handling them is ordinary code rather than a signal handler.

use std::mem::MaybeUninit;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM or SIGINT: drain and exit.
    Terminate,
    /// SIGHUP: reload the configuration.
    Reload,
}

fn set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set before sigaddset uses it.
    unsafe {
        let mut set = MaybeUninit::<libc::sigset_t>::uninit();
        libc::sigemptyset(set.as_mut_ptr());
        let mut set = set.assume_init();
        for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, signal);
        }
        set
    }
}

/// Blocks the signals in the calling thread and in every thread it starts afterwards: call it
/// first thing in `main`.
pub fn block() {
    let set = set();
    // SAFETY: changes only this thread's signal mask.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// Waits for the next signal.
pub fn wait() -> Signal {
    let set = set();
    loop {
        let mut signal: libc::c_int = 0;
        // SAFETY: `set` is initialised and `signal` is written by sigwait.
        if unsafe { libc::sigwait(&set, &mut signal) } == 0 {
            return if signal == libc::SIGHUP { Signal::Reload } else { Signal::Terminate };
        }
    }
}
