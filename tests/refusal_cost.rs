//! Refusing an over-size request costs about what failing to parse it does. For each field a
//! client can make large or costly, concurrent bursts of ~3.5 MB requests that must be refused
//! are sent, and as many "broken twins": the same bytes without the last one, which chatd reads
//! and parses whole before finding the JSON cut off. Each kind must be refused with its 4xx for
//! at most 3 times the daemon's CPU time of its twins (not wall time: this holds on a busy
//! machine), and a good request is served after each kind.
//!
//! The cost is read from the kernel's per-thread CPU accounting of the daemon
//! (`/proc/PID/task/*/schedstat`, nanoseconds); the lowest of a few rounds is compared, so that
//! another process's burst or a first page fault does not decide.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::Daemon;
use serde_json::{Value, json};

/// Bytes of every over-size body: under chatd's default 4 MiB `--max-body-bytes`, so each is
/// read and parsed.
const SIZE: usize = 3_500_000;
/// Requests sent at once in a burst.
const BURST: usize = 4;
/// Bursts of each kind (and of its twins); the cheapest counts.
const ROUNDS: usize = 3;
/// A refusal may cost this many times its twin.
const MAX_RATIO: f64 = 3.0;

/// What a refusal must look like.
struct Expect {
    status: u16,
    param: &'static str,
    code: Option<&'static str>,
}

struct Kind {
    name: &'static str,
    path: &'static str,
    body: Vec<u8>,
    expect: Expect,
}

fn chat_with(fields: Value) -> Vec<u8> {
    let mut body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8});
    body.as_object_mut().unwrap().extend(fields.as_object().unwrap().clone());
    body.to_string().into_bytes()
}

/// As many `item(i)` as fit in `SIZE` bytes of JSON.
fn fill<T>(per_item: usize, item: impl Fn(usize) -> T) -> Vec<T> {
    (0..SIZE / per_item).map(item).collect()
}

fn kinds() -> Vec<Kind> {
    let words = "word ".repeat(SIZE / 5);
    let context = |param| Expect { status: 400, param, code: Some("context_length_exceeded") };
    let invalid = |param| Expect { status: 400, param, code: None };
    let chat = "/v1/chat/completions";
    // 128 tools (the most allowed) with large schemas: their prompt is far over the context.
    let tools: Vec<Value> = (0..128)
        .map(|i| {
            let properties: serde_json::Map<String, Value> =
                (0..SIZE / 128 / 30).map(|j| (format!("x{j}"), json!({"type": "integer"}))).collect();
            json!({"type": "function", "function": {"name": format!("f{i}"), "parameters": {"type": "object", "properties": properties}}})
        })
        .collect();
    let schema: serde_json::Map<String, Value> =
        fill(40, |i| (format!("p{i}"), json!({"type": "string", "enum": [format!("v{i}")]}))).into_iter().collect();
    // Every key a valid token id, written with leading zeros so that many name the same token,
    // then one that is not.
    let mut bias: serde_json::Map<String, Value> =
        fill(30, |i| (format!("{}{}", "0".repeat(10 + i / 49152), i % 49152), json!(1.25))).into_iter().collect();
    bias.insert("4915200".into(), json!(1));
    vec![
        Kind {
            name: "content string",
            path: chat,
            body: chat_with(json!({"messages": [{"role": "user", "content": words}]})),
            expect: context("messages"),
        },
        Kind {
            name: "content part",
            path: chat,
            body: chat_with(json!({"messages": [{"role": "user", "content": [{"type": "text", "text": words}]}]})),
            expect: context("messages"),
        },
        Kind {
            name: "completions prompt",
            path: "/v1/completions",
            body: json!({"prompt": words, "max_tokens": 8}).to_string().into_bytes(),
            expect: context("prompt"),
        },
        Kind {
            name: "many short messages",
            path: chat,
            body: chat_with(json!({"messages": fill(40, |_| json!({"role": "user", "content": "hi there"}))})),
            expect: invalid("messages"),
        },
        Kind {
            name: "stop string",
            path: chat,
            body: chat_with(json!({"stop": ["x".repeat(SIZE)]})),
            expect: invalid("stop"),
        },
        Kind {
            name: "stop strings",
            path: chat,
            body: chat_with(json!({"stop": fill(7, |_| "ab")})),
            expect: invalid("stop"),
        },
        Kind {
            name: "logit_bias",
            path: chat,
            body: chat_with(json!({"logit_bias": bias})),
            expect: invalid("logit_bias"),
        },
        Kind {
            name: "tools (count)",
            path: chat,
            body: chat_with(
                json!({"tools": fill(130, |i| json!({"type": "function", "function": {"name": format!("f{i}"), "parameters": {"type": "object"}}}))}),
            ),
            expect: invalid("tools"),
        },
        Kind {
            name: "tools (size)",
            path: chat,
            body: chat_with(json!({"tools": tools})),
            expect: context("messages"),
        },
        Kind {
            name: "tools, required",
            path: chat,
            body: chat_with(json!({"tools": tools, "tool_choice": "required"})),
            expect: context("messages"),
        },
        Kind {
            name: "response_format",
            path: chat,
            body: chat_with(
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": schema}}}}),
            ),
            expect: invalid("response_format"),
        },
        Kind {
            name: "regex",
            path: chat,
            body: chat_with(json!({"regex": "(ab|cd)".repeat(SIZE / 7)})),
            expect: invalid("regex"),
        },
        Kind {
            name: "grammar",
            path: chat,
            body: chat_with(
                json!({"grammar": format!("start: r0\n{}", (0..SIZE / 24).map(|i| format!("r{i}: \"a\" r{}\n", i + 1)).collect::<String>())}),
            ),
            expect: invalid("grammar"),
        },
        Kind {
            name: "ebnf",
            path: chat,
            body: chat_with(
                json!({"ebnf": format!("root ::= r0\n{}", (0..SIZE / 26).map(|i| format!("r{i} ::= \"a\" r{}\n", i + 1)).collect::<String>())}),
            ),
            expect: invalid("ebnf"),
        },
    ]
}

