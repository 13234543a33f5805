//! Many clients, one small box: disconnects free their sequence within a step, a full queue
//! answers 429 instead of hanging, and queue waits and deadlines are bounded.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{Daemon, next_content, open_stream, user, wait_until};
use serde_json::{Value, json};

fn genai_dir() -> PathBuf {
    common::model_dir().parent().unwrap().join("smollm2-135m-instruct-genai")
}

fn health(d: &Daemon) -> Value {
    d.get("/health").json()
}

#[test]
fn disconnects_stop_generation_within_a_step_and_free_the_kv_cache() {
    let d = Daemon::start_with_model(&genai_dir(), &[]);
    // Streaming: read five pieces, then hang up.
    let body = json!({"messages": user("Tell me a long story about a dragon."), "max_tokens": 2000, "ignore_eos": true,
                      "stream": true, "stream_options": {"include_usage": true}});
    let (stream, mut reader) = open_stream(&d, &body);
    let mut received = 0;
    while received < 5 {
        next_content(&mut reader).expect("stream ended early");
        received += 1;
    }
    assert_eq!(health(&d)["running"], 1);
    assert!(health(&d)["kv_pool_used_bytes"].as_u64().unwrap() > 0);
    let before = health(&d)["decode_tokens"].as_u64().unwrap();
    drop(reader);
    drop(stream);
    assert!(wait_until(Duration::from_secs(5), || health(&d)["running"] == 0), "the sequence was not removed");
    let after = health(&d)["decode_tokens"].as_u64().unwrap();
    assert!(after - before <= 2, "{} tokens were generated after the client left", after - before);
    assert_eq!(health(&d)["kv_pool_used_bytes"], 0, "the KV rows were not returned");

    // Not streaming: the client gives up after a moment.
    let body =
        json!({"messages": user("Tell me a long story about a knight."), "max_tokens": 2000, "ignore_eos": true})
            .to_string();
    let mut stream = TcpStream::connect(&d.addr).unwrap();
    write!(stream, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}", body.len())
        .unwrap();
    assert!(wait_until(Duration::from_secs(5), || health(&d)["running"] == 1));
    std::thread::sleep(Duration::from_millis(300));
    let before = health(&d)["decode_tokens"].as_u64().unwrap();
    drop(stream);
    assert!(wait_until(Duration::from_secs(5), || health(&d)["running"] == 0), "the sequence was not removed");
    let after = health(&d)["decode_tokens"].as_u64().unwrap();
    assert!(after - before <= 3, "{} tokens were generated after the client left", after - before);
    assert_eq!(health(&d)["kv_pool_used_bytes"], 0);
    // The daemon serves on.
    assert_eq!(d.chat(json!({"messages": user("Hi"), "max_tokens": 2}))["choices"][0]["finish_reason"], "length");
}

#[test]
fn a_full_queue_answers_429_and_nothing_hangs() {
    let d = Daemon::start_with_model(&genai_dir(), &["--max-running", "2", "--max-queued", "2"]);
    let body = json!({"messages": user("Write a poem."), "max_tokens": 48, "ignore_eos": true});
    let results: Vec<(u16, Option<String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..12)
            .map(|_| {
                s.spawn(|| {
                    let r = d.post("/v1/chat/completions", &body);
                    (r.status, r.header("retry-after").map(str::to_owned))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let refused: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    assert_eq!(ok + refused.len(), 12, "{results:?}");
    assert!(ok >= 2 && !refused.is_empty(), "{results:?}");
    assert!(refused.iter().all(|r| r.1.as_deref() == Some("1")), "429 without Retry-After: {results:?}");
    let e = d.post("/v1/chat/completions", &body);
    assert_eq!(e.status, 200, "served again once the burst is over: {}", e.body);
}

#[test]
fn queue_wait_and_deadlines_are_bounded() {
    let d = Daemon::start_with_model(&genai_dir(), &["--max-running", "1", "--max-queue-wait-s", "0.5"]);
    // One long request holds the only place; the next waits 0.5 s, then gets 429.
    let long = json!({"messages": user("Count to a thousand."), "max_tokens": 400, "ignore_eos": true});
    std::thread::scope(|s| {
        let holder = s.spawn(|| d.post("/v1/chat/completions", &long));
        assert!(wait_until(Duration::from_secs(5), || health(&d)["running"] == 1));
        let started = Instant::now();
        let e = d.post("/v1/chat/completions", &json!({"messages": user("Hi"), "max_tokens": 2})).error(429);
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(e["message"].as_str().unwrap().contains("waited"), "{e}");
        // A request whose own deadline passes while it waits gets 504.
        let e = d
            .post("/v1/chat/completions", &json!({"messages": user("Hi"), "max_tokens": 2, "timeout": 0.2}))
            .error(504);
        assert_eq!(e["code"], "timeout");
        assert_eq!(holder.join().unwrap().status, 200);
    });
    let started = Instant::now();
    let v = d.chat(
        json!({"messages": user("Tell me a long story."), "max_tokens": 4000, "ignore_eos": true, "timeout": 0.5}),
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(v["choices"][0]["finish_reason"], "timeout");
    let n = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(n > 0 && n < 4000, "{n}");
    assert!(!v["choices"][0]["message"]["content"].as_str().unwrap().is_empty());
}

#[test]
fn a_sequence_at_the_kv_budget_ends_alone() {
    // 24 MiB holds ~540 positions of this model's keys and values (46,080 bytes each).
    let d = Daemon::start_with_model(&genai_dir(), &["--kv-cache-mb", "24"]);
    let long = json!({"messages": user("Count to a thousand."), "max_tokens": 1500, "ignore_eos": true});
    let v = d.chat(long);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let n = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(n > 300 && n < 1500, "{n}");
    // The daemon serves on, within the budget.
    let v = d.chat(json!({"messages": user("Hi"), "max_tokens": 3}));
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert!(health(&d)["kv_pool_bytes"].as_u64().unwrap() <= 24 << 20);
}
