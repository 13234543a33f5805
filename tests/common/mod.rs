//! Test support: the real `chatd` binary on the real model, and a small HTTP/1.1 client that
//! can also send the malformed requests a real client library refuses to send.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn model_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/models/smollm2-135m-instruct");
    assert!(dir.join("model.onnx").exists(), "the test model is needed at {}", dir.display());
    dir
}

/// A folder named for `name` (and this process) linking every file of the shared model except
/// those in `written`, which are written with the given text (in subfolders too): the shared
/// model with another family's tokenizer, config or template.
pub fn linked_model_folder(name: &str, written: &[(&str, &str)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("chatd-folder-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(model_dir()).unwrap() {
        let file = entry.unwrap().file_name();
        if !written.iter().any(|(path, _)| std::ffi::OsStr::new(path) == file) {
            std::os::unix::fs::symlink(model_dir().join(&file), dir.join(&file)).unwrap();
        }
    }
    for (path, text) in written {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    dir
}

/// A running daemon; killed on drop, and by the kernel if the test process dies first.
pub struct Daemon {
    pub addr: String,
    child: Mutex<Child>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    pub fn start(extra_args: &[&str]) -> Daemon {
        Self::start_with_model(&model_dir(), extra_args)
    }

    pub fn start_with_model(model: &std::path::Path, extra_args: &[&str]) -> Daemon {
        Self::spawn(model, extra_args, true)
    }

    /// Returns as soon as the daemon listens, while its model may still be loading.
    pub fn start_listening(extra_args: &[&str]) -> Daemon {
        Self::spawn(&model_dir(), extra_args, false)
    }

    fn spawn(model: &std::path::Path, extra_args: &[&str], wait_until_serving: bool) -> Daemon {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatd"));
        cmd.arg("--model").arg(model).args(["--listen", "127.0.0.1:0", "--threads", "2"]).args(extra_args);
        Self::launch(cmd, wait_until_serving)
    }

    /// Runs `cmd` (chatd, or a wrapper that execs it) and waits until it serves, or only
    /// listens when `wait_until_serving` is false.
    pub fn launch(cmd: Command, wait_until_serving: bool) -> Daemon {
        Self::try_launch(cmd, wait_until_serving).unwrap_or_else(|log| panic!("chatd did not start:\n{log}"))
    }

    /// As `launch`, but a process that exits before it serves is an `Err` with its log (at
    /// once, not after the hang detector's wait).
    pub fn try_launch(mut cmd: Command, wait_until_serving: bool) -> Result<Daemon, String> {
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to kill the child when
        // the thread that spawned it exits.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("starting chatd");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // "listening on http://ADDR (loading the model)", then "serving NAME on http://ADDR".
                let stage = if line.contains("listening on http://") {
                    Some(false)
                } else if line.contains("serving ") {
                    Some(true)
                } else {
                    None
                };
                if let (Some(ready), Some(addr)) = (stage, line.split("on http://").nth(1)) {
                    let addr = addr.split_whitespace().next().unwrap_or_default().to_owned();
                    let _ = tx.send((ready, addr));
                }
                sink.lock().unwrap().push(line);
            }
        });
        // A hang detector: loading takes seconds even on a busy machine.
        let end = Instant::now() + Duration::from_secs(180);
        let addr = loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok((ready, addr)) if ready == wait_until_serving => break addr,
                Ok(_) => continue,
                Err(_) if Instant::now() > end => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(log.lock().unwrap().join("\n"));
                }
                // Its stderr is closed: it is exiting.
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => std::thread::sleep(Duration::from_millis(50)),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            }
            if let Ok(Some(status)) = child.try_wait() {
                // The reader thread may still hold the last lines: wait for it to reach the end.
                while rx.recv_timeout(Duration::from_secs(2)).is_ok() {}
                return Err(format!("exited with {status}:\n{}", log.lock().unwrap().join("\n")));
            }
        };
        Ok(Daemon { addr, child: Mutex::new(child), log })
    }

    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap().id()
    }

    pub fn is_running(&self) -> bool {
        matches!(self.child.lock().unwrap().try_wait(), Ok(None))
    }

    pub fn signal(&self, signal: libc::c_int) {
        let pid = self.child.lock().unwrap().id() as libc::pid_t;
        // SAFETY: signals our own child process.
        unsafe { libc::kill(pid, signal) };
    }

    /// The exit status, once the daemon has exited within `timeout`.
    pub fn wait_exit(&self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(status)) = self.child.lock().unwrap().try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// A value from `/metrics` (a sample line `name value`, labels included in `name`).
    pub fn metric(&self, name: &str) -> Option<f64> {
        let body = self.get("/metrics").body;
        body.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    /// Waits until the server holds no connection but the one asking (`chatd_connections_open`
    /// counts a connection until tiny_http is done with it).
    pub fn wait_connections_closed(&self, timeout: Duration) -> bool {
        wait_until(timeout, || self.other_connections() == Some(0.0))
    }

    /// `chatd_connections_open` less the connection asking. That one is kept alive, so it is
    /// surely counted while its request is answered (one that asks to close may be let go
    /// before the gauge is read, or after, as the threads happen to run); then it asks to
    /// close, and is gone once the server has closed it.
    fn other_connections(&self) -> Option<f64> {
        let mut stream = TcpStream::connect(&self.addr).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(600))).ok()?;
        write!(stream, "GET /metrics HTTP/1.1\r\nHost: {}\r\n\r\n", self.addr).ok()?;
        let mut reader = BufReader::new(stream);
        let mut length = None;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).ok()? == 0 {
                return None;
            }
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse::<usize>().ok();
            }
        }
        let mut body = vec![0; length?];
        reader.read_exact(&mut body).ok()?;
        let mut stream = reader.into_inner();
        write!(stream, "GET /health HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", self.addr).ok()?;
        stream.read_to_end(&mut Vec::new()).ok()?;
        let body = String::from_utf8(body).ok()?;
        body.lines().find_map(|l| l.strip_prefix("chatd_connections_open ")?.parse::<f64>().ok()).map(|n| n - 1.0)
    }

    /// Waits until a log line contains `text`.
    pub fn wait_for_log(&self, text: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.log().iter().any(|l| l.contains(text)))
    }

    pub fn post(&self, path: &str, body: &Value) -> Reply {
        self.request("POST", path, &body.to_string())
    }

    pub fn get(&self, path: &str) -> Reply {
        self.request("GET", path, "")
    }

    pub fn request(&self, method: &str, path: &str, body: &str) -> Reply {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.addr,
            body.len()
        );
        self.raw(format!("{head}{body}").as_bytes())
    }

    /// Sends bytes as they are and reads the reply until the server closes the connection.
    pub fn raw(&self, bytes: &[u8]) -> Reply {
        let mut stream = TcpStream::connect(&self.addr).expect("connecting to chatd");
        // A hang detector only: a non-streamed long answer on a busy 2-core box takes minutes.
        stream.set_read_timeout(Some(Duration::from_secs(600))).unwrap();
        stream.write_all(bytes).unwrap();
        let mut data = Vec::new();
        let _ = stream.read_to_end(&mut data);
        Reply::parse(&data)
    }

    /// A chat completion that must succeed; returns the response object.
    pub fn chat(&self, body: Value) -> Value {
        let reply = self.post("/v1/chat/completions", &body);
        assert_eq!(reply.status, 200, "{}", reply.body);
        reply.json()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let mut child = self.child.lock().unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// One daemon shared by the tests of a test binary, started from a thread that never ends so
/// the parent-death signal fires only when the whole test process exits.
pub fn shared() -> &'static Daemon {
    static DAEMON: OnceLock<Daemon> = OnceLock::new();
    DAEMON.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            tx.send(Daemon::start(&["--max-body-bytes", "65536"])).ok();
            loop {
                std::thread::park();
            }
        });
        rx.recv().expect("daemon thread")
    })
}

pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    fn parse(data: &[u8]) -> Reply {
        let text = String::from_utf8_lossy(data).into_owned();
        let Some((head, rest)) = text.split_once("\r\n\r\n") else {
            return Reply { status: 0, headers: Vec::new(), body: text };
        };
        let mut lines = head.lines();
        let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse().ok()).unwrap_or(0);
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let chunked = headers.iter().any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
        let body = if chunked { dechunk(rest) } else { rest.to_owned() };
        Reply { status, headers, body }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The `data:` payloads of a server-sent-event body, `[DONE]` included.
    pub fn events(&self) -> Vec<String> {
        self.body.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).map(str::to_owned).collect()
    }

    /// Asserts an OpenAI error object with this status; returns it.
    pub fn error(&self, status: u16) -> Value {
        assert_eq!(self.status, status, "{}", self.body);
        let v = self.json();
        let e = &v["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert!(e["type"].is_string(), "{v}");
        assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
        e.clone()
    }
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].strip_prefix("\r\n").unwrap_or(&tail[n..]);
    }
    out
}

pub fn user(content: &str) -> Value {
    serde_json::json!([{"role": "user", "content": content}])
}

pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Opens a streaming request and returns a reader positioned after the response head.
pub fn open_stream(d: &Daemon, body: &Value) -> (TcpStream, BufReader<TcpStream>) {
    let body = body.to_string();
    let mut stream = TcpStream::connect(&d.addr).unwrap();
    write!(stream, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}", body.len())
        .unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let reader = BufReader::new(stream.try_clone().unwrap());
    (stream, reader)
}

/// The next chunk's content delta (None at the end of the stream).
pub fn next_content(reader: &mut BufReader<TcpStream>) -> Option<String> {
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let Some(data) = line.trim_end().strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            return None;
        }
        let v: Value = serde_json::from_str(data).ok()?;
        if let Some(text) = v["choices"][0]["delta"]["content"].as_str() {
            if !text.is_empty() {
                return Some(text.to_owned());
            }
        }
    }
}