/// The daemon's CPU time so far, in seconds, summed over its threads.
fn cpu_seconds(pid: u32) -> f64 {
    let mut ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("reading the daemon's threads") {
        let path = task.unwrap().path().join("schedstat");
        // A thread may end between listing and reading.
        if let Ok(text) = std::fs::read_to_string(path) {
            ns += text.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    ns as f64 / 1e9
}

/// Sends `body` and returns the status and body of the reply.
fn send(addr: &str, path: &str, body: &[u8]) -> (u16, Value) {
    let mut stream = TcpStream::connect(addr).expect("connecting");
    // A hang detector only: chatd answers these in well under a second on a quiet box.
    stream.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let head =
        format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    stream.write_all(head.as_bytes()).unwrap();
    let _ = stream.write_all(body);
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    let text = String::from_utf8_lossy(&reply);
    let (head, payload) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, serde_json::from_str(payload).unwrap_or(Value::Null))
}

/// Sends `BURST` copies of `body` at once; returns the daemon's CPU and wall seconds, and the
/// replies.
fn burst(d: &Daemon, pid: u32, path: &str, body: &[u8]) -> (f64, f64, Vec<(u16, Value)>) {
    let (cpu, wall) = (cpu_seconds(pid), Instant::now());
    let replies = std::thread::scope(|s| {
        let senders: Vec<_> = (0..BURST).map(|_| s.spawn(|| send(&d.addr, path, body))).collect();
        senders.into_iter().map(|h| h.join().unwrap()).collect()
    });
    (cpu_seconds(pid) - cpu, wall.elapsed().as_secs_f64(), replies)
}

fn check_refusal(kind: &Kind, (status, body): &(u16, Value)) -> Result<(), String> {
    let e = &body["error"];
    let ok = *status == kind.expect.status
        && e["param"] == kind.expect.param
        && kind.expect.code.is_none_or(|code| e["code"] == code)
        && e["message"].as_str().is_some_and(|m| !m.is_empty());
    if ok {
        Ok(())
    } else {
        Err(format!("{}: expected {} on `{}`, got {status} {body}", kind.name, kind.expect.status, kind.expect.param))
    }
}

#[test]
fn over_size_requests_cost_no_more_than_three_times_their_broken_twins() {
    // Few HTTP threads, so that each has served a request of every size before the lowest
    // round is taken (each thread's allocator arena grows once).
    let d = Daemon::start(&["--http-threads", "4"]);
    let pid = d.pid();
    let good = json!({"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4}).to_string();
    let mut problems = Vec::new();
    eprintln!(
        "{:<20} {:>10} {:>10} {:>6}   (daemon CPU ms per burst of {BURST}, lowest of {ROUNDS}; wall ms)",
        "kind", "refused", "twins", "ratio"
    );
    for kind in kinds() {
        assert!(kind.body.len() > SIZE / 2 && kind.body.len() < 4 << 20, "{}: {} bytes", kind.name, kind.body.len());
        let twin = &kind.body[..kind.body.len() - 1];
        let (mut refused, mut twins) = ((f64::MAX, f64::MAX), (f64::MAX, f64::MAX));
        // One of each first: the daemon's heap grows to these sizes once.
        for _ in 0..=ROUNDS {
            let (cpu, wall, replies) = burst(&d, pid, kind.path, &kind.body);
            problems.extend(replies.iter().filter_map(|r| check_refusal(&kind, r).err()));
            refused = (refused.0.min(cpu), refused.1.min(wall));
            let (cpu, wall, replies) = burst(&d, pid, kind.path, twin);
            problems
                .extend(replies.iter().filter(|r| r.0 != 400).map(|r| format!("{} twin: {} {}", kind.name, r.0, r.1)));
            twins = (twins.0.min(cpu), twins.1.min(wall));
        }
        let ratio = refused.0 / twins.0.max(1e-4);
        eprintln!(
            "{:<20} {:>10.1} {:>10.1} {:>6.2}   wall {:.1} / {:.1}",
            kind.name,
            refused.0 * 1e3,
            twins.0 * 1e3,
            ratio,
            refused.1 * 1e3,
            twins.1 * 1e3
        );
        if ratio > MAX_RATIO {
            problems.push(format!("{}: refusing cost {ratio:.1}x the broken twins' CPU time", kind.name));
        }
        let reply = d.post("/v1/chat/completions", &serde_json::from_str(&good).unwrap());
        if reply.status != 200 {
            problems.push(format!("a good request after `{}`: {} {}", kind.name, reply.status, reply.body));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
