use ascii::AsciiString;

use std::io::Error as IoError;
use std::io::Result as IoResult;
use std::io::{BufReader, BufWriter, ErrorKind, Read};

use std::net::SocketAddr;
use std::str::FromStr;

use crate::common::{HTTPVersion, Method};
use crate::limits::{rejection_bytes, ConnectionLimits, Rejection};
use std::io::Write;
use std::sync::Arc;
use std::time::Instant;
use crate::util::RefinedTcpStream;
use crate::util::{SequentialReader, SequentialReaderBuilder, SequentialWriterBuilder};
use crate::Request;

/// A ClientConnection is an object that will store a socket to a client
/// and return Request objects.
pub struct ClientConnection {
    // address of the client
    remote_addr: IoResult<Option<SocketAddr>>,

    // chatd patch: the connection's socket, for Request::connection_fd.
    #[cfg(unix)]
    raw_fd: Option<std::os::unix::io::RawFd>,

    // sequence of Readers to the stream, so that the data is not read in
    //  the wrong order
    source: SequentialReaderBuilder<BufReader<RefinedTcpStream>>,

    // sequence of Writers to the stream, to avoid writing response #2 before
    //  response #1
    sink: SequentialWriterBuilder<BufWriter<RefinedTcpStream>>,

    // Reader to read the next header from
    next_header_source: SequentialReader<BufReader<RefinedTcpStream>>,

    // set to true if we know that the previous request is the last one
    no_more_requests: bool,

    // true if the connection goes through SSL
    secure: bool,

    // chatd patch: head size and time limits.
    limits: Arc<ConnectionLimits>,
}

/// Error that can happen when reading a request.
#[derive(Debug)]
enum ReadError {
    WrongRequestLine,
    WrongHeader(HTTPVersion),
    /// the client sent an unrecognized `Expect` header
    ExpectationFailed(HTTPVersion),
    ReadIoError(IoError),
    /// chatd patch: the request line and headers are over the size limit.
    HeadTooLarge,
    /// chatd patch: the head was started but not finished in time (or the socket timed out).
    HeadTimeout { started: bool },
    /// chatd patch: the head is not ASCII, or the connection ended in its middle.
    BadHead(&'static str),
}

/// chatd patch: why a head line could not be read.
enum LineError {
    Io(IoError),
    TooLarge,
    TimedOut,
}

impl ClientConnection {
    /// Creates a new `ClientConnection` that takes ownership of the `TcpStream`.
    pub fn new(
        write_socket: RefinedTcpStream,
        mut read_socket: RefinedTcpStream,
    ) -> ClientConnection {
        let remote_addr = read_socket.peer_addr();
        // The write half: it lives as long as a request's writer does, while the read half is
        // shut down and closed as soon as tiny_http expects no further request.
        #[cfg(unix)]
        let raw_fd = write_socket.raw_fd();
        let secure = read_socket.secure();

        let mut source = SequentialReaderBuilder::new(BufReader::with_capacity(1024, read_socket));
        let first_header = source.next().unwrap();

        ClientConnection {
            source,
            sink: SequentialWriterBuilder::new(BufWriter::with_capacity(1024, write_socket)),
            remote_addr,
            #[cfg(unix)]
            raw_fd,
            next_header_source: first_header,
            no_more_requests: false,
            secure,
            limits: ConnectionLimits::unlimited(),
        }
    }

    /// chatd patch: applies head size and time limits to this connection's requests.
    pub fn with_limits(mut self, limits: Arc<ConnectionLimits>) -> Self {
        self.limits = limits;
        self
    }

    /// true if the connection is HTTPS
    pub fn secure(&self) -> bool {
        self.secure
    }

