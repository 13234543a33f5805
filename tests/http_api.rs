//! The OpenAI API of the real daemon on the real SmolLM2 model, over real HTTP.

mod common;

use common::{shared, user};
use serde_json::{Value, json};

const FRANCE: &str = "What is the capital of France?";

#[test]
fn chat_completion_answers_with_the_openai_shape() {
    let d = shared();
    let v = d.chat(json!({"model": "smollm2-135m-instruct", "messages": user(FRANCE)}));
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert!(v["created"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(v["model"], "smollm2-135m-instruct");
    let choice = &v["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert!(choice["message"]["content"].as_str().unwrap().contains("Paris"), "{v}");
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(v["usage"]["prompt_tokens"], 37);
    let u = &v["usage"];
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap())
    );
}

#[test]
fn usage_counts_every_generated_token() {
    let d = shared();
    // Each token with text has one logprobs entry; the end-of-sequence token has none.
    let v = d.chat(json!({"messages": user(FRANCE), "logprobs": true, "top_logprobs": 3, "temperature": 0}));
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["completion_tokens"].as_u64().unwrap() as usize, content.len() + 1);
    let joined: String = content.iter().map(|t| t["token"].as_str().unwrap()).collect();
    assert_eq!(joined, v["choices"][0]["message"]["content"].as_str().unwrap());
    for t in content {
        assert!(t["logprob"].as_f64().unwrap() <= 0.0);
        assert_eq!(t["top_logprobs"].as_array().unwrap().len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(t["top_logprobs"][0]["token"], t["token"]);
    }
}

#[test]
fn max_tokens_ends_with_length() {
    let d = shared();
    for key in ["max_tokens", "max_completion_tokens"] {
        let v = d.chat(json!({"messages": user(FRANCE), key: 5}));
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["usage"]["completion_tokens"], 5);
    }
}

#[test]
fn stop_string_ends_the_answer_before_it() {
    let d = shared();
    let full = d.chat(json!({"messages": user(FRANCE), "temperature": 0}));
    let full = full["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
    let at = full.find("Paris").expect("greedy answer mentions Paris");
    let v = d.chat(json!({"messages": user(FRANCE), "temperature": 0, "stop": ["Paris", "never-there"]}));
    assert_eq!(v["choices"][0]["message"]["content"], full[..at]);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // A stop string that starts mid-token and ends in another ("aris" inside " Paris").
    let v = d.chat(json!({"messages": user(FRANCE), "temperature": 0, "stop": "aris"}));
    assert_eq!(v["choices"][0]["message"]["content"], full[..at + 1]);
}

#[test]
fn streaming_sends_role_then_deltas_then_finish_then_usage_then_done() {
    let d = shared();
    let plain = d.chat(json!({"messages": user(FRANCE), "temperature": 0}));
    let reply = d.post(
        "/v1/chat/completions",
        &json!({"messages": user(FRANCE), "temperature": 0, "stream": true, "stream_options": {"include_usage": true}}),
    );
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some("text/event-stream"));
    let events = reply.events();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, plain["choices"][0]["message"]["content"].as_str().unwrap());
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    for key in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(usage["usage"][key], plain["usage"][key]);
    }
    // Every chunk but the last carries "usage": null, as OpenAI does.
    assert!(chunks[..chunks.len() - 1].iter().all(|c| c["usage"].is_null()));
}

