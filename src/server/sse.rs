//! Server-sent events written by hand: tiny_http's streaming `Response` buffers 8 KiB and never
//! flushes, so tokens would arrive in bursts. Here each event is one HTTP chunk, flushed at once.

use std::io::{self, Write};

pub(crate) struct SseWriter {
    out: Box<dyn Write + Send>,
    /// HTTP/1.1 gets chunked encoding; HTTP/1.0 gets a body ended by closing the connection.
    chunked: bool,
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
        Ok(Self { out, chunked: http11 })
    }

    /// Sends `data: <payload>\n\n` and flushes it to the client. An error means the client is gone.
    pub fn event(&mut self, payload: &str) -> io::Result<()> {
        let body_len = "data: ".len() + payload.len() + 2;
        if self.chunked {
            write!(self.out, "{body_len:x}\r\n")?;
        }
        self.out.write_all(b"data: ")?;
        self.out.write_all(payload.as_bytes())?;
        self.out.write_all(b"\n\n")?;
        if self.chunked {
            self.out.write_all(b"\r\n")?;
        }
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
