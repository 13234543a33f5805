//! A long prompt arriving mid-stream does not stall a running stream: the prompt is fed in
//! chunks between decode steps, so the stream keeps getting tokens while it is read. Checked on
//! the engine's own counters, not on the clock: while the prompt is fed, the stream gets at
//! least one token per prompt chunk. How much a prompt slows a stream (the pacing of
//! `--stream-slowdown`) is a speed figure: `scripts/bench-fairness.sh` measures it.

mod common;

use std::path::PathBuf;

use common::{Daemon, next_content, open_stream, user};
use serde_json::json;

fn genai_dir() -> PathBuf {
    common::model_dir().parent().unwrap().join("smollm2-135m-instruct-genai")
}

const PREFILL_CHUNK: usize = 16;

fn decode_tokens(d: &Daemon) -> usize {
    d.get("/health").json()["decode_tokens"].as_u64().unwrap() as usize
}

#[test]
fn a_long_prompt_is_fed_between_the_steps_of_a_running_stream() {
    let d = Daemon::start_with_model(
        &genai_dir(),
        &["--prefix-cache-mb", "0", "--prefill-chunk", &PREFILL_CHUNK.to_string()],
    );
    let body = json!({"messages": user("Tell me a long story about the sea."), "max_tokens": 7000, "ignore_eos": true, "stream": true});
    let (stream, mut reader) = open_stream(&d, &body);
    next_content(&mut reader).expect("the stream started");
    // A ~600-token prompt arrives while the stream runs. Only the stream decodes meanwhile, so
    // each decode step is one of its tokens.
    let filler = "The harbour master counted the boats that came in with the evening tide, one by one. ";
    let long_prompt = filler.repeat(34);
    let (during, prompt_tokens) = std::thread::scope(|s| {
        // Keep reading, so the stream is never held up by its client.
        let reading = s.spawn(move || while next_content(&mut reader).is_some() {});
        let before = decode_tokens(&d);
        let v = d.chat(json!({"messages": user(&long_prompt), "max_tokens": 1}));
        let during = decode_tokens(&d) - before;
        // Hanging up ends the reader (and the stream).
        stream.shutdown(std::net::Shutdown::Both).unwrap();
        reading.join().unwrap();
        (during, v["usage"]["prompt_tokens"].as_u64().unwrap() as usize)
    });
    let chunks = prompt_tokens.div_ceil(PREFILL_CHUNK);
    eprintln!("{during} stream tokens while a {prompt_tokens}-token prompt was fed in {chunks} chunks");
    assert!(prompt_tokens > 550);
    assert!(during >= chunks, "the stream got {during} tokens while {chunks} prompt chunks ran");
}

/// The first token's log-probabilities (and its top 5) as exact bits.
fn first_token_bits(v: &serde_json::Value) -> Vec<(String, u64)> {
    let first = &v["choices"][0]["logprobs"]["content"][0];
    let mut all = vec![(first["token"].as_str().unwrap().to_owned(), first["logprob"].as_f64().unwrap().to_bits())];
    for t in first["top_logprobs"].as_array().unwrap() {
        all.push((t["token"].as_str().unwrap().to_owned(), t["logprob"].as_f64().unwrap().to_bits()));
    }
    all
}

/// `filler` repeated, and words added until the chat prompt's length is one past a multiple
/// of `PREFILL_CHUNK` (counted by the daemon's `/tokenize`).
fn one_past_a_chunk(d: &Daemon, filler: &str) -> String {
    let mut text = filler.repeat(20);
    for _ in 0..4 * PREFILL_CHUNK {
        let count = d.post("/tokenize", &json!({"messages": user(&text)})).json()["count"].as_u64().unwrap();
        if count as usize % PREFILL_CHUNK == 1 {
            return text;
        }
        text.push_str(" tide");
    }
    panic!("no prompt length one past a chunk multiple");
}

#[test]
fn a_prompt_fed_alone_or_beside_a_stream_gives_the_same_numbers() {
    let d = Daemon::start_with_model(
        &genai_dir(),
        &["--prefix-cache-mb", "0", "--prefill-chunk", &PREFILL_CHUNK.to_string()],
    );
    // Alone the prompt goes in runs as long as a round allows; beside a stream, paced between
    // its decode steps, a chunk or so at a time. Its length is one past a chunk multiple: cut
    // plainly, its last run would be that one token alone, which rounds differently.
    let health = d.get("/health").json();
    assert_eq!(health["prefill"]["chunk"].as_u64(), Some(PREFILL_CHUNK as u64));
    eprintln!("runs of up to {} tokens alone", health["prefill"]["longest_run"]);
    let text = one_past_a_chunk(&d, "A lantern swung above the quay while the nets were mended for the morning. ");
    let body = json!({"messages": user(&text), "max_tokens": 1, "temperature": 0,
                      "logprobs": true, "top_logprobs": 5});
    let alone = d.chat(body.clone());
    let prompt_tokens = alone["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    assert!(prompt_tokens > 2 * PREFILL_CHUNK, "{prompt_tokens} prompt tokens");
    assert_eq!(prompt_tokens % PREFILL_CHUNK, 1);

    let stream_body = json!({"messages": user("Tell me a long story about the sea."), "max_tokens": 7000, "ignore_eos": true, "stream": true});
    let (stream, mut reader) = open_stream(&d, &stream_body);
    next_content(&mut reader).expect("the stream started");
    let beside = std::thread::scope(|s| {
        let reading = s.spawn(move || while next_content(&mut reader).is_some() {});
        let before = decode_tokens(&d);
        let v = d.chat(body);
        let during = decode_tokens(&d) - before;
        stream.shutdown(std::net::Shutdown::Both).unwrap();
        reading.join().unwrap();
        // The stream ran meanwhile, so the prompt was paced (fed in single chunks between steps).
        assert!(during >= prompt_tokens.div_ceil(PREFILL_CHUNK), "{during} stream tokens");
        v
    });
    assert_eq!(first_token_bits(&alone), first_token_bits(&beside));
}
