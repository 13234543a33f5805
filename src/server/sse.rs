//! Server-sent events written by hand: tiny_http's streaming `Response` buffers 8 KiB and never
//! flushes, so tokens would arrive in bursts. Here each event is one HTTP chunk, flushed at once.

use std::io::{self, Write};
use std::time::{Duration, Instant};

pub(crate) struct SseWriter {
    out: Box<dyn Write + Send>,
    /// HTTP/1.1 gets chunked encoding; HTTP/1.0 gets a body ended by closing the connection.
    chunked: bool,
    last_write: Instant,
}

impl SseWriter {
    /// Starts the stream; `headers` are more header lines, each ending in CRLF.
    pub fn start(request: tiny_http::Request, headers: &str) -> io::Result<Self> {
        let http11 = *request.http_version() >= tiny_http::HTTPVersion(1, 1);
        let mut out = request.into_writer();
        let framing = if http11 { "Transfer-Encoding: chunked\r\n" } else { "Connection: close\r\n" };
        let version = if http11 { "1.1" } else { "1.0" };
        write!(
            out,
            "HTTP/{version} 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nX-Accel-Buffering: no\r\n{headers}{framing}\r\n"
        )?;
        out.flush()?;
        Ok(Self { out, chunked: http11, last_write: Instant::now() })
    }

    /// Sends the comment line `: keep-alive` when nothing was written for `every`: clients
    /// ignore comments, proxies and idle timers see traffic.
    pub fn keep_alive(&mut self, every: Duration) -> io::Result<()> {
        if self.last_write.elapsed() < every {
            return Ok(());
        }
        self.write_framed(b": keep-alive\n\n")
    }

    /// Sends `data: <payload>\n\n` and flushes it to the client. An error means the client is gone.
    pub fn event(&mut self, payload: &str) -> io::Result<()> {
        let mut text = Vec::with_capacity("data: ".len() + payload.len() + 2);
        text.extend_from_slice(b"data: ");
        text.extend_from_slice(payload.as_bytes());
        text.extend_from_slice(b"\n\n");
        self.write_framed(&text)
    }

    /// Writes `text` as one HTTP chunk (or as it is, for HTTP/1.0) and flushes it.
    fn write_framed(&mut self, text: &[u8]) -> io::Result<()> {
        if self.chunked {
            write!(self.out, "{:x}\r\n", text.len())?;
        }
        self.out.write_all(text)?;
        if self.chunked {
            self.out.write_all(b"\r\n")?;
        }
        self.last_write = Instant::now();
        self.out.flush()
    }

    /// Sends `data: [DONE]` and ends the body.
    pub fn finish(mut self) -> io::Result<()> {
        self.event("[DONE]")?;
        if self.chunked {
            self.out.write_all(b"0\r\n\r\n")?;
        }
        self.out.flush()
    }
}
