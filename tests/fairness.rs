//! A long prompt arriving mid-stream does not raise the running stream's inter-token latency
//! by more than 3x. A timing test: it has this file (test binary) to itself, so no other test's
//! daemon competes for the cores while it measures.

mod common;

use std::path::PathBuf;
use std::time::Instant;

use common::{Daemon, next_content, open_stream, user};
use serde_json::json;

fn genai_dir() -> PathBuf {
    common::model_dir().parent().unwrap().join("smollm2-135m-instruct-genai")
}

#[test]
fn a_long_prompt_does_not_stall_running_streams() {
    let d = Daemon::start_with_model(&genai_dir(), &["--prefix-cache-mb", "0"]);
    let body = json!({"messages": user("Tell me a long story about the sea."), "max_tokens": 7000, "ignore_eos": true, "stream": true});
    let (_stream, mut reader) = open_stream(&d, &body);
    let mut arrivals = Vec::new();
    for _ in 0..40 {
        next_content(&mut reader).unwrap();
        arrivals.push(Instant::now());
    }
    let gaps = |a: &[Instant]| a.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).collect::<Vec<_>>();
    let mut alone = gaps(&arrivals[10..]);
    alone.sort_by(f64::total_cmp);
    let alone_median = alone[alone.len() / 2];
    // A ~600-token prompt arrives while the stream runs.
    let filler = "The harbour master counted the boats that came in with the evening tide, one by one. ";
    let long_prompt = filler.repeat(34);
    let during: Vec<Instant> = std::thread::scope(|s| {
        let other = s.spawn(|| d.chat(json!({"messages": user(&long_prompt), "max_tokens": 1})));
        let mut during = vec![Instant::now()];
        while !other.is_finished() {
            next_content(&mut reader).unwrap();
            during.push(Instant::now());
        }
        let v = other.join().unwrap();
        assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 550);
        during
    });
    let mixed = gaps(&during);
    let mixed_mean = mixed.iter().sum::<f64>() / mixed.len() as f64;
    eprintln!(
        "inter-token latency: {:.1} ms alone (median), {:.1} ms mean over {} tokens while a {}-token prompt was fed",
        alone_median * 1e3,
        mixed_mean * 1e3,
        mixed.len(),
        long_prompt.split_whitespace().count()
    );
    assert!(
        mixed_mean <= 3.0 * alone_median,
        "inter-token latency {:.1} ms while the prompt was fed vs {:.1} ms alone",
        mixed_mean * 1e3,
        alone_median * 1e3
    );
}
