//! Every bad request gets the OpenAI error object with a fitting status, and the daemon keeps
//! serving afterwards.

mod common;

use common::{Daemon, shared, user};
use serde_json::json;

/// A good request after a bad one: the daemon is alive and answering.
fn still_serving(d: &Daemon) {
    let v = d.chat(json!({"messages": user("Hi"), "max_tokens": 2}));
    assert_eq!(v["choices"][0]["finish_reason"], "length");
}

#[test]
fn invalid_json_and_wrong_types_are_400_naming_the_param() {
    let d = shared();
    let e = d.request("POST", "/v1/chat/completions", "{not json").error(400);
    assert!(e["message"].as_str().unwrap().contains("JSON"));
    d.request("POST", "/v1/chat/completions", "[1,2]").error(400);
    d.request("POST", "/v1/chat/completions", "").error(400);
    for (body, param) in [
        (json!({"messages": "hello"}), "messages"),
        (json!({}), "messages"),
        (json!({"messages": []}), "messages"),
        (json!({"messages": [{"role": "user"}]}), "messages[0].content"),
        (json!({"messages": [{"content": "x"}]}), "messages[0].role"),
        (json!({"messages": [{"role": "wizard", "content": "x"}]}), "messages[0].role"),
        (json!({"messages": [{"role": "user", "content": 5}]}), "messages[0].content"),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}),
            "messages[0].content[0]",
        ),
        (json!({"messages": user("x"), "temperature": "hot"}), "temperature"),
        (json!({"messages": user("x"), "temperature": 2.5}), "temperature"),
        (json!({"messages": user("x"), "top_p": 0}), "top_p"),
        (json!({"messages": user("x"), "max_tokens": 0}), "max_tokens"),
        (json!({"messages": user("x"), "max_tokens": -5}), "max_tokens"),
        (json!({"messages": user("x"), "max_tokens": 1.5}), "max_tokens"),
        (json!({"messages": user("x"), "n": 0}), "n"),
        (json!({"messages": user("x"), "n": 100}), "n"),
        (json!({"messages": user("x"), "stream": "yes"}), "stream"),
        (json!({"messages": user("x"), "stop": 3}), "stop"),
        (json!({"messages": user("x"), "stop": vec!["a"; 17]}), "stop"),
        (json!({"messages": user("x"), "logit_bias": {"abc": 1}}), "logit_bias"),
        (json!({"messages": user("x"), "logit_bias": {"5": 300}}), "logit_bias"),
        (json!({"messages": user("x"), "top_logprobs": 3}), "top_logprobs"),
        (json!({"messages": user("x"), "presence_penalty": -3}), "presence_penalty"),
        (json!({"messages": user("x"), "seed": "x"}), "seed"),
        (json!({"messages": user("x"), "seed": u64::MAX}), "seed"),
        (json!({"messages": user("x"), "tool_choice": "auto"}), "tool_choice"),
        (json!({"messages": user("x"), "stream_options": {"include_usage": true}}), "stream_options"),
        (json!({"messages": user("x"), "min_tokens": 10, "max_tokens": 5}), "min_tokens"),
    ] {
        let reply = d.post("/v1/chat/completions", &body);
        let e = reply.error(400);
        assert_eq!(e["type"], "invalid_request_error");
        assert_eq!(e["param"], param, "{body} -> {e}");
    }
    d.post("/v1/completions", &json!({"max_tokens": 3})).error(400);
    d.post("/v1/completions", &json!({"prompt": [99999999]})).error(400);
    // Every bad logit_bias entry is named, not only the first.
    let e = d.post("/v1/chat/completions", &json!({"messages": user("x"), "logit_bias": {"abc": 1, "5": 300, "7": 1}}));
    let message = e.error(400)["message"].as_str().unwrap().to_owned();
    assert!(message.contains("\"abc\"") && message.contains("\"5\"") && !message.contains("\"7\""), "{message}");
    // A form-encoded body (curl -d without -H) is refused, not read as JSON.
    let body = json!({"messages": user("x")}).to_string();
    let form = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let e = d.raw(form.as_bytes()).error(415);
    assert_eq!(e["code"], "unsupported_media_type", "{e}");
    still_serving(d);
}

#[test]
fn prompt_plus_max_tokens_beyond_the_context_is_refused_not_truncated() {
    let d = shared();
    let e = d.post("/v1/chat/completions", &json!({"messages": user("Hi"), "max_tokens": 9000})).error(400);
    assert_eq!(e["code"], "context_length_exceeded");
    assert!(e["message"].as_str().unwrap().contains("8192"));
    let long = "word ".repeat(9000);
    let e = d.post("/v1/chat/completions", &json!({"messages": user(&long)})).error(400);
    assert_eq!(e["code"], "context_length_exceeded");
    still_serving(d);
}

