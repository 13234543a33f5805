//! chatd patch: bounds on what one connection may cost, which tiny_http 0.12 does not have
//! (no timeouts, no header limit, one thread per connection without a cap).

use std::io::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Shared between the server and its connections; the embedding program may change the values
/// at run time (they apply to connections accepted afterwards).
#[derive(Debug)]
pub struct ConnectionLimits {
    /// Connections served at once; a connection beyond it gets 503 and is closed.
    pub max_connections: AtomicUsize,
    /// Socket read and write timeout, and the longest a request head may take, in milliseconds
    /// (0: none).
    pub idle_timeout_ms: AtomicU64,
    /// Largest request line plus headers, in bytes; larger heads get 431.
    pub max_head_bytes: AtomicUsize,
    open: AtomicUsize,
    refused: AtomicUsize,
    rejected_heads: AtomicUsize,
}

impl ConnectionLimits {
    pub fn new(max_connections: usize, idle_timeout: Duration, max_head_bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            max_connections: AtomicUsize::new(max_connections),
            idle_timeout_ms: AtomicU64::new(idle_timeout.as_millis() as u64),
            max_head_bytes: AtomicUsize::new(max_head_bytes),
            open: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
            rejected_heads: AtomicUsize::new(0),
        })
    }

    /// No limits: tiny_http's own behaviour.
    pub fn unlimited() -> Arc<Self> {
        Self::new(usize::MAX, Duration::ZERO, usize::MAX)
    }

    pub fn idle_timeout(&self) -> Option<Duration> {
        match self.idle_timeout_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// Connections being read now.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Connections refused so far for being over `max_connections`.
    pub fn refused_connections(&self) -> usize {
        self.refused.load(Ordering::Relaxed)
    }

    /// Requests answered by tiny_http itself (malformed, oversize or slow heads), never routed.
    pub fn rejected_heads(&self) -> usize {
        self.rejected_heads.load(Ordering::Relaxed)
    }

    pub(crate) fn count_rejected_head(&self) {
        self.rejected_heads.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes a place for a new connection, or counts a refusal.
    pub(crate) fn admit(self: &Arc<Self>) -> Option<OpenConnection> {
        let max = self.max_connections.load(Ordering::Relaxed);
        if self.open.fetch_add(1, Ordering::SeqCst) >= max {
            self.open.fetch_sub(1, Ordering::SeqCst);
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(OpenConnection(self.clone()))
    }
}

/// A connection's place; given back when dropped.
pub(crate) struct OpenConnection(Arc<ConnectionLimits>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An OpenAI-style JSON error response, written whole, for errors tiny_http answers itself.
pub(crate) fn error_bytes(status: u16, reason: &str, code: &str, message: &str) -> Vec<u8> {
    let body = format!(
        r#"{{"error":{{"message":"{message}","type":"invalid_request_error","param":null,"code":"{code}"}}}}"#
    );
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Answers a connection over the limit with 503 and drops it.
pub(crate) fn refuse(mut stream: impl Write) {
    let _ = stream.write_all(&error_bytes(
        503,
        "Service Unavailable",
        "too_many_connections",
        "The server has too many open connections; retry shortly.",
    ));
}
