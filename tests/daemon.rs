//! Running unattended: the configuration file, API keys, request and connection limits
//! (including slow and idle clients), reload on SIGHUP, drain on SIGTERM, and /metrics.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Daemon, model_dir, next_content, open_stream, user, wait_until};
use serde_json::{Value, json};

/// A hang detector: what the tests wait for normally happens within a second or two.
const HANG: Duration = Duration::from_secs(60);

fn temp_file(name: &str, text: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("chatd-daemon-test-{}-{name}", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

fn chatd(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_chatd")).args(args).env_remove("CHATD_CONFIG").output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

fn ask(max_tokens: usize) -> Value {
    json!({"messages": user("What is the capital of France?"), "max_tokens": max_tokens, "temperature": 0})
}

#[test]
fn check_config_validates_the_file_and_the_model() {
    let model = model_dir().display().to_string();
    let good = temp_file("good.toml", &format!("model = {model:?}\nmax_running = 4\nidle_timeout_s = 10\n"));
    let (code, out, err) = chatd(&["--config", good.to_str().unwrap(), "--check-config"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("configuration OK") && out.contains(good.to_str().unwrap()), "{out}");

    let typo = temp_file("typo.toml", &format!("model = {model:?}\nmax_runing = 4\n"));
    let (code, _, err) = chatd(&["--config", typo.to_str().unwrap(), "--check-config"]);
    assert_eq!(code, 2);
    assert!(err.contains(typo.to_str().unwrap()) && err.contains("`max_runing`") && err.contains("unknown setting"));

    let bad = temp_file("bad.toml", &format!("model = {model:?}\nmax_connections = 0\n"));
    let (code, _, err) = chatd(&["--config", bad.to_str().unwrap(), "--check-config"]);
    assert_eq!(code, 2);
    assert!(err.contains("`max_connections`") && err.contains("at least 1"), "{err}");

    let missing_model = temp_file("nomodel.toml", "model = \"/nonexistent-model\"\n");
    let (code, _, err) = chatd(&["--config", missing_model.to_str().unwrap(), "--check-config"]);
    assert_eq!(code, 2);
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn api_keys_limits_and_metrics_protection_reload_on_sighup() {
    let keys = temp_file("keys", "# test keys\nsk-first\n");
    let config = temp_file(
        "reload.toml",
        &format!("api_keys_file = {:?}\nmax_messages = 4\nlog_level = \"info\"\n", keys.display().to_string()),
    );
    let d = Daemon::start(&["--config", config.to_str().unwrap()]);
    let with_key = |key: &str, body: &Value| {
        let body = body.to_string();
        d.raw(
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
    };
    let missing = d.post("/v1/chat/completions", &ask(4));
    assert_eq!(missing.error(401)["code"], "invalid_api_key");
    assert_eq!(missing.header("www-authenticate"), Some("Bearer"));
    assert!(with_key("sk-wrong", &ask(4)).error(401)["message"].as_str().unwrap().contains("Incorrect API key"));
    assert_eq!(with_key("sk-first", &ask(4)).status, 200);
    // Health and metrics are open unless configured otherwise.
    assert_eq!(d.get("/health").status, 200);
    assert_eq!(d.get("/metrics").status, 200);
    let five =
        json!({"messages": [user("a")[0], user("b")[0], user("c")[0], user("d")[0], user("e")[0]], "max_tokens": 2});
    assert!(with_key("sk-first", &five).error(400)["message"].as_str().unwrap().contains("at most 4 messages"));

    // New keys, a new limit, and /metrics behind the keys: applied by SIGHUP, no restart.
    std::fs::write(&keys, "sk-second\n").unwrap();
    std::fs::write(
        &config,
        format!("api_keys_file = {:?}\nmax_messages = 8\nauth_metrics = true\n", keys.display().to_string()),
    )
    .unwrap();
    d.signal(libc::SIGHUP);
    assert!(d.wait_for_log("reloaded the configuration", HANG), "{:?}", d.log());
    let line = d.log().into_iter().find(|l| l.contains("reloaded the configuration")).unwrap();
    assert!(line.contains("auth_metrics") && line.contains("api keys") && line.contains("max_messages=8"), "{line}");
    assert_eq!(with_key("sk-first", &ask(4)).status, 401);
    assert_eq!(with_key("sk-second", &five).status, 200);
    assert_eq!(d.get("/metrics").status, 401);
    assert_eq!(d.get("/health").status, 200);

    // A broken file is refused and the running configuration kept.
    std::fs::write(&config, "max_messages = \"many\"\n").unwrap();
    d.signal(libc::SIGHUP);
    assert!(d.wait_for_log("reload refused", HANG));
    assert_eq!(with_key("sk-second", &ask(4)).status, 200);
    assert!(d.is_running());
}

#[test]
fn request_limits_are_enforced_with_clear_errors() {
    let d = Daemon::start(&[
        "--max-prompt-tokens",
        "48",
        "--max-completion-tokens",
        "16",
        "--max-n",
        "2",
        "--max-stop-strings",
        "2",
        "--max-stop-length",
        "8",
    ]);
    let chat = |extra: Value| {
        let mut body = ask(4);
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        d.post("/v1/chat/completions", &body)
    };
    let e = chat(json!({"messages": user(&"word ".repeat(100))})).error(400);
    assert_eq!(e["code"], "context_length_exceeded");
    assert!(e["message"].as_str().unwrap().contains("at most 48 prompt tokens"), "{e}");
    let e = chat(json!({"max_tokens": 17})).error(400);
    assert!(e["message"].as_str().unwrap().contains("at most 16"), "{e}");
    assert_eq!(chat(json!({"n": 3})).error(400)["param"], "n");
    assert_eq!(chat(json!({"stop": ["a", "b", "c"]})).error(400)["param"], "stop");
    assert_eq!(chat(json!({"stop": ["a very long stop"]})).error(400)["param"], "stop");
    // Without max_tokens the completion is capped at the limit, not refused.
    let body = json!({"messages": user("Tell me a story."), "temperature": 0, "ignore_eos": true});
    let reply = d.post("/v1/chat/completions", &body);
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["usage"]["completion_tokens"], 16);
}

/// Reads what the server sends until it closes the connection (or `timeout`).
fn read_all(stream: &mut TcpStream, timeout: Duration) -> String {
    stream.set_read_timeout(Some(timeout)).unwrap();
    let mut data = Vec::new();
    let _ = stream.read_to_end(&mut data);
    String::from_utf8_lossy(&data).into_owned()
}

#[test]
fn slow_idle_and_excess_connections_cannot_pin_the_server() {
    let d = Daemon::start(&["--max-connections", "4", "--idle-timeout-s", "1", "--max-header-bytes", "2048"]);
    // A head over the limit: 431 with the error object.
    let big = format!("GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(4096));
    let reply = d.raw(big.as_bytes());
    assert_eq!(reply.error(431)["code"], "headers_too_large");

    // Four idle connections fill the server; the fifth is refused at once with 503. Places are
    // taken in the order connections are accepted, so once the earlier connections are gone the
    // fifth is the one over the limit.
    assert!(d.wait_connections_closed(HANG));
    let mut idle: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(&d.addr).unwrap()).collect();
    let mut fifth = TcpStream::connect(&d.addr).unwrap();
    let refused = read_all(&mut fifth, HANG);
    assert!(refused.starts_with("HTTP/1.1 503") && refused.contains("too_many_connections"), "{refused}");
    // Idle ones are closed after the idle timeout (1 s), quietly, and free their places.
    for conn in &mut idle {
        assert_eq!(read_all(conn, HANG), "");
    }
    assert_eq!(d.get("/health").status, 200);

    // A head trickled one byte at a time gets 408 after the idle timeout, not a thread forever.
    // (The pauses are the client being slow, not a wait on the server.)
    let mut slow = TcpStream::connect(&d.addr).unwrap();
    for byte in b"GET /health HTTP/1.1\r\nHost: xxxxxxxxxxxxxxxxxxxxxxx" {
        if slow.write_all(&[*byte]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let answer = read_all(&mut slow, HANG);
    assert!(answer.starts_with("HTTP/1.1 408") && answer.contains("request_timeout"), "{answer}");

    // So does a body trickled under a valid head.
    let mut slow = TcpStream::connect(&d.addr).unwrap();
    write!(slow, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4000\r\n\r\n{{").unwrap();
    for _ in 0..30 {
        if slow.write_all(b" ").is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let answer = read_all(&mut slow, HANG);
    assert!(answer.starts_with("HTTP/1.1 408") && answer.contains("request_timeout"), "{answer}");

    let reply = d.post("/v1/chat/completions", &ask(4));
    assert_eq!(reply.status, 200, "{}", reply.body);
    let metrics = d.get("/metrics").body;
    assert!(metrics.contains("chatd_connections_refused_total 1"), "{metrics}");
}

#[test]
fn sigterm_drains_then_cancels_and_exits_zero() {
    let d = Daemon::start(&["--shutdown-timeout-s", "2"]);
    // A long stream that cannot finish within the grace period, and a short request that can.
    let long = json!({"messages": user("Tell me a long story."), "max_tokens": 4000, "ignore_eos": true,
                      "temperature": 0, "stream": true});
    let (_stream, mut reader) = open_stream(&d, &long);
    assert!(next_content(&mut reader).is_some());
    let short = std::thread::spawn({
        let addr = d.addr.clone();
        move || {
            let body = json!({"messages": user("Say hi."), "max_tokens": 24, "temperature": 0}).to_string();
            let mut s = TcpStream::connect(addr).unwrap();
            write!(s, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}", body.len())
                .unwrap();
            read_all(&mut s, Duration::from_secs(30))
        }
    });
    // Both in flight before the signal (the short one may be done already on a fast box).
    assert!(wait_until(HANG, || d.get("/health").json()["running"] == 2 || short.is_finished()));
    let signalled = Instant::now();
    d.signal(libc::SIGTERM);
    assert!(d.wait_for_log("draining", HANG));
    // New work is refused while draining.
    let refused = d.post("/v1/chat/completions", &ask(4));
    assert_eq!(refused.error(503)["code"], "unavailable");
    assert_eq!(d.get("/health").json()["status"], "draining");
    // In flight: the short request finishes normally ...
    assert!(short.join().unwrap().starts_with("HTTP/1.1 200"));
    // ... the long stream is ended after the grace period with a proper last chunk and [DONE].
    let mut rest = String::new();
    let _ = reader.read_to_string(&mut rest);
    let (cancelled, done) = (rest.find("\"finish_reason\":\"cancelled\""), rest.find("data: [DONE]"));
    assert!(cancelled.is_some() && done.is_some() && cancelled < done, "{rest}");
    let status = d.wait_exit(HANG).expect("chatd exits after draining");
    assert!(status.success(), "{status}");
    // It waited the grace period for the stream (a lower bound holds on any machine).
    assert!(signalled.elapsed() >= Duration::from_secs(2), "{:?}", signalled.elapsed());
}
