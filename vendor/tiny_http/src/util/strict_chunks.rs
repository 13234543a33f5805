use std::io::{Error, ErrorKind, Read, Result as IoResult};

use chunked_transfer::Decoder;

/// A chunked request body whose connection ends inside a chunk reads as an error.
/// (chatd patch: `chunked_transfer`'s `Decoder` returns `Ok(0)` there, as after the last
/// chunk, so a truncated body read as a complete one.)
pub struct StrictChunks<R: Read> {
    inner: Decoder<R>,
}

impl<R: Read> StrictChunks<R> {
    pub fn new(source: R) -> Self {
        Self { inner: Decoder::new(source) }
    }
}

impl<R: Read> Read for StrictChunks<R> {
    fn read(&mut self, buf: &mut [u8]) -> IoResult<usize> {
        let read = self.inner.read(buf)?;
        if read == 0 && !buf.is_empty() && self.inner.remaining_chunks_size().is_some_and(|left| left > 0) {
            return Err(Error::new(ErrorKind::UnexpectedEof, "the chunked body ended inside a chunk"));
        }
        Ok(read)
    }
}

#[cfg(test)]
mod test {
    use super::StrictChunks;
    use std::io::Read;

    fn read_all(body: &str) -> std::io::Result<String> {
        let mut out = String::new();
        StrictChunks::new(body.as_bytes()).read_to_string(&mut out)?;
        Ok(out)
    }

    #[test]
    fn a_body_cut_inside_a_chunk_is_an_error() {
        assert_eq!(read_all("5\r\nhello\r\n0\r\n\r\n").unwrap(), "hello");
        assert_eq!(read_all("9\r\nhello").unwrap_err().kind(), std::io::ErrorKind::UnexpectedEof);
        assert_eq!(read_all("ffffffff\r\nhello").unwrap_err().kind(), std::io::ErrorKind::UnexpectedEof);
        assert!(read_all("5\r\nhello\r\n").is_err(), "no last chunk");
    }
}