#[test]
fn n_gives_independent_choices() {
    let d = shared();
    let v = d.chat(
        json!({"messages": user("Tell me a short story."), "n": 2, "max_tokens": 12, "temperature": 1.0, "seed": 7}),
    );
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    assert_eq!(choices[0]["index"], 0);
    assert_eq!(choices[1]["index"], 1);
    assert_ne!(choices[0]["message"]["content"], choices[1]["message"]["content"]);
    assert_eq!(v["usage"]["completion_tokens"], 24);
    // Streaming n=2 also reports both choices.
    let reply =
        d.post("/v1/chat/completions", &json!({"messages": user(FRANCE), "n": 2, "max_tokens": 4, "stream": true}));
    let indexes: std::collections::BTreeSet<u64> = reply.events()[..reply.events().len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap()["choices"][0]["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes.into_iter().collect::<Vec<_>>(), vec![0, 1]);
}

#[test]
fn same_seed_same_text() {
    let d = shared();
    let ask = |seed: u64| {
        let v = d.chat(json!({"messages": user("Write a poem about the sea."), "max_tokens": 24, "temperature": 1.0, "seed": seed}));
        v["choices"][0]["message"]["content"].as_str().unwrap().to_owned()
    };
    let a = ask(1234);
    assert_eq!(a, ask(1234));
    let others: Vec<String> = [1, 2, 3].into_iter().map(ask).collect();
    assert!(others.iter().any(|o| o != &a), "different seeds should give different text");
}

#[test]
fn content_as_text_parts_equals_content_as_string() {
    let d = shared();
    let a = d.chat(json!({"messages": user(FRANCE), "max_tokens": 8}));
    let b =
        d.chat(json!({"messages": [{"role": "user", "content": [{"type": "text", "text": FRANCE}]}], "max_tokens": 8}));
    assert_eq!(a["choices"][0]["message"], b["choices"][0]["message"]);
    assert_eq!(a["usage"]["prompt_tokens"], b["usage"]["prompt_tokens"]);
    assert_eq!(a["usage"]["completion_tokens"], b["usage"]["completion_tokens"]);
}

#[test]
fn completions_endpoint_continues_a_raw_prompt() {
    let d = shared();
    let reply = d.post("/v1/completions", &json!({"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0, "logprobs": 2, "ignore_eos": true}));
    assert_eq!(reply.status, 200, "{}", reply.body);
    let v = reply.json();
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert!(text.contains("Paris"), "{v}");
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 6);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);
    // `logprobs: 0`: no alternatives, but the sampled token is there, as OpenAI and vLLM give it.
    let v = d
        .post(
            "/v1/completions",
            &json!({"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0,
                                             "logprobs": 0}),
        )
        .json();
    let lp = &v["choices"][0]["logprobs"];
    for (i, top) in lp["top_logprobs"].as_array().unwrap().iter().enumerate() {
        let top = top.as_object().unwrap();
        assert_eq!(top.len(), 1, "{lp}");
        assert_eq!(top[lp["tokens"][i].as_str().unwrap()], lp["token_logprobs"][i], "{lp}");
    }
    // Streaming and token-id prompts.
    let reply =
        d.post("/v1/completions", &json!({"prompt": [504, 3575, 282, 4649, 314], "max_tokens": 3, "stream": true}));
    let events = reply.events();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["object"], "text_completion");
}

#[test]
fn models_and_health() {
    let d = shared();
    let v = d.get("/v1/models").json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "smollm2-135m-instruct");
    assert_eq!(d.get("/v1/models/smollm2-135m-instruct").json()["object"], "model");
    d.get("/v1/models/gpt-9").error(404);
    let h = d.get("/health");
    assert_eq!(h.status, 200);
    assert_eq!(h.json()["status"], "ok");
}

#[test]
fn each_sampling_parameter_has_its_effect() {
    let d = shared();
    let base = json!({"messages": user(FRANCE), "max_tokens": 24, "temperature": 0});
    let with = |extra: Value| {
        let mut body = base.clone();
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        d.chat(body)["choices"][0]["message"]["content"].as_str().unwrap().to_owned()
    };
    let greedy = with(json!({}));
    // Forbidding the greedy first token changes the answer.
    let first_token = d.chat(json!({"messages": user(FRANCE), "max_tokens": 1, "temperature": 0, "logprobs": true}));
    let first_id_text = first_token["choices"][0]["logprobs"]["content"][0]["token"].as_str().unwrap().to_owned();
    let tok = chat::text::Tokenizer::load(&common::model_dir()).unwrap();
    let id = tok.encode(&first_id_text).unwrap()[0];
    assert_ne!(with(json!({"logit_bias": {id.to_string(): -100}})), greedy, "logit_bias");
    // Each penalty steers the greedy answer away from words it already used.
    for penalty in
        [json!({"presence_penalty": 2.0}), json!({"frequency_penalty": 2.0}), json!({"repetition_penalty": 1.3})]
    {
        assert_ne!(with(penalty.clone()), greedy, "{penalty}");
    }
    // At a high temperature a seed decides the answer, and each truncation alone brings it back
    // to the greedy one: one token left (top_k 1), the top token's mass (top_p 0.01), only tokens
    // as likely as the top one (min_p 1).
    let hot = |extra: Value| {
        let mut body = json!({"temperature": 1.5, "seed": 3});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        with(body)
    };
    let sampled = hot(json!({}));
    assert_ne!(sampled, greedy, "temperature");
    assert_eq!(hot(json!({})), sampled, "the same seed samples the same answer");
    assert_ne!(hot(json!({"seed": 4})), sampled, "another seed samples another answer");
    for truncation in [json!({"top_k": 1}), json!({"top_p": 0.01}), json!({"min_p": 1.0})] {
        assert_eq!(hot(truncation.clone()), greedy, "{truncation}");
    }
    // min_tokens holds the end-of-sequence token back.
    let v = d.chat(json!({"messages": user("Say OK."), "max_tokens": 40, "min_tokens": 30, "temperature": 0}));
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() >= 30, "{v}");
    // ignore_eos runs to max_tokens.
    let v = d.chat(json!({"messages": user("Say OK."), "max_tokens": 50, "ignore_eos": true, "temperature": 0}));
    assert_eq!(v["usage"]["completion_tokens"], 50);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
}

