//! The resident size is what the settings say: after a soak of mixed requests it stays within
//! the model as loaded plus the KV pool's and the prefix cache's budgets plus a fixed overhead,
//! and the part of it nothing accounts for does not grow. And a box with 1 GiB free starts and
//! serves with the default settings (chatd sizes its budgets from what is available).

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{Daemon, user, wait_until};
use serde_json::{Value, json};

fn genai_dir() -> PathBuf {
    common::model_dir().parent().unwrap().join("smollm2-135m-instruct-genai")
}

/// What README "Sizing a box" states beyond the budgets: threads, ONNX Runtime's working arena,
/// requests in flight.
const OVERHEAD: usize = 128 << 20;

const HANG: Duration = Duration::from_secs(120);

/// The `i`th request of a fixed mix: short answers, several choices, long answers, streams.
fn mixed(i: usize) -> Value {
    let topics = ["the sea", "a robot", "Paris", "bread", "the moon", "rain", "a cat", "trains"];
    let topic = topics[i % topics.len()];
    match i % 10 {
        0..=5 => json!({"messages": user(&format!("Tell me about {topic}.")), "max_tokens": 16 + i % 48,
                        "temperature": 0.7, "seed": i}),
        6 | 7 => json!({"messages": user(&format!("Write about {topic}.")), "max_tokens": 24, "n": 2 + i % 3,
                        "temperature": 0.9, "seed": i}),
        8 => json!({"messages": user(&format!("Write a long essay about {topic}.")), "max_tokens": 200,
                    "ignore_eos": true}),
        _ => json!({"messages": user(&format!("Say something about {topic}.")), "max_tokens": 32, "stream": true}),
    }
}

/// Sends requests `range` from `clients` threads; every one must be answered.
fn soak(d: &Daemon, range: std::ops::Range<usize>, clients: usize) {
    let next = std::sync::atomic::AtomicUsize::new(range.start);
    std::thread::scope(|s| {
        for _ in 0..clients {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= range.end {
                        return;
                    }
                    let reply = d.post("/v1/chat/completions", &mixed(i));
                    assert_eq!(reply.status, 200, "request {i}: {}", reply.body);
                }
            });
        }
    });
}

fn health(d: &Daemon) -> Value {
    d.get("/health").json()
}

/// The memory report once nothing runs.
fn settled_memory(d: &Daemon) -> Value {
    assert!(wait_until(HANG, || {
        let h = health(d);
        h["running"] == 0 && h["queued"] == 0
    }));
    health(d)["memory"].clone()
}

fn status_kib(pid: u32, field: &str) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_soak_stays_within_the_accounted_bound_and_nothing_unaccounted_grows() {
    let d = Daemon::start_with_model(&genai_dir(), &["--kv-cache-mb", "256", "--prefix-cache-mb", "64"]);
    soak(&d, 0..100, 4);
    let first = settled_memory(&d);
    soak(&d, 100..200, 4);
    let second = settled_memory(&d);
    let mib = |v: &Value| v.as_u64().unwrap() as f64 / (1u64 << 20) as f64;
    let bound = first["model_bytes"].as_u64().unwrap() as usize
        + first["kv_cache_budget_bytes"].as_u64().unwrap() as usize
        + first["prefix_cache_budget_bytes"].as_u64().unwrap() as usize
        + OVERHEAD;
    let peak = status_kib(d.pid(), "VmHWM:") << 10;
    eprintln!(
        "peak {:.0} MiB, bound {:.0} MiB; other {:.1} then {:.1} MiB; model {:.0} MiB",
        peak as f64 / 1048576.0,
        bound as f64 / 1048576.0,
        mib(&first["other_bytes"]),
        mib(&second["other_bytes"]),
        mib(&first["model_bytes"])
    );
    assert_eq!(first["kv_cache_budget_bytes"], 256u64 << 20);
    assert!(peak <= bound, "peak RSS {peak} over the accounted bound {bound}: {second}");
    assert!(
        mib(&second["other_bytes"]) <= mib(&first["other_bytes"]) + 16.0,
        "unaccounted memory grew from the first half to the second: {first} then {second}"
    );
}

/// A memory control group of its own with `limit` bytes, or why there can be none here.
struct MemoryGroup {
    dir: PathBuf,
    /// cgroup v1 (memory.limit_in_bytes, memory.failcnt) or v2 (memory.max, memory.events).
    v1: bool,
}

impl MemoryGroup {
    fn create(limit: usize) -> Result<Self, String> {
        let name = format!("chatd-test-{}", std::process::id());
        let v1 = PathBuf::from("/sys/fs/cgroup/memory");
        let (dir, v1, limit_file) = if v1.join("memory.limit_in_bytes").exists() {
            (v1.join(&name), true, "memory.limit_in_bytes")
        } else {
            (PathBuf::from("/sys/fs/cgroup").join(&name), false, "memory.max")
        };
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let group = MemoryGroup { dir, v1 };
        std::fs::write(group.dir.join(limit_file), limit.to_string())
            .map_err(|e| format!("cannot limit {}: {e}", group.dir.display()))?;
        Ok(group)
    }