    /// Reads the next line from self.next_header_source.
    ///
    /// Reads until `CRLF` is reached. The next read will start
    ///  at the first byte of the new line.
    /// chatd patch: at most `budget` bytes (shared by the whole head), and until `deadline`,
    /// which is set when the head's first byte arrives.
    fn read_next_line(
        &mut self,
        budget: &mut usize,
        deadline: &mut Option<Instant>,
    ) -> Result<AsciiString, LineError> {
        let mut buf = Vec::new();
        let mut prev_byte_was_cr = false;

        loop {
            let byte = self.next_header_source.by_ref().bytes().next();

            let byte = match byte {
                Some(Ok(b)) => b,
                Some(Err(e)) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(LineError::TimedOut)
                }
                Some(Err(e)) => return Err(LineError::Io(e)),
                None => {
                    return Err(LineError::Io(IoError::new(
                        ErrorKind::ConnectionAborted,
                        "Unexpected EOF",
                    )))
                }
            };
            match deadline {
                Some(d) if Instant::now() > *d => return Err(LineError::TimedOut),
                Some(_) => {}
                None => *deadline = self.limits.idle_timeout().map(|t| Instant::now() + t),
            }
            if *budget == 0 {
                return Err(LineError::TooLarge);
            }
            *budget -= 1;

            if byte == b'\n' && prev_byte_was_cr {
                buf.pop(); // removing the '\r'
                return AsciiString::from_ascii(buf).map_err(|_| {
                    LineError::Io(IoError::new(ErrorKind::InvalidInput, "Header is not in ASCII"))
                });
            }

            prev_byte_was_cr = byte == b'\r';

            buf.push(byte);
        }
    }

    /// chatd patch: `read_next_line` with its errors as `ReadError`s.
    fn read_line(
        &mut self,
        budget: &mut usize,
        deadline: &mut Option<Instant>,
    ) -> Result<AsciiString, ReadError> {
        self.read_next_line(budget, deadline).map_err(|e| match e {
            LineError::Io(e) if e.kind() == ErrorKind::InvalidInput => {
                ReadError::BadHead("The request line and headers must be ASCII.")
            }
            LineError::Io(_) if deadline.is_some() => {
                ReadError::BadHead("The connection ended inside the request's headers (lines end with CRLF).")
            }
            LineError::Io(e) => ReadError::ReadIoError(e),
            LineError::TooLarge => ReadError::HeadTooLarge,
            LineError::TimedOut => ReadError::HeadTimeout {
                started: deadline.is_some(),
            },
        })
    }

    /// chatd patch: answers an error tiny_http detects itself (with the program's body), and
    /// closes.
    fn reject(&mut self, rejection: Rejection) -> Option<Request> {
        self.limits.count_rejected_head();
        let mut writer = self.sink.next().unwrap();
        let _ = writer.write_all(&rejection_bytes(&self.limits, rejection));
        let _ = writer.flush();
        None
    }

    /// Reads a request from the stream.
    /// Blocks until the header has been read.
    fn read(&mut self) -> Result<Request, ReadError> {
        let mut budget = self.limits.max_head_bytes.load(std::sync::atomic::Ordering::Relaxed);
        let mut deadline = None;
        let (method, path, version, headers) = {
            // reading the request line
            let (method, path, version) = {
                let line = self.read_line(&mut budget, &mut deadline)?;

                parse_request_line(
                    line.as_str().trim(), // TODO: remove this conversion
                )?
            };

            // getting all headers
            let headers = {
                let mut headers = Vec::new();
                loop {
                    let line = self.read_line(&mut budget, &mut deadline)?;

                    if line.is_empty() {
                        break;
                    };
                    headers.push(match FromStr::from_str(line.as_str().trim()) {
                        // TODO: remove this conversion
                        Ok(h) => h,
                        _ => return Err(ReadError::WrongHeader(version)),
                    });
                }

                headers
            };

            (method, path, version, headers)
        };

        // building the writer for the request
        let writer = self.sink.next().unwrap();

        // follow-up for next potential request
        let mut data_source = self.source.next().unwrap();
        std::mem::swap(&mut self.next_header_source, &mut data_source);

        // building the next reader
        let request = crate::request::new_request(
            self.secure,
            method,
            path,
            version.clone(),
            headers,
            *self.remote_addr.as_ref().unwrap(),
            data_source,
            writer,
        )
        .map_err(|e| {
            use crate::request;
            match e {
                request::RequestCreationError::CreationIoError(e)
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    ReadError::HeadTimeout { started: true }
                }
                request::RequestCreationError::CreationIoError(e) => ReadError::ReadIoError(e),
                request::RequestCreationError::BodyTruncated => ReadError::BadHead(
                    "The request body ended before its declared Content-Length.",
                ),
                request::RequestCreationError::ExpectationFailed => {
                    ReadError::ExpectationFailed(version)
                }
            }
        })?;
        #[cfg(unix)]
        let request = request.with_connection_fd(self.raw_fd);