#[test]
fn tokenize_detokenize_and_apply_template_agree_with_the_chat_endpoint() {
    let d = shared();
    // llama-server's field names.
    let t = d.post("/tokenize", &json!({"content": "Hello world, hello chatd."})).json();
    let ids = t["tokens"].as_array().unwrap().clone();
    assert!(ids.len() > 3 && t["count"] == ids.len(), "{t}");
    assert_eq!(d.post("/detokenize", &json!({"tokens": ids})).json()["content"], "Hello world, hello chatd.");
    let pieces = d.post("/tokenize", &json!({"content": "Hello world, hello chatd.", "with_pieces": true})).json();
    let joined: String = pieces["tokens"].as_array().unwrap().iter().map(|p| p["piece"].as_str().unwrap()).collect();
    assert_eq!(joined, "Hello world, hello chatd.");
    // The chat endpoint's prompt, three ways: rendered then tokenized, vLLM's chat tokenize,
    // and the usage of a real completion.
    let prompt =
        d.post("/apply-template", &json!({"messages": user(FRANCE)})).json()["prompt"].as_str().unwrap().to_owned();
    assert!(prompt.contains(FRANCE) && prompt.ends_with("assistant\n"), "{prompt}");
    let counted = d.post("/tokenize", &json!({"prompt": prompt, "add_special_tokens": false})).json();
    let chat_form = d.post("/tokenize", &json!({"model": "smollm2-135m-instruct", "messages": user(FRANCE)})).json();
    assert_eq!(counted["tokens"], chat_form["tokens"]);
    assert_eq!(chat_form["count"], 37);
    assert_eq!(chat_form["max_model_len"], d.get("/v1/models").json()["data"][0]["max_model_len"]);
    // Refusals name the field, as everywhere.
    assert_eq!(d.post("/detokenize", &json!({"tokens": [1, 99_999_999]})).error(400)["param"], "tokens");
    assert_eq!(d.post("/tokenize", &json!({"content": "x", "nope": 1})).error(400)["param"], "nope");
    assert_eq!(d.post("/tokenize", &json!({})).error(400)["param"], "content");
    d.get("/tokenize").error(405);
}

fn with_origin(d: &common::Daemon, method: &str, path: &str, origin: &str, body: &str) -> common::Reply {
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nOrigin: {origin}\r\nAccess-Control-Request-Method: POST\r\n\
         Access-Control-Request-Headers: authorization, content-type\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        d.addr,
        body.len()
    );
    d.raw(format!("{head}{body}").as_bytes())
}

#[test]
fn cors_is_off_by_default_and_answers_allowed_origins_only() {
    let body = json!({"messages": user(FRANCE), "max_tokens": 2}).to_string();
    // Off: a preflight is a 405, and no answer carries CORS headers.
    let d = shared();
    assert_eq!(with_origin(d, "OPTIONS", "/v1/chat/completions", "http://app.local", "").status, 405);
    let r = with_origin(d, "POST", "/v1/chat/completions", "http://app.local", &body);
    assert_eq!((r.status, r.header("access-control-allow-origin")), (200, None));

    let d = common::Daemon::start(&["--cors-origins", "http://app.local, http://other.local"]);
    let pre = with_origin(&d, "OPTIONS", "/v1/chat/completions", "http://app.local", "");
    assert_eq!(pre.status, 204, "{}", pre.body);
    assert_eq!(pre.header("access-control-allow-origin"), Some("http://app.local"));
    assert_eq!(pre.header("access-control-allow-methods"), Some("POST, OPTIONS"));
    assert_eq!(pre.header("access-control-allow-headers"), Some("authorization, content-type"));
    let r = with_origin(&d, "POST", "/v1/chat/completions", "http://other.local", &body);
    assert_eq!((r.status, r.header("access-control-allow-origin")), (200, Some("http://other.local")));
    let streamed = json!({"messages": user(FRANCE), "max_tokens": 2, "stream": true}).to_string();
    let r = with_origin(&d, "POST", "/v1/chat/completions", "http://app.local", &streamed);
    assert_eq!(r.header("access-control-allow-origin"), Some("http://app.local"));
    assert_eq!(r.events().last().map(String::as_str), Some("[DONE]"));
    // Errors carry it too, so the page can read them; other origins get nothing.
    let r = with_origin(&d, "POST", "/v1/chat/completions", "http://app.local", "{");
    assert_eq!((r.status, r.header("access-control-allow-origin")), (400, Some("http://app.local")));
    let r = with_origin(&d, "OPTIONS", "/v1/chat/completions", "http://evil.local", "");
    assert_eq!((r.status, r.header("access-control-allow-origin")), (405, None));
    assert_eq!(with_origin(&d, "GET", "/health", "http://evil.local", "").header("access-control-allow-origin"), None);
}

