//! Engine events shaped as OpenAI responses: `chat.completion` / `text_completion` objects for
//! whole answers, and `chat.completion.chunk` / `text_completion` chunks for streams.

use serde_json::{Value, json};

use super::{Endpoint, ParsedRequest};
use crate::engine::{Event, FinishReason, Usage};
use crate::sampling::TokenLogprobs;
use crate::text::Tokenizer;

/// The fields every object of one response shares.
struct Meta {
    id: String,
    created: u64,
    model: String,
    endpoint: Endpoint,
    logprobs: bool,
}

impl Meta {
    fn new(request: &ParsedRequest) -> Self {
        let prefix = match request.endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completion => "cmpl",
        };
        let mut rng = crate::sampling::Rng::from_entropy();
        let id = format!("{prefix}-{:016x}{:08x}", rng.next_u64(), rng.next_u64() as u32);
        let created =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        Self { id, created, model: request.model.clone(), endpoint: request.endpoint, logprobs: request.logprobs }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    fn logprobs_json(&self, list: &[TokenLogprobs], tokenizer: &Tokenizer, text_offset: usize) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        match self.endpoint {
            Endpoint::Chat => {
                let content: Vec<Value> = list
                    .iter()
                    .map(|lp| {
                        let top: Vec<Value> = lp.top.iter().map(|&(t, l)| token_json(tokenizer, t, l)).collect();
                        let mut entry = token_json(tokenizer, lp.token, lp.logprob);
                        entry["top_logprobs"] = Value::Array(top);
                        entry
                    })
                    .collect();
                json!({"content": content, "refusal": null})
            }
            Endpoint::Completion => {
                let mut offset = text_offset;
                let mut tokens = Vec::new();
                let mut token_logprobs = Vec::new();
                let mut top_logprobs = Vec::new();
                let mut offsets = Vec::new();
                for lp in list {
                    let text = tokenizer.token_text(lp.token);
                    offsets.push(offset);
                    offset += text.len();
                    tokens.push(Value::String(text));
                    token_logprobs.push(json!(lp.logprob));
                    let top: serde_json::Map<String, Value> =
                        lp.top.iter().map(|&(t, l)| (tokenizer.token_text(t), json!(l))).collect();
                    top_logprobs.push(Value::Object(top));
                }
                json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets})
            }
        }
    }
}

fn token_json(tokenizer: &Tokenizer, token: u32, logprob: f32) -> Value {
    let text = tokenizer.token_text(token);
    let bytes: Vec<u8> = text.as_bytes().to_vec();
    json!({"token": text, "logprob": logprob, "bytes": bytes})
}

fn usage_json(usage: &Usage) -> Value {
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    })
}

fn finish_json(reason: Option<FinishReason>) -> Value {
    reason.map_or(Value::Null, |r| Value::String(r.as_str().into()))
}

#[derive(Default)]
struct Choice {
    text: String,
    finish: Option<FinishReason>,
    logprobs: Vec<TokenLogprobs>,
}

/// Gathers a request's events into one response object.
pub struct Collector {
    meta: Meta,
    choices: Vec<Choice>,
}

impl Collector {
    pub fn new(request: &ParsedRequest) -> Self {
        let choices = (0..request.generate.n).map(|_| Choice::default()).collect();
        Self { meta: Meta::new(request), choices }
    }

    pub fn add(&mut self, event: Event) {
        match event {
            Event::Text { choice, text, logprobs } => {
                if let Some(c) = self.choices.get_mut(choice) {
                    c.text.push_str(&text);
                    c.logprobs.extend(logprobs);
                }
            }
            Event::Finished { choice, reason } => {
                if let Some(c) = self.choices.get_mut(choice) {
                    c.finish = Some(reason);
                }
            }
            Event::Done { .. } | Event::Error(_) => {}
        }
    }

    /// The text of each choice so far.
    pub fn texts(&self) -> impl Iterator<Item = &str> {
        self.choices.iter().map(|c| c.text.as_str())
    }

