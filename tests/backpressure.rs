//! Many clients, one small box: disconnects cancel their sequence and free its memory, a full
//! queue answers 429 instead of hanging, and queue waits and deadlines are bounded. Every wait
//! is on the engine's own counters (`/health`, `/metrics`); timeouts only detect hangs.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

use common::{Daemon, next_content, open_stream, user, wait_until};
use serde_json::{Value, json};

fn genai_dir() -> PathBuf {
    common::model_dir().parent().unwrap().join("smollm2-135m-instruct-genai")
}

fn health(d: &Daemon) -> Value {
    d.get("/health").json()
}

/// Requests on `/v1/chat/completions` answered with `status` so far, from /metrics.
fn answered(d: &Daemon, status: u16) -> u64 {
    let metrics = d.get("/metrics").body;
    let key = format!("chatd_requests_total{{endpoint=\"/v1/chat/completions\",status=\"{status}\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(key.as_str())).map_or(0, |n| n.parse().unwrap())
}

/// A hang detector: the engine's counters normally get there in milliseconds.
const HANG: Duration = Duration::from_secs(60);

#[test]
fn disconnects_cancel_generation_and_free_the_kv_cache() {
    let d = Daemon::start_with_model(&genai_dir(), &[]);
    // Streaming: read five pieces, then hang up.
    let body = json!({"messages": user("Tell me a long story about a dragon."), "max_tokens": 2000, "ignore_eos": true,
                      "stream": true, "stream_options": {"include_usage": true}});
    let (stream, mut reader) = open_stream(&d, &body);
    for _ in 0..5 {
        next_content(&mut reader).expect("stream ended early");
    }
    assert_eq!(health(&d)["running"], 1);
    assert!(health(&d)["kv_pool_used_bytes"].as_u64().unwrap() > 0);
    let before = health(&d)["decode_tokens"].as_u64().unwrap();
    drop(reader);
    drop(stream);
    // The request ends as a client disconnect (499), long before its 2000 tokens, and its KV
    // rows are returned. How soon it is noticed (every 20 ms and before every write) is timing;
    // that it is cancelled, and freed, is what is checked here.
    assert!(wait_until(HANG, || health(&d)["running"] == 0), "the sequence was not removed");
    assert!(wait_until(HANG, || answered(&d, 499) == 1), "not counted as a disconnect");
    let generated = health(&d)["decode_tokens"].as_u64().unwrap() - before;
    assert!(generated < 1000, "{generated} tokens were generated after the client left");
    assert_eq!(health(&d)["kv_pool_used_bytes"], 0, "the KV rows were not returned");

    // Not streaming: the client gives up once generation is under way.
    let body =
        json!({"messages": user("Tell me a long story about a knight."), "max_tokens": 2000, "ignore_eos": true})
            .to_string();
    let mut stream = TcpStream::connect(&d.addr).unwrap();
    write!(stream, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}", body.len())
        .unwrap();
    let started = health(&d)["decode_tokens"].as_u64().unwrap();
    assert!(wait_until(HANG, || health(&d)["decode_tokens"].as_u64().unwrap() >= started + 10));
    drop(stream);
    assert!(wait_until(HANG, || health(&d)["running"] == 0), "the sequence was not removed");
    assert!(wait_until(HANG, || answered(&d, 499) == 2), "not counted as a disconnect");
    let generated = health(&d)["decode_tokens"].as_u64().unwrap() - started;
    assert!(generated < 1000, "{generated} tokens were generated for a client that left");
    assert_eq!(health(&d)["kv_pool_used_bytes"], 0);
    // The daemon serves on.
    assert_eq!(d.chat(json!({"messages": user("Hi"), "max_tokens": 2}))["choices"][0]["finish_reason"], "length");
}

/// Opens `count` long streams and waits until the engine shows them running or queued as
/// given; the places stay taken until the returned streams are dropped.
fn hold(d: &Daemon, count: usize, running: u64, queued: u64) -> Vec<(TcpStream, std::io::BufReader<TcpStream>)> {
    let body =
        json!({"messages": user("Count to a thousand."), "max_tokens": 4000, "ignore_eos": true, "stream": true});
    let holders = (0..count).map(|_| open_stream(d, &body)).collect();
    assert!(
        wait_until(HANG, || {
            let h = health(d);
            h["running"] == running && h["queued"] == queued
        }),
        "{}",
        health(d)
    );
    holders
}

#[test]
fn a_full_queue_answers_429_and_nothing_hangs() {
    let d = Daemon::start_with_model(&genai_dir(), &["--max-running", "2", "--max-queued", "2"]);
    // Both places and both queue slots are taken before the burst, so every request of it finds
    // the queue full, however the machine schedules the clients.
    let holders = hold(&d, 4, 2, 2);
    let body = json!({"messages": user("Write a poem."), "max_tokens": 8});
    let results: Vec<(u16, Option<String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    let r = d.post("/v1/chat/completions", &body);
                    (r.status, r.header("retry-after").map(str::to_owned))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(results.iter().all(|r| r.0 == 429 && r.1.as_deref() == Some("1")), "{results:?}");
    drop(holders);
    assert!(wait_until(HANG, || health(&d)["running"] == 0 && health(&d)["queued"] == 0));
    let e = d.post("/v1/chat/completions", &body);
    assert_eq!(e.status, 200, "served again once the burst is over: {}", e.body);
}

#[test]
fn queue_wait_and_deadlines_are_bounded() {
    let d = Daemon::start_with_model(&genai_dir(), &["--max-running", "1", "--max-queue-wait-s", "0.5"]);
    // One long stream holds the only place; the next request waits 0.5 s, then gets 429.
    let holder = hold(&d, 1, 1, 0);
    let e = d.post("/v1/chat/completions", &json!({"messages": user("Hi"), "max_tokens": 2})).error(429);
    assert!(e["message"].as_str().unwrap().contains("waited"), "{e}");
    // A request whose own deadline passes while it waits gets 504.
    let e =
        d.post("/v1/chat/completions", &json!({"messages": user("Hi"), "max_tokens": 2, "timeout": 0.2})).error(504);
    assert_eq!(e["code"], "timeout");
    drop(holder);
    assert!(wait_until(HANG, || health(&d)["running"] == 0));
    // A deadline that passes while generating ends the completion there, with its text. 2 s is
    // far past the first token and far short of 8,000 tokens on any CPU.
    let v = d.chat(
        json!({"messages": user("Tell me a long story."), "max_tokens": 8000, "ignore_eos": true, "timeout": 2.0}),
    );
    assert_eq!(v["choices"][0]["finish_reason"], "timeout");
    let n = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(n > 0 && n < 8000, "{n}");
    assert!(!v["choices"][0]["message"]["content"].as_str().unwrap().is_empty());
}

#[test]
fn sequences_reaching_the_kv_budget_together_end_with_length_not_an_error() {
    // 48 MiB holds ~1,090 positions. Four choices leave four rows allocated (dropped when the
    // next sequence starts), and three long answers right after may grow to 256 positions each
    // (three rows of 512 do not fit); the first to get there ends, and its row rides along in
    // the others' steps.
    let d = Daemon::start_with_model(&genai_dir(), &["--kv-cache-mb", "48"]);
    d.chat(json!({"messages": user("Hi"), "max_tokens": 4, "n": 4}));
    let results: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|i| {
                let d = &d;
                s.spawn(move || {
                    let body = json!({"messages": user("Count to a thousand."), "max_tokens": 1500,
                                      "ignore_eos": true, "seed": i, "temperature": 0.5});
                    let reply = d.post("/v1/chat/completions", &body);
                    assert_eq!(reply.status, 200, "{}", reply.body);
                    reply.json()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for v in results {
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert!(v["usage"]["completion_tokens"].as_u64().unwrap() < 1500, "{v}");
    }
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

#[test]
fn a_long_prompt_after_a_burst_waits_for_room_instead_of_being_refused() {
    // 100 MiB holds ~2,270 positions (46,080 bytes each): one row for the long prompt's ~1,500,
    // not four.
    let d = Daemon::start_with_model(&genai_dir(), &["--kv-cache-mb", "100", "--prefix-cache-mb", "0"]);
    // A stream keeps the pool in use while three choices leave three more rows allocated.
    let body = json!({"messages": user("Count to a thousand."), "max_tokens": 200, "ignore_eos": true, "stream": true});
    let (_stream, mut reader) = open_stream(&d, &body);
    next_content(&mut reader).expect("the stream started");
    d.chat(json!({"messages": user("Hi"), "max_tokens": 4, "n": 3}));
    // Fits the context and, alone, the budget: it waits for the stream, then runs.
    let long = json!({"messages": user(&"word ".repeat(1400)), "max_tokens": 8});
    std::thread::scope(|s| {
        let waiting = s.spawn(|| d.post("/v1/chat/completions", &long));
        while next_content(&mut reader).is_some() {}
        let reply = waiting.join().unwrap();
        assert_eq!(reply.status, 200, "{}", reply.body);
    });
    assert!(health(&d)["kv_pool_bytes"].as_u64().unwrap() <= 100 << 20);
}