#[test]
fn a_long_prompt_gets_keep_alive_comments_before_its_first_token() {
    use std::io::BufRead;
    let d = common::Daemon::start(&["--sse-keepalive-s", "0.05"]);
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(60);
    let body = json!({"messages": user(&long), "max_tokens": 4, "stream": true});
    let sent = std::time::Instant::now();
    let (_stream, mut reader) = common::open_stream(&d, &body);
    let (mut comments, mut first_token_after) = (0, None);
    let mut line = String::new();
    while reader.read_line(&mut line).unwrap() > 0 {
        let text = line.trim_end();
        if text == ": keep-alive" && first_token_after.is_none() {
            comments += 1;
        }
        if text.starts_with("data: ") && text.contains("\"content\":\"") && !text.contains("\"content\":\"\"") {
            first_token_after.get_or_insert(sent.elapsed());
        }
        if text == "data: [DONE]" {
            break;
        }
        line.clear();
    }
    let waited = first_token_after.expect("a token came");
    eprintln!("first token after {waited:?}, {comments} keep-alives before it");
    // Keep-alives are due every 50 ms of silence: a prompt that took 4 intervals to read must
    // have had some (on a machine fast enough to read it sooner there is nothing to check).
    if waited > std::time::Duration::from_millis(200) {
        assert!(comments > 0, "no keep-alive in {waited:?} before the first token");
    }
    // The openai client and every SSE parser skip comment lines: the data is the same.
    let r = d.post("/v1/chat/completions", &json!({"messages": user(FRANCE), "max_tokens": 4, "stream": true}));
    assert_eq!(r.events().last().map(String::as_str), Some("[DONE]"));
}

#[test]
fn tool_calls_in_the_history_need_json_object_arguments() {
    let d = shared();
    let history = |arguments: Value| {
        json!({"max_tokens": 2, "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ]})
    };
    assert_eq!(d.post("/v1/chat/completions", &history(json!("{\"city\": \"Paris\"}"))).status, 200);
    assert_eq!(d.post("/v1/chat/completions", &history(json!({"city": "Paris"}))).status, 200);
    for bad in [json!("{"), json!("[1]"), json!(7)] {
        let e = d.post("/v1/chat/completions", &history(bad)).error(400);
        assert_eq!(e["param"], "messages[1].tool_calls[0].function.arguments", "{e}");
    }
}

/// Voluntary context switches of each of the daemon's HTTP threads.
fn http_thread_wakeups(pid: u32) -> std::collections::HashMap<String, u64> {
    let mut wakeups = std::collections::HashMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else { continue };
        let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
        if let (Some(thread), Some(n)) = (field("Name:"), field("voluntary_ctxt_switches:"))
            && thread.starts_with("chatd-http")
        {
            wakeups.insert(format!("{thread} {}", task.file_name().to_string_lossy()), n.parse().unwrap());
        }
    }
    wakeups
}

#[test]
fn a_whole_answer_wakes_its_http_thread_a_few_times_a_second_not_per_token() {
    // The engine keeps a non-streamed answer's events until it ends; meanwhile its HTTP thread
    // only looks at its client (every 200 ms). Per-token wake-ups took cores from the model.
    let d = common::Daemon::start(&[]);
    let before = http_thread_wakeups(d.pid());
    let started = std::time::Instant::now();
    let v = d.chat(json!({"messages": user(FRANCE), "max_tokens": 300, "ignore_eos": true}));
    let polls = started.elapsed().as_secs_f64() / 0.2;
    let tokens = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert_eq!(tokens, 300);
    let after = http_thread_wakeups(d.pid());
    let woke = after.iter().map(|(thread, n)| n - before.get(thread).copied().unwrap_or(0)).max().unwrap();
    // Reading the request and writing the answer take a few more; a wake-up per token is 300.
    assert!((woke as f64) <= polls * 1.5 + 20.0, "the answer's HTTP thread woke {woke} times for {tokens} tokens");
}