    pub fn finish(self, usage: &Usage, tokenizer: &Tokenizer) -> Value {
        let meta = &self.meta;
        let choices: Vec<Value> = self
            .choices
            .iter()
            .enumerate()
            .map(|(index, c)| {
                let logprobs = meta.logprobs_json(&c.logprobs, tokenizer, 0);
                match meta.endpoint {
                    Endpoint::Chat => json!({
                        "index": index,
                        "message": {"role": "assistant", "content": c.text, "refusal": null},
                        "logprobs": logprobs,
                        "finish_reason": finish_json(c.finish),
                    }),
                    Endpoint::Completion => json!({
                        "index": index,
                        "text": c.text,
                        "logprobs": logprobs,
                        "finish_reason": finish_json(c.finish),
                    }),
                }
            })
            .collect();
        json!({
            "id": meta.id,
            "object": meta.object(false),
            "created": meta.created,
            "model": meta.model,
            "system_fingerprint": null,
            "choices": choices,
            "usage": usage_json(usage),
        })
    }
}

/// Turns a request's events into the JSON payloads of server-sent events, in OpenAI's order:
/// a first chunk with the role (chat), content chunks, a chunk with `finish_reason` per
/// choice, and a usage chunk when asked for.
pub struct StreamEncoder {
    meta: Meta,
    include_usage: bool,
    /// Bytes of text sent per choice (the legacy endpoint's `text_offset`).
    offsets: Vec<usize>,
}

impl StreamEncoder {
    pub fn new(request: &ParsedRequest) -> Self {
        Self { meta: Meta::new(request), include_usage: request.include_usage, offsets: vec![0; request.generate.n] }
    }

    fn chunk(&self, choices: Value, usage: Option<Value>) -> String {
        let mut obj = json!({
            "id": self.meta.id,
            "object": self.meta.object(true),
            "created": self.meta.created,
            "model": self.meta.model,
            "system_fingerprint": null,
            "choices": choices,
        });
        if self.include_usage {
            obj["usage"] = usage.unwrap_or(Value::Null);
        }
        obj.to_string()
    }

    /// Chunks to send before any text: the assistant role of each choice (chat only).
    pub fn start(&self) -> Vec<String> {
        match self.meta.endpoint {
            Endpoint::Chat => (0..self.offsets.len())
                .map(|index| {
                    self.chunk(
                        json!([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]),
                        None,
                    )
                })
                .collect(),
            Endpoint::Completion => Vec::new(),
        }
    }

    /// The chunk for a text or finish event; `None` for events that have no chunk of their own.
    pub fn encode(&mut self, event: &Event, tokenizer: &Tokenizer) -> Option<String> {
        let (index, delta_text, logprobs, finish) = match event {
            Event::Text { choice, text, logprobs } => {
                let offset = self.offsets.get(*choice).copied().unwrap_or(0);
                let lp = self.meta.logprobs_json(logprobs, tokenizer, offset);
                if let Some(o) = self.offsets.get_mut(*choice) {
                    *o += text.len();
                }
                (*choice, Some(text.as_str()), lp, None)
            }
            Event::Finished { choice, reason } => (*choice, None, Value::Null, Some(*reason)),
            Event::Done { .. } | Event::Error(_) => return None,
        };
        let choice = match self.meta.endpoint {
            Endpoint::Chat => {
                let delta = match delta_text {
                    Some(t) => json!({"content": t}),
                    None => json!({}),
                };
                json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_json(finish)})
            }
            Endpoint::Completion => {
                json!({"index": index, "text": delta_text.unwrap_or(""), "logprobs": logprobs, "finish_reason": finish_json(finish)})
            }
        };
        Some(self.chunk(json!([choice]), None))
    }

    /// The last chunk, with no choices and the usage, when `stream_options.include_usage` asked for it.
    pub fn usage(&self, usage: &Usage) -> Option<String> {
        self.include_usage.then(|| self.chunk(json!([]), Some(usage_json(usage))))
    }
}
