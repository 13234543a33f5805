//! Prefix reuse: a repeated prompt, a shared system prompt and a growing conversation start
//! from cached keys and values and report them in `usage.prompt_tokens_details.cached_tokens`;
//! reused prompt positions give exactly the answer of an uncached run; a chat's next turn
//! continuing from the row its last turn left parked answers as one restored from a copy, and
//! so does the same turn sent again ("regenerate"); in both model layouts.

mod common;

use std::path::{Path, PathBuf};

use common::Daemon;
use serde_json::{Value, json};

fn genai_dir() -> PathBuf {
    common::model_dir().parent().unwrap().join("smollm2-135m-instruct-genai")
}

const SYSTEM: &str = "You are a terse assistant for a weather station on a mountain. Answer in one short sentence.";

fn ask(d: &Daemon, messages: &Value) -> (String, u64) {
    let v = d.chat(json!({"messages": messages, "max_tokens": 24, "temperature": 0}));
    let text = v["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
    (text, v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap())
}

fn prefix_reuse_is_exact_and_reported(model: &Path) {
    let cold = Daemon::start_with_model(model, &["--prefix-cache-mb", "0"]);
    let warm = Daemon::start_with_model(model, &[]);
    let first = json!([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Is it windy today?"}]);
    let other = json!([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Will it snow tonight?"}]);

    let (a_cold, c) = ask(&cold, &first);
    assert_eq!(c, 0, "no reuse without a prefix cache");
    let (a1, c1) = ask(&warm, &first);
    assert_eq!((a1.as_str(), c1), (a_cold.as_str(), 0));
    // The same prompt again: everything but the last two tokens comes from the cache.
    let (a2, c2) = ask(&warm, &first);
    assert_eq!(a2, a_cold);
    assert!(c2 > 20, "cached {c2}");
    // Another question after the same system prompt reuses the system prompt.
    let (b_cold, _) = ask(&cold, &other);
    let (b_warm, c3) = ask(&warm, &other);
    assert_eq!(b_warm, b_cold);
    assert!(c3 >= 16, "cached {c3}");
    // A conversation resent with the reply and a new question reuses the earlier turn, reply
    // included. (The reply's keys and values were computed one token at a time, an uncached
    // run computes them as a prompt chunk: in a near-tie the rounding can tip a greedy choice,
    // so only the reuse is checked here.)
    let turn2 = json!([
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Is it windy today?"},
        {"role": "assistant", "content": a_cold},
        {"role": "user", "content": "And tomorrow?"},
    ]);
    let (t_warm, c4) = ask(&warm, &turn2);
    assert!(!t_warm.is_empty());
    let turn1_prompt =
        warm.chat(json!({"messages": first, "max_tokens": 1}))["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(c4 > turn1_prompt, "turn 2 reused {c4} tokens; turn 1's prompt alone was {turn1_prompt}");
    let health = warm.get("/health").json();
    assert!(health["prefix_cache"]["hits"].as_u64().unwrap() >= 3, "{health}");

    // Turn 2 straight after turn 1, as a chat app sends it: the genai layout continues from the
    // row turn 1 left parked in the KV pool (no copy); above, another request came between and
    // turn 1 was copied out and restored. Same reuse, same answer.
    let chat = Daemon::start_with_model(model, &[]);
    assert_eq!(ask(&chat, &first).0, a_cold);
    let (t_chat, c5) = ask(&chat, &turn2);
    assert_eq!((t_chat.as_str(), c5), (t_warm.as_str(), c4));

    // The same turn again, as a client's "regenerate" sends it: the whole prompt of the row the
    // turn left, without its reply (47 positions, more than the two chunks a next turn may drop).
    // The genai layout cuts that row back to the prompt's whole chunks in place; either way the
    // answer is the same.
    let regenerate = json!({"messages": turn2, "max_tokens": 48, "temperature": 0, "ignore_eos": true});
    let once = chat.chat(regenerate.clone());
    let again = chat.chat(regenerate);
    assert_eq!(again["choices"][0]["message"]["content"], once["choices"][0]["message"]["content"]);
    let prompt = again["usage"]["prompt_tokens"].as_u64().unwrap();
    let chunk = chat.get("/health").json()["prefill"]["chunk"].as_u64().unwrap();
    let cached = again["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert_eq!(cached, (prompt - 2) / chunk * chunk, "a {prompt}-token prompt, chunks of {chunk}");
}

#[test]
fn genai_layout_reuses_prefixes_exactly() {
    prefix_reuse_is_exact_and_reported(&genai_dir());
}

#[test]
fn optimum_layout_reuses_prefixes_exactly() {
    prefix_reuse_is_exact_and_reported(&common::model_dir());
}