#[test]
fn unknown_model_route_and_method() {
    let d = shared();
    let e = d.post("/v1/chat/completions", &json!({"model": "gpt-4o", "messages": user("x")})).error(404);
    assert_eq!(e["code"], "model_not_found");
    assert_eq!(e["param"], "model");
    d.get("/v1/nothing-here").error(404);
    d.post("/v2/chat", &json!({})).error(404);
    let reply = d.get("/v1/chat/completions");
    reply.error(405);
    assert_eq!(reply.header("allow"), Some("POST"));
    d.request("DELETE", "/v1/models", "").error(405);
    still_serving(d);
}

#[test]
fn oversize_body_is_413() {
    let d = shared(); // started with --max-body-bytes 65536
    let big = json!({"messages": user(&"a".repeat(70_000))}).to_string();
    d.request("POST", "/v1/chat/completions", &big).error(413);
    // Chunked bodies have no declared length; they are cut at the limit too.
    let chunk = "b".repeat(70_000);
    let raw = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len()
    );
    d.raw(raw.as_bytes()).error(413);
    still_serving(d);
}

#[test]
fn forged_content_length_does_not_kill_the_daemon() {
    let d = shared();
    // tiny_http 0.12 allocated the declared length when dropping an unread body: this aborted
    // the process before vendor/tiny_http was patched.
    for length in ["100000000000000", "18446744073709551615", "5000000"] {
        let raw =
            format!("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n{{\"messages\":");
        let mut stream = std::net::TcpStream::connect(&d.addr).unwrap();
        use std::io::{Read, Write};
        stream.write_all(raw.as_bytes()).unwrap();
        stream.set_read_timeout(Some(std::time::Duration::from_secs(60))).unwrap();
        let mut buf = [0u8; 512];
        let n = stream.read(&mut buf).unwrap_or(0);
        let head = String::from_utf8_lossy(&buf[..n]);
        assert!(head.starts_with("HTTP/1.1 413") || head.starts_with("HTTP/1.1 400"), "{length}: {head}");
        drop(stream); // close early, with the body unsent
    }
    // Done with those connections (an unread body is drained when its request is dropped,
    // which is where a forged length used to abort).
    assert!(d.wait_connections_closed(std::time::Duration::from_secs(60)), "{:?}", d.metric("chatd_connections_open"));
    assert!(d.is_running(), "chatd died:\n{}", d.log().join("\n"));
    still_serving(d);
}

#[test]
fn disconnect_mid_stream_keeps_the_daemon_serving() {
    let d = shared();
    use std::io::{BufRead, BufReader, Write};
    let body = json!({"messages": user("Write a long story."), "max_tokens": 500, "stream": true, "ignore_eos": true})
        .to_string();
    let mut stream = std::net::TcpStream::connect(&d.addr).unwrap();
    write!(stream, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}", body.len())
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut events = 0;
    let mut line = String::new();
    while events < 3 && reader.read_line(&mut line).unwrap() > 0 {
        if line.starts_with("data: ") {
            events += 1;
        }
        line.clear();
    }
    drop(reader);
    drop(stream);
    // The request is cancelled: its log line says so, well before 500 tokens would be done.
    assert!(
        common::wait_until(std::time::Duration::from_secs(60), || d
            .log()
            .iter()
            .any(|l| l.contains("client disconnected"))),
        "{}",
        d.log().join("\n")
    );
    still_serving(d);
}

#[test]
fn a_burst_of_streams_does_not_hold_up_the_next_connection() {
    let d = shared();
    // Eight long streams opened back to back, each keeping its connection's thread; the health
    // check right after must be answered at once, not when one of them ends (a minute later).
    let body =
        json!({"messages": user("Count to a thousand."), "max_tokens": 4000, "ignore_eos": true, "stream": true});
    let streams: Vec<_> = (0..8).map(|_| common::open_stream(d, &body)).collect();
    let mut stream = std::net::TcpStream::connect(&d.addr).unwrap();
    use std::io::{Read, Write};
    stream.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    // A hang detector, far below the streams' length.
    stream.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply:?}");
    drop(streams);
    still_serving(d);
}

#[test]
fn while_the_model_loads_health_answers_503_and_requests_wait_for_it() {
    let d = Daemon::start_listening(&[]);
    let health = d.get("/health");
    assert_eq!(health.status, 503, "{}", health.body);
    assert_eq!(health.json()["status"], "loading");
    // Sent while loading: answered once the model is loaded, not refused (the wait's bound,
    // max_queue_wait_s, is tested in src/server/slot.rs).
    let reply = d.post("/v1/chat/completions", &json!({"messages": user("Hi"), "max_tokens": 4}));
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(d.get("/health").status, 200);
    still_serving(&d);
}
