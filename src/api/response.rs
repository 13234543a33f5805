//! Engine events shaped as OpenAI responses: `chat.completion` / `text_completion` objects for
//! whole answers, and `chat.completion.chunk` / `text_completion` chunks for streams.

use serde_json::{Value, json};

use super::reasoning::{Reasoning, Split, Splitter};
use super::tools::{self, ToolCall, ToolMode};
use super::{Endpoint, ParsedRequest};
use crate::engine::{Event, FinishReason, Matched, Usage};
use crate::sampling::TokenLogprobs;
use crate::text::Tokenizer;

/// The fields every object of one response shares.
struct Meta {
    id: String,
    created: u64,
    model: String,
    endpoint: Endpoint,
    logprobs: bool,
    tools: ToolMode,
    reasoning: Option<Reasoning>,
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
        Self {
            id,
            created,
            model: request.model.clone(),
            endpoint: request.endpoint,
            logprobs: request.logprobs,
            tools: request.tools.clone(),
            reasoning: request.reasoning.clone(),
        }
    }

    /// The tool call in a choice's whole text, with the content before it, per the request's
    /// tool mode.
    fn tool_call(&self, text: &str) -> Option<(String, ToolCall)> {
        match &self.tools {
            ToolMode::None => None,
            ToolMode::Auto => tools::detect(text),
            ToolMode::Forced { format, .. } => format.parse(text).map(|call| (String::new(), call)),
        }
    }

    /// A forced call's name and arguments so far (see `CallFormat::parts`); `None` for other
    /// tool modes.
    fn forced_parts<'t>(&self, text: &'t str, complete: bool) -> Option<(String, &'t str)> {
        match &self.tools {
            ToolMode::Forced { format, .. } => format.parts(text, complete),
            _ => None,
        }
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
                    let mut top: serde_json::Map<String, Value> =
                        lp.top.iter().map(|&(t, l)| (tokenizer.token_text(t), json!(l))).collect();
                    // As OpenAI and vLLM: the sampled token is always among them (so `logprobs: 0`
                    // still shows it, and there may be logprobs + 1 entries).
                    top.entry(tokens.last().and_then(Value::as_str).unwrap_or_default().to_owned())
                        .or_insert(json!(lp.logprob));
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

/// What stopped a choice, as both peers name it: SGLang's `matched_stop` (the end token's id
/// too) and vLLM's `stop_reason` (null for the model's own end token).
fn add_matched(choice: &mut Value, matched: Option<&Matched>) {
    let (sglang, vllm) = match matched {
        None => (Value::Null, Value::Null),
        Some(Matched::Eos(id)) => (json!(id), Value::Null),
        Some(Matched::Token(id)) => (json!(id), json!(id)),
        Some(Matched::Text(stop)) => (json!(stop), json!(stop)),
    };
    choice["matched_stop"] = sglang;
    choice["stop_reason"] = vllm;
}

/// A thinking model's reasoning, under both names clients read: `reasoning_content` (SGLang,
/// llama.cpp, DeepSeek's API) and `reasoning` (vLLM); null when it wrote none.
fn add_reasoning(message: &mut Value, reasoning: &str) {
    let value = if reasoning.is_empty() { Value::Null } else { Value::String(reasoning.to_owned()) };
    message["reasoning_content"] = value.clone();
    message["reasoning"] = value;
}

fn call_id() -> String {
    let mut rng = crate::sampling::Rng::from_entropy();
    format!("call_{:016x}", rng.next_u64())
}

#[derive(Default)]
struct Choice {
    text: String,
    finish: Option<FinishReason>,
    matched: Option<Matched>,
    logprobs: Vec<TokenLogprobs>,
}

/// Gathers a request's events into one response object.
pub struct Collector {
    meta: Meta,
    choices: Vec<Choice>,
}

impl Collector {
    pub fn new(request: &ParsedRequest) -> Self {
        let echo = request.echo.clone().unwrap_or_default();
        let choices = (0..request.generate.n).map(|_| Choice { text: echo.clone(), ..Choice::default() }).collect();
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
            Event::Finished { choice, reason, matched } => {
                if let Some(c) = self.choices.get_mut(choice) {
                    c.finish = Some(reason);
                    c.matched = matched;
                }
            }
            Event::Started | Event::Done { .. } | Event::Error(_) => {}
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
                let forced = matches!(meta.tools, ToolMode::Forced { .. });
                let (reasoning, text) = match &meta.reasoning {
                    Some(r) => {
                        let Split { reasoning, content } = r.split(&c.text);
                        (Some(reasoning), content)
                    }
                    None => (None, c.text.clone()),
                };
                let call = match c.finish {
                    Some(FinishReason::Stop) => meta.tool_call(&text),
                    // Cut off by max_tokens: the call so far, where a whole one would be.
                    Some(FinishReason::Length) => meta
                        .forced_parts(&text, false)
                        .map(|(name, arguments)| (String::new(), ToolCall { name, arguments: arguments.to_owned() })),
                    _ => None,
                };
                let mut choice = match (meta.endpoint, call) {
                    (Endpoint::Chat, Some((content, call))) => json!({
                        "index": index,
                        "message": {
                            "role": "assistant",
                            "content": if content.is_empty() { Value::Null } else { Value::String(content) },
                            "refusal": null,
                            "tool_calls": [tools::call_json(&call, &call_id())],
                        },
                        "logprobs": logprobs,
                        "finish_reason": if c.finish == Some(FinishReason::Stop) { json!("tool_calls") } else { finish_json(c.finish) },
                    }),
                    // A forced call's text is never content, even when too little of it came.
                    (Endpoint::Chat, None) if forced => json!({
                        "index": index,
                        "message": {"role": "assistant", "content": null, "refusal": null},
                        "logprobs": logprobs,
                        "finish_reason": finish_json(c.finish),
                    }),
                    (Endpoint::Chat, None) => json!({
                        "index": index,
                        "message": {"role": "assistant", "content": text, "refusal": null},
                        "logprobs": logprobs,
                        "finish_reason": finish_json(c.finish),
                    }),
                    (Endpoint::Completion, _) => json!({
                        "index": index,
                        "text": c.text,
                        "logprobs": logprobs,
                        "finish_reason": finish_json(c.finish),
                    }),
                };
                if let (Some(reasoning), Some(message)) = (reasoning, choice.get_mut("message")) {
                    add_reasoning(message, &reasoning);
                }
                add_matched(&mut choice, c.matched.as_ref());
                choice
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

/// What a choice's stream holds back.
enum Pending {
    /// Nothing: text streams as it comes.
    Free,
    /// Text that may still turn out to be a tool call (`tool_choice` "auto").
    MaybeCall(String, Vec<TokenLogprobs>),
    /// A forced call: its text so far, its id, where its arguments start in the text (`None`
    /// until its name is complete and its head chunk went out), and how many bytes of them
    /// were sent.
    Forced { text: String, id: String, args_at: Option<usize>, sent: usize },
}

/// Turns a request's events into the JSON payloads of server-sent events, in OpenAI's order:
/// a first chunk with the role (chat), content chunks, a chunk with `finish_reason` per
/// choice, and a usage chunk when asked for. A forced tool call streams as OpenAI's and vLLM's
/// do: a head `delta.tool_calls` (id, type, name, empty arguments) once the name is complete,
/// then the arguments piece by piece. A choice that may be a call (`tool_choice` "auto") holds
/// its text back until it is known; a call is then sent as head and arguments at once.
pub struct StreamEncoder {
    meta: Meta,
    include_usage: bool,
    /// Bytes of text sent per choice (the legacy endpoint's `text_offset`).
    offsets: Vec<usize>,
    pending: Vec<Pending>,
    /// Per choice, a thinking model's reasoning split, and the log-probabilities of text it
    /// holds back.
    splitters: Vec<Option<Splitter>>,
    held_logprobs: Vec<Vec<TokenLogprobs>>,
}

impl StreamEncoder {
    pub fn new(request: &ParsedRequest) -> Self {
        let n = request.generate.n;
        let chat = request.endpoint == Endpoint::Chat;
        let pending = (0..n)
            .map(|_| match &request.tools {
                ToolMode::Forced { .. } if chat => {
                    Pending::Forced { text: String::new(), id: call_id(), args_at: None, sent: 0 }
                }
                ToolMode::Auto if chat => Pending::MaybeCall(String::new(), Vec::new()),
                _ => Pending::Free,
            })
            .collect();
        let splitters = (0..n).map(|_| request.reasoning.as_ref().map(Reasoning::splitter)).collect();
        Self {
            meta: Meta::new(request),
            include_usage: request.include_usage,
            offsets: vec![0; n],
            pending,
            splitters,
            held_logprobs: vec![Vec::new(); n],
        }
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

    /// Chunks to send before any text: the assistant role of each choice (chat), or the
    /// echoed prompt (completions with `echo`).
    pub fn start(&mut self, request: &ParsedRequest, tokenizer: &Tokenizer) -> Vec<String> {
        match (self.meta.endpoint, &request.echo) {
            (Endpoint::Chat, _) => (0..self.offsets.len())
                .map(|index| {
                    self.chunk(
                        json!([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]),
                        None,
                    )
                })
                .collect(),
            (Endpoint::Completion, Some(prompt)) => {
                (0..self.offsets.len()).map(|index| self.content_chunk(index, prompt, &[], tokenizer)).collect()
            }
            (Endpoint::Completion, None) => Vec::new(),
        }
    }

    /// The chunks for a text or finish event (none for events without chunks of their own, or
    /// for text held back).
    pub fn encode(&mut self, event: &Event, tokenizer: &Tokenizer) -> Vec<String> {
        match event {
            Event::Text { choice, text, logprobs } => match self.splitters.get_mut(*choice) {
                Some(Some(splitter)) => {
                    let split = splitter.push(text);
                    self.split_text(*choice, split, logprobs, tokenizer)
                }
                _ => self.text(*choice, text, logprobs, tokenizer),
            },
            Event::Finished { choice, reason, matched } => {
                let mut chunks = match self.splitters.get_mut(*choice).and_then(Option::take) {
                    Some(mut splitter) => self.split_text(*choice, splitter.finish(), &[], tokenizer),
                    None => Vec::new(),
                };
                let mut reason = json!(reason.as_str());
                let pending =
                    self.pending.get_mut(*choice).map_or(Pending::Free, |p| std::mem::replace(p, Pending::Free));
                match pending {
                    Pending::Free => {}
                    Pending::MaybeCall(text, logprobs) => {
                        let call = if reason == "stop" { self.meta.tool_call(&text) } else { None };
                        match call {
                            Some((content, call)) => {
                                if !content.is_empty() {
                                    chunks.push(self.content_chunk(*choice, &content, &[], tokenizer));
                                }
                                chunks.push(self.call_head(*choice, &call_id(), &call.name));
                                chunks.push(self.call_arguments(*choice, &call.arguments));
                                reason = json!("tool_calls");
                            }
                            None if !text.is_empty() => {
                                chunks.push(self.content_chunk(*choice, &text, &logprobs, tokenizer))
                            }
                            None => {}
                        }
                    }
                    Pending::Forced { text, id, args_at, sent } => {
                        let complete = reason == "stop";
                        if let Some((name, arguments)) = self.meta.forced_parts(&text, complete) {
                            if args_at.is_none() {
                                chunks.push(self.call_head(*choice, &id, &name));
                            }
                            let rest = &arguments[sent.min(arguments.len())..];
                            if !rest.is_empty() {
                                chunks.push(self.call_arguments(*choice, rest));
                            }
                            if complete {
                                reason = json!("tool_calls");
                            }
                        }
                    }
                }
                let mut choice = match self.meta.endpoint {
                    Endpoint::Chat => json!({"index": choice, "delta": {}, "logprobs": null, "finish_reason": reason}),
                    Endpoint::Completion => {
                        json!({"index": choice, "text": "", "logprobs": null, "finish_reason": reason})
                    }
                };
                add_matched(&mut choice, matched.as_ref());
                chunks.push(self.chunk(json!([choice]), None));
                chunks
            }
            Event::Started | Event::Done { .. } | Event::Error(_) => Vec::new(),
        }
    }

    /// The chunks for what a piece of a thinking model's text added to its reasoning and to its
    /// answer; the log-probabilities go with the next chunk out.
    fn split_text(
        &mut self,
        choice: usize,
        split: Split,
        logprobs: &[TokenLogprobs],
        tokenizer: &Tokenizer,
    ) -> Vec<String> {
        let Some(held) = self.held_logprobs.get_mut(choice) else { return Vec::new() };
        held.extend_from_slice(logprobs);
        let mut chunks = Vec::new();
        if !split.reasoning.is_empty() {
            let logprobs = if split.content.is_empty() { std::mem::take(held) } else { Vec::new() };
            chunks.push(self.reasoning_chunk(choice, &split.reasoning, &logprobs, tokenizer));
        }
        if !split.content.is_empty() {
            let logprobs = std::mem::take(&mut self.held_logprobs[choice]);
            chunks.extend(self.text(choice, &split.content, &logprobs, tokenizer));
        }
        chunks
    }

    fn reasoning_chunk(&self, index: usize, text: &str, logprobs: &[TokenLogprobs], tokenizer: &Tokenizer) -> String {
        let logprobs = self.meta.logprobs_json(logprobs, tokenizer, 0);
        let mut delta = json!({});
        add_reasoning(&mut delta, text);
        self.chunk(json!([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": null}]), None)
    }

    fn text(&mut self, choice: usize, text: &str, logprobs: &[TokenLogprobs], tokenizer: &Tokenizer) -> Vec<String> {
        match self.pending.get_mut(choice) {
            Some(Pending::MaybeCall(held, held_logprobs)) => {
                held.push_str(text);
                held_logprobs.extend(logprobs.iter().cloned());
                if tools::could_be_call(held) {
                    return Vec::new();
                }
                // Not a call after all: send what was held, and stream from now on.
                let (text, logprobs) = (std::mem::take(held), std::mem::take(held_logprobs));
                self.pending[choice] = Pending::Free;
                vec![self.content_chunk(choice, &text, &logprobs, tokenizer)]
            }
            Some(Pending::Forced { text: so_far, id, args_at, sent }) => {
                so_far.push_str(text);
                // The head is parsed once: after it, each piece only extends the arguments.
                let head = match *args_at {
                    Some(_) => None,
                    None => {
                        let Some((name, arguments)) = self.meta.forced_parts(so_far, false) else { return Vec::new() };
                        *args_at = Some(arguments.as_ptr() as usize - so_far.as_ptr() as usize);
                        Some((id.clone(), name))
                    }
                };
                // They end where their object closes: what follows closes the call.
                let arguments = tools::arguments_so_far(&so_far[args_at.unwrap_or(so_far.len())..]);
                let piece = arguments[(*sent).min(arguments.len())..].to_owned();
                *sent = arguments.len().max(*sent);
                let mut chunks = Vec::new();
                if let Some((id, name)) = head {
                    chunks.push(self.call_head(choice, &id, &name));
                }
                if !piece.is_empty() {
                    chunks.push(self.call_arguments(choice, &piece));
                }
                chunks
            }
            _ => vec![self.content_chunk(choice, text, logprobs, tokenizer)],
        }
    }

    /// The first chunk of a call: its id, type and name, with empty arguments.
    fn call_head(&self, choice: usize, id: &str, name: &str) -> String {
        let head = json!({"index": 0, "id": id, "type": "function", "function": {"name": name, "arguments": ""}});
        self.chunk(
            json!([{"index": choice, "delta": {"tool_calls": [head]}, "logprobs": null, "finish_reason": null}]),
            None,
        )
    }

    /// A piece of a call's arguments.
    fn call_arguments(&self, choice: usize, piece: &str) -> String {
        let args = json!({"index": 0, "function": {"arguments": piece}});
        self.chunk(
            json!([{"index": choice, "delta": {"tool_calls": [args]}, "logprobs": null, "finish_reason": null}]),
            None,
        )
    }

    fn content_chunk(&mut self, index: usize, text: &str, logprobs: &[TokenLogprobs], tokenizer: &Tokenizer) -> String {
        let offset = self.offsets.get(index).copied().unwrap_or(0);
        let logprobs = self.meta.logprobs_json(logprobs, tokenizer, offset);
        if let Some(o) = self.offsets.get_mut(index) {
            *o += text.len();
        }
        let choice = match self.meta.endpoint {
            Endpoint::Chat => {
                json!({"index": index, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": null})
            }
            Endpoint::Completion => json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": null}),
        };
        self.chunk(json!([choice]), None)
    }

    /// The last chunk, with no choices and the usage, when `stream_options.include_usage` asked for it.
    pub fn usage(&self, usage: &Usage) -> Option<String> {
        self.include_usage.then(|| self.chunk(json!([]), Some(usage_json(usage))))
    }
}