        // return the request
        Ok(request)
    }
}

impl Iterator for ClientConnection {
    type Item = Request;

    /// Blocks until the next Request is available.
    /// Returns None when no new Requests will come from the client.
    fn next(&mut self) -> Option<Request> {
        use crate::{Response, StatusCode};

        // the client sent a "connection: close" header in this previous request
        //  or is using HTTP 1.0, meaning that no new request will come
        if self.no_more_requests {
            return None;
        }

        loop {
            let rq = match self.read() {
                // chatd patch: the head limits, and errors answered with the program's body.
                // After any of these we don't know where the next request would start, so the
                // connection closes.
                Err(ReadError::WrongRequestLine) => return self.reject(Rejection::BadRequestLine),
                Err(ReadError::WrongHeader(_)) => return self.reject(Rejection::BadHeader),
                Err(ReadError::BadHead(message)) => return self.reject(Rejection::BadRequest(message)),
                Err(ReadError::HeadTooLarge) => return self.reject(Rejection::HeadTooLarge),
                Err(ReadError::HeadTimeout { started: true }) => return self.reject(Rejection::HeadTimeout),
                // An idle keep-alive connection: close it quietly.
                Err(ReadError::HeadTimeout { started: false }) => return None,
                Err(ReadError::ExpectationFailed(_)) => return self.reject(Rejection::ExpectationFailed),

                Err(ReadError::ReadIoError(_)) => return None,

                Ok(rq) => rq,
            };

            // checking HTTP version
            if *rq.http_version() > (1, 1) {
                return self.reject(Rejection::HttpVersionNotSupported);
            }

            // updating the status of the connection
            let connection_header = rq
                .headers()
                .iter()
                .find(|h| h.field.equiv("Connection"))
                .map(|h| h.value.as_str());

            let lowercase = connection_header.map(|h| h.to_ascii_lowercase());

            match lowercase {
                Some(ref val) if val.contains("close") => self.no_more_requests = true,
                Some(ref val) if val.contains("upgrade") => self.no_more_requests = true,
                Some(ref val)
                    if !val.contains("keep-alive") && *rq.http_version() == HTTPVersion(1, 0) =>
                {
                    self.no_more_requests = true
                }
                None if *rq.http_version() == HTTPVersion(1, 0) => self.no_more_requests = true,
                _ => (),
            };

            // returning the request
            return Some(rq);
        }
    }
}

/// Parses a "HTTP/1.1" string.
fn parse_http_version(version: &str) -> Result<HTTPVersion, ReadError> {
    let (major, minor) = match version {
        "HTTP/0.9" => (0, 9),
        "HTTP/1.0" => (1, 0),
        "HTTP/1.1" => (1, 1),
        "HTTP/2.0" => (2, 0),
        "HTTP/3.0" => (3, 0),
        _ => return Err(ReadError::WrongRequestLine),
    };

    Ok(HTTPVersion(major, minor))
}

/// Parses the request line of the request.
/// eg. GET / HTTP/1.1
fn parse_request_line(line: &str) -> Result<(Method, String, HTTPVersion), ReadError> {
    let mut parts = line.split(' ');

    let method = parts.next().and_then(|w| w.parse().ok());
    let path = parts.next().map(ToOwned::to_owned);
    let version = parts.next().and_then(|w| parse_http_version(w).ok());

    method
        .and_then(|method| Some((method, path?, version?)))
        .ok_or(ReadError::WrongRequestLine)
}

#[cfg(test)]
mod test {
    #[test]
    fn test_parse_request_line() {
        let (method, path, ver) = super::parse_request_line("GET /hello HTTP/1.1").unwrap();

        assert!(method == crate::Method::Get);
        assert!(path == "/hello");
        assert!(ver == crate::common::HTTPVersion(1, 1));

        assert!(super::parse_request_line("GET /hello").is_err());
        assert!(super::parse_request_line("qsd qsd qsd").is_err());
    }
}