    /// Times the group hit its limit.
    fn limit_hits(&self) -> usize {
        if self.v1 {
            std::fs::read_to_string(self.dir.join("memory.failcnt")).unwrap().trim().parse().unwrap()
        } else {
            let events = std::fs::read_to_string(self.dir.join("memory.events")).unwrap();
            events.lines().filter_map(|l| l.strip_prefix("max ")).map(|n| n.trim().parse::<usize>().unwrap()).sum()
        }
    }
}

impl Drop for MemoryGroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[test]
fn a_box_with_one_gib_free_starts_and_serves_with_the_defaults() {
    let gib = 1usize << 30;
    let group = match MemoryGroup::create(gib) {
        Ok(g) => g,
        Err(why) => {
            eprintln!("skipped: no memory control group can be made here ({why}); it needs root and cgroupfs");
            return;
        }
    };
    // chatd joins the group before it starts: a box where 1 GiB is all there is.
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg(format!("echo $$ > {}/cgroup.procs && exec \"$0\" \"$@\"", group.dir.display()))
        .arg(env!("CARGO_BIN_EXE_chatd"))
        .arg("--model")
        .arg(genai_dir())
        .args(["--listen", "127.0.0.1:0", "--threads", "2"])
        .env("CHATD_CONFIG", "/dev/null");
    let d = Daemon::launch(cmd, true);
    let memory = health(&d)["memory"].clone();
    let budgets =
        memory["kv_cache_budget_bytes"].as_u64().unwrap() + memory["prefix_cache_budget_bytes"].as_u64().unwrap();
    eprintln!("{}", memory["budget"]);
    assert!(budgets as usize <= gib / 2, "{memory}");
    soak(&d, 0..40, 2);
    // A few long answers at once, so the KV pool grows as far as these requests take it.
    std::thread::scope(|s| {
        for i in 0..4 {
            let d = &d;
            s.spawn(move || {
                let body =
                    json!({"messages": user("Write a long story."), "max_tokens": 1000, "ignore_eos": true, "seed": i});
                let reply = d.post("/v1/chat/completions", &body);
                assert_eq!(reply.status, 200, "{}", reply.body);
            });
        }
    });
    assert!(d.is_running());
    let peak = status_kib(d.pid(), "VmHWM:") << 10;
    eprintln!("peak RSS {} MiB in a 1 GiB group", peak >> 20);
    assert_eq!(group.limit_hits(), 0, "chatd ran into the group's limit (peak RSS {} MiB)", peak >> 20);
    drop(d);
}

/// `idle_unload_s`: after a quiet spell the model is released (the resident size falls by what
/// loading it took, give or take code pages), looking at `/health`, `/metrics` and `/v1/models` does not wake
/// it, and the next request loads it again and gets the same answer as before.
#[test]
fn an_idle_model_is_released_and_the_next_request_loads_it_again() {
    let d = Daemon::start_with_model(&genai_dir(), &["--idle-unload-s", "5"]);
    let ask = json!({"messages": user("Name a colour."), "max_tokens": 12, "temperature": 0});
    let before = d.chat(ask.clone())["choices"][0]["message"]["content"].clone();
    let awake = health(&d);
    let (resident, model) =
        (awake["memory"]["resident_bytes"].as_u64().unwrap(), awake["memory"]["model_bytes"].as_u64().unwrap());
    assert_eq!(awake["model_loads"], 1, "{awake}");

    assert!(wait_until(HANG, || health(&d)["status"] == "sleeping"), "{}", health(&d));
    for _ in 0..3 {
        assert_eq!(d.get("/v1/models").json()["data"][0]["id"], awake["model"]);
        assert_eq!(d.metric("chatd_model_loaded"), Some(0.0));
        let asleep = health(&d);
        assert_eq!(asleep["status"], "sleeping", "looking does not wake it: {asleep}");
        assert_eq!(asleep["model_loads"], 1, "{asleep}");
    }
    let asleep = health(&d)["memory"]["resident_bytes"].as_u64().unwrap();
    eprintln!("resident: awake {} MiB (model {} MiB), asleep {} MiB", resident >> 20, model >> 20, asleep >> 20);
    // What stays: ONNX Runtime's and chatd's code (file pages the kernel can drop; more of them
    // touched once a model has run) and the HTTP threads. 32 MiB of slack covers them.
    assert!(asleep <= resident - model + (32 << 20), "asleep {asleep}, awake {resident}, model {model}");

    let after = d.chat(ask)["choices"][0]["message"]["content"].clone();
    assert_eq!(after, before, "the reloaded model answers as before");
    let woken = health(&d);
    assert_eq!((woken["status"].as_str(), woken["model_loads"].as_u64()), (Some("ok"), Some(2)), "{woken}");
    assert_eq!(d.metric("chatd_model_loads_total"), Some(2.0));
    assert!(d.log().iter().any(|l| l.contains("sleeping after")), "{:?}", d.log());
}
