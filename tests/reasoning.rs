//! Thinking models: reasoning split out of `content` (whole and streamed), `separate_reasoning`
//! and `reasoning_budget`. The model is the shared SmolLM2 with two of its unused added tokens
//! renamed `<think>` and `</think>` (as Qwen3's, not special) and a DeepSeek-R1-style template
//! whose generation prompt opens the reasoning: the real model writes the reasoning, and the
//! budget makes it close it with the real `</think>` token.

mod common;

use std::path::PathBuf;

use common::{Daemon, open_stream, user};
use serde_json::{Value, json};
use std::io::BufRead;

const TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}\
                        {% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}";

fn thinking_folder() -> PathBuf {
    let mut tokenizer: Value =
        serde_json::from_str(&std::fs::read_to_string(common::model_dir().join("tokenizer.json")).unwrap()).unwrap();
    for (id, name) in [(3, "<think>"), (4, "</think>")] {
        let added = tokenizer["added_tokens"].as_array_mut().unwrap().iter_mut().find(|t| t["id"] == id).unwrap();
        let old = added["content"].as_str().unwrap().to_owned();
        added["content"] = json!(name);
        added["special"] = json!(false);
        let vocab = tokenizer["model"]["vocab"].as_object_mut().unwrap();
        vocab.remove(&old);
        vocab.insert(name.to_owned(), json!(id));
    }
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(common::model_dir().join("tokenizer_config.json")).unwrap())
            .unwrap();
    config["chat_template"] = json!(TEMPLATE);
    for (id, name) in [("3", "<think>"), ("4", "</think>")] {
        if let Some(entry) = config["added_tokens_decoder"].get_mut(id) {
            entry["content"] = json!(name);
            entry["special"] = json!(false);
        }
    }
    common::linked_model_folder(
        "thinking",
        &[("tokenizer.json", &tokenizer.to_string()), ("tokenizer_config.json", &config.to_string())],
    )
}

/// The question, with end tokens banned for 16 tokens (a 135M model that never saw `<think>`
/// would otherwise end at once).
fn question(extra: Value) -> Value {
    let mut body = json!({"messages": user("What is the capital of France?"), "max_tokens": 24, "min_tokens": 16, "temperature": 0});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    body
}

/// The streamed reasoning and content, each joined.
fn streamed(d: &Daemon, body: &Value) -> (String, String) {
    let mut body = body.clone();
    body["stream"] = json!(true);
    let (_stream, reader) = open_stream(d, &body);
    let (mut reasoning, mut content) = (String::new(), String::new());
    for line in reader.lines() {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(data).unwrap();
        let delta = &chunk["choices"][0]["delta"];
        assert_eq!(delta["reasoning"], delta["reasoning_content"], "both names carry the same text");
        reasoning += delta["reasoning_content"].as_str().unwrap_or_default();
        content += delta["content"].as_str().unwrap_or_default();
    }
    (reasoning, content)
}

#[test]
fn reasoning_is_split_out_and_a_budget_closes_it() {
    let dir = thinking_folder();
    let d = Daemon::start_with_model(&dir, &[]);

    // A budget of 8: the model reasons for 8 tokens, then `</think>` is forced and it answers.
    let body = question(json!({"reasoning_budget": 8, "logprobs": true}));
    let reply = d.chat(body.clone());
    let message = &reply["choices"][0]["message"];
    let tokens: Vec<&str> = reply["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["token"].as_str().unwrap())
        .collect();
    assert_eq!(tokens[8], "</think>", "{tokens:?}");
    assert!(!tokens[..8].contains(&"</think>"));
    let reasoning = message["reasoning_content"].as_str().unwrap();
    let content = message["content"].as_str().unwrap();
    assert!(!reasoning.is_empty() && !content.is_empty(), "{message}");
    assert_eq!(message["reasoning"], message["reasoning_content"]);
    assert!(!content.contains("</think>") && !reasoning.contains("</think>"), "{message}");
    // The reasoning is the text of the 8 tokens before the end (special tokens have none).
    assert!(tokens[..8].concat().ends_with(reasoning), "{reasoning:?} from {tokens:?}");

    // Streamed, the same split arrives piece by piece.
    assert_eq!(streamed(&d, &body), (reasoning.to_owned(), content.to_owned()));

    // separate_reasoning false: the text as the model wrote it, with no reasoning fields.
    let reply = d.chat(question(json!({"reasoning_budget": 8, "separate_reasoning": false})));
    let message = &reply["choices"][0]["message"];
    assert!(message.get("reasoning_content").is_none(), "{message}");
    let whole = message["content"].as_str().unwrap();
    assert!(whole.contains("</think>") && whole.ends_with(content), "{whole:?}");

    // No budget: cut off by max_tokens while still reasoning, everything is reasoning.
    let reply = d.chat(question(json!({})));
    let message = &reply["choices"][0]["message"];
    assert_eq!(reply["choices"][0]["finish_reason"], "length");
    assert!(message["reasoning_content"].as_str().unwrap().starts_with(reasoning), "{message}");
    assert_eq!(message["content"], "");

    // A constrained answer has no room to think.
    let r = d.post(
        "/v1/chat/completions",
        &question(json!({"reasoning_budget": 8, "response_format": {"type": "json_object"}})),
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "reasoning_budget");
    drop(d);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_model_without_thinking_tokens_is_not_split_and_refuses_a_budget() {
    let d = common::shared();
    let reply = d.chat(question(json!({"separate_reasoning": true})));
    assert!(reply["choices"][0]["message"].get("reasoning_content").is_none());
    let r = d.post("/v1/chat/completions", &question(json!({"reasoning_budget": 8})));
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"]["param"], "reasoning_budget");
}
