//! chatd patch: bounds on what one connection may cost, which tiny_http 0.12 does not have
//! (no timeouts, no header limit, one thread per connection without a cap).

use std::io::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
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
    rejection_body: OnceLock<RejectionBody>,
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
            rejection_body: OnceLock::new(),
        })
    }

    /// How the program writes the body of the answers tiny_http gives itself; set once.
    pub fn set_rejection_body(&self, body: RejectionBody) {
        let _ = self.rejection_body.set(body);
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

/// Why tiny_http answered a connection itself instead of handing a request to the program.
/// After any of these the connection is closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// More connections than `max_connections` are open.
    TooManyConnections,
    /// The request line is not valid HTTP.
    BadRequestLine,
    /// A header line is not valid HTTP.
    BadHeader,
    /// Another malformed request (a non-ASCII or cut-off head, a body shorter than its
    /// Content-Length); the text says which.
    BadRequest(&'static str),
    /// The request line and headers are over `max_head_bytes`.
    HeadTooLarge,
    /// The head did not arrive within `idle_timeout` of its first byte.
    HeadTimeout,
    /// An `Expect` other than `100-continue`.
    ExpectationFailed,
    /// An HTTP version above 1.1.
    HttpVersionNotSupported,
}

impl Rejection {
    pub fn status(self) -> u16 {
        match self {
            Self::TooManyConnections => 503,
            Self::BadRequestLine | Self::BadHeader | Self::BadRequest(_) => 400,
            Self::HeadTooLarge => 431,
            Self::HeadTimeout => 408,
            Self::ExpectationFailed => 417,
            Self::HttpVersionNotSupported => 505,
        }
    }
}

/// The Content-Type and body of the answer to a rejection, as the embedding program writes them.
pub type RejectionBody = fn(Rejection) -> (String, Vec<u8>);

/// The whole answer to a rejection: its status, the program's body (none unless it set
/// `ConnectionLimits::set_rejection_body`, as tiny_http itself answers), `Connection: close`.
pub(crate) fn rejection_bytes(limits: &ConnectionLimits, rejection: Rejection) -> Vec<u8> {
    let status = rejection.status();
    let reason = crate::StatusCode(status).default_reason_phrase();
    let (content_type, body) = limits.rejection_body.get().map(|write| write(rejection)).unwrap_or_default();
    let mut head = format!("HTTP/1.1 {status} {reason}\r\n");
    if !content_type.is_empty() {
        head += &format!("Content-Type: {content_type}\r\n");
    }
    head += &format!("Content-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(&body);
    bytes
}

/// Answers a connection over the limit with 503 and drops it.
pub(crate) fn refuse(limits: &ConnectionLimits, mut stream: impl Write) {
    let _ = stream.write_all(&rejection_bytes(limits, Rejection::TooManyConnections));
}
