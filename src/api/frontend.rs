use std::sync::Arc;

use serde_json::Value;

use super::ApiError;
use super::compat;
use super::constraints;
use super::params::{self, Fields, wrong_type};
use super::reasoning::{Markers, Reasoning};
use super::tools::{self, CallFormat, ToolMode, ToolsIn};
use crate::constraint::{Compiler, Prepared};
use crate::engine::{Engine, EngineError, ErrorKind, GenerateRequest, RequestHandle, SubmitError, ThinkingBudget};
use crate::model::ModelInfo;
use crate::sampling::SamplingParams;
use crate::text::{ChatTemplate, Encoded, Tokenizer};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/chat/completions`: messages through the chat template.
    Chat,
    /// `/v1/completions`: a raw prompt.
    Completion,
}

impl Endpoint {
    /// The request field that holds the prompt.
    pub fn prompt_param(self) -> &'static str {
        match self {
            Endpoint::Chat => "messages",
            Endpoint::Completion => "prompt",
        }
    }
}

/// Request limits that protect the box; each violation is a 400 naming the field.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_messages: usize,
    /// Most prompt tokens (0: the model's context).
    pub max_prompt_tokens: usize,
    /// Largest `max_tokens` a request may ask for (0: the model's context).
    pub max_completion_tokens: usize,
    pub max_n: usize,
    pub max_stop_strings: usize,
    pub max_stop_len: usize,
    pub max_top_logprobs: usize,
    /// Longest constraint source (regex, grammar, JSON schema) in bytes.
    pub max_constraint_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_messages: 256,
            max_prompt_tokens: 0,
            max_completion_tokens: 0,
            max_n: 8,
            max_stop_strings: 16,
            max_stop_len: 256,
            max_top_logprobs: 20,
            max_constraint_bytes: 32 << 10,
        }
    }
}

/// A validated request, ready for the engine.
#[derive(Debug)]
pub struct ParsedRequest {
    pub endpoint: Endpoint,
    pub model: String,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk carries the usage.
    pub include_usage: bool,
    /// Logprobs requested in the endpoint's own shape.
    pub logprobs: bool,
    /// Whether the answer may be, or must be, a tool call.
    pub tools: ToolMode,
    /// The prompt's text, to put before each choice's text (`echo` on `/v1/completions`).
    pub echo: Option<String>,
    /// How a thinking model's reasoning is split out of each choice's text, unless it is not.
    pub reasoning: Option<Reasoning>,
    pub generate: GenerateRequest,
}

/// A chat template, where it takes the request's tools, and how the model writes a call.
struct Template {
    jinja: ChatTemplate,
    tools_in: ToolsIn,
    call_format: CallFormat,
    /// Whether it renders a system message; where not (Gemma 2's refuses one), chatd's own
    /// instructions go before the first user message's text instead.
    takes_system: bool,
}

impl Template {
    fn new(source: &str, tokenizer: &Tokenizer, tool_call_markers: Option<(u32, u32)>) -> anyhow::Result<Self> {
        let jinja = ChatTemplate::new(source, tokenizer.bos_token.as_deref(), tokenizer.eos_token.as_deref())?;
        let tools_in = ToolsIn::of(source);
        let call_format = CallFormat::of(source, tools_in != ToolsIn::Nowhere, tokenizer, tool_call_markers);
        let takes_system = renders_a_system_message(&jinja);
        Ok(Template { jinja, tools_in, call_format, takes_system })
    }

    /// Adds chatd's own instructions (its tool prompt) where the template renders them.
    fn add_instructions(&self, messages: &mut Vec<Value>, text: &str) {
        add_instructions(messages, text, self.takes_system);
    }
}

/// Puts `text` at the start of the system message (adding one if the first message is not), or,
/// for a template that renders none, at the start of the first user message.
fn add_instructions(messages: &mut Vec<Value>, text: &str, in_system: bool) {
    let role = if in_system { "system" } else { "user" };
    let at = messages.iter().position(|m| m["role"] == role).filter(|&i| !in_system || i == 0);
    match at.and_then(|i| messages[i].as_object_mut()) {
        Some(message) => {
            let content = message.get("content").and_then(Value::as_str).unwrap_or_default();
            let merged = if content.is_empty() { text.to_owned() } else { format!("{text}\n\n{content}") };
            message.insert("content".into(), Value::String(merged));
        }
        None => messages.insert(0, serde_json::json!({"role": role, "content": text})),
    }
}

/// Whether a template renders a system message's text, unless it renders a lone user message
/// but refuses or drops a system message before it. (A template that renders neither without
/// the request's tools or arguments is taken at its word: as rendering one.)
fn renders_a_system_message(jinja: &ChatTemplate) -> bool {
    const PROBE: &str = "chatd checks that the template renders a system message";
    let user = serde_json::json!({"role": "user", "content": "Hello"});
    let render = |messages: Value| jinja.render(&messages, None, true, None);
    render(Value::Array(vec![user.clone()])).is_err()
        || render(serde_json::json!([{"role": "system", "content": PROBE}, user])).is_ok_and(|t| t.contains(PROBE))
}

/// Turns OpenAI request bodies into engine requests for one served model: parsing, validation,
/// chat template, tokenization, and the context-length check.
pub struct Frontend {
    served_name: String,
    info: ModelInfo,
    tokenizer: Arc<Tokenizer>,
    template: Option<Template>,
    /// The model's template for requests with tools, when it ships one of its own.
    tool_use_template: Option<Template>,
    /// Compiles constraints; the error says why this tokenizer cannot have any.
    constraints: Result<Compiler, String>,
    /// A thinking model's markers.
    markers: Option<Markers>,
    /// Replaced on reload (SIGHUP); read once per request.
    limits: std::sync::RwLock<Limits>,
}

impl Frontend {
    pub fn new(engine: &Engine, served_name: Option<String>, limits: Limits) -> anyhow::Result<Self> {
        let tokenizer = engine.tokenizer().clone();
        let info = engine.info().clone();
        let compile = |source: &Option<String>| -> anyhow::Result<Option<Template>> {
            source.as_deref().map(|source| Template::new(source, &tokenizer, info.markers.tool_call)).transpose()
        };
        let template = compile(&tokenizer.chat_template)?;
        let tool_use_template = compile(&tokenizer.tool_use_template)?;
        let served_name = served_name.unwrap_or_else(|| info.name.clone());
        let constraints = Compiler::new(&tokenizer, &info.eos_token_ids, info.vocab_size).map_err(|e| {
            log::warn!("constrained decoding is unavailable: {e:#}");
            format!("{e:#}")
        });
        let markers = Markers::of(&tokenizer, info.markers.reasoning);
        if let Some(m) = &markers {
            log::info!("thinking model: reasoning between {} and {} goes to reasoning_content", m.start, m.end);
        }
        Ok(Self {
            served_name,
            info,
            tokenizer,
            template,
            tool_use_template,
            constraints,
            markers,
            limits: std::sync::RwLock::new(limits),
        })
    }

    pub fn limits(&self) -> Limits {
        self.limits.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_limits(&self, limits: Limits) {
        *self.limits.write().unwrap_or_else(|e| e.into_inner()) = limits;
    }

    pub fn served_name(&self) -> &str {
        &self.served_name
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    /// Parses and validates a request body for `endpoint`.
    pub fn parse(&self, endpoint: Endpoint, body: &[u8]) -> Result<ParsedRequest, ApiError> {
        let mut obj = params::object(body)?;
        // Taken out whole, so that the messages reach the template without being copied.
        let messages = obj.shift_remove("messages");
        let f = Fields::new(&obj);
        let limits = self.limits();
        let model = self.model(&f)?;
        let (tool_mode, tools_value) = match endpoint {
            Endpoint::Chat => self.tools(&f)?,
            Endpoint::Completion => (ToolMode::None, None),
        };
        let mut opened = false;
        let prompt = match endpoint {
            Endpoint::Chat => {
                let text = self.chat_text(messages, &f, &limits, tools_value, &tool_mode)?;
                opened = self.markers.as_ref().is_some_and(|m| m.opened_by(&text));
                // The template writes the BOS itself: none is added unless asked (as vLLM).
                let add_special = f.bool("add_special_tokens")?.unwrap_or(false);
                self.encode_prompt(&text, "messages", &limits, add_special)?
            }
            Endpoint::Completion => self.completion_prompt(&f, &limits)?,
        };
        let echo = match endpoint {
            Endpoint::Completion => self.echo(&f, &prompt)?,
            Endpoint::Chat => None,
        };
        let prompt_param = endpoint.prompt_param();
        let context = self.info.context_length;
        let max_tokens_key =
            if f.get("max_completion_tokens").is_some() { "max_completion_tokens" } else { "max_tokens" };
        // Clients that send both (the new name and the old) are fine while they agree.
        if let (Some(new), Some(old)) = (f.get("max_completion_tokens"), f.get("max_tokens"))
            && new != old
        {
            return Err(ApiError::invalid(
                "max_tokens",
                format!("`max_tokens` ({old}) and `max_completion_tokens` ({new}) disagree; send one of them"),
            ));
        }
        let max_tokens = match f.int(max_tokens_key, 1, i64::MAX)? {
            Some(n) => {
                let n = n as usize;
                if limits.max_completion_tokens > 0 && n > limits.max_completion_tokens {
                    return Err(ApiError::invalid(
                        max_tokens_key,
                        format!(
                            "`{max_tokens_key}` must be at most {} on this server, got {n}",
                            limits.max_completion_tokens
                        ),
                    ));
                }
                if prompt.len().saturating_add(n) > context {
                    return Err(ApiError::context_length(
                        prompt_param,
                        format!(
                            "This model's maximum context length is {context} tokens. However, you requested {} tokens \
                         ({} in the {prompt_param}, {n} in the completion). Please reduce the length of the {prompt_param} or completion.",
                            prompt.len().saturating_add(n),
                            prompt.len()
                        ),
                    ));
                }
                n
            }
            None if limits.max_completion_tokens > 0 => (context - prompt.len()).min(limits.max_completion_tokens),
            None => context - prompt.len(),
        };
        let stream = f.bool("stream")?.unwrap_or(false);
        let include_usage = match f.get("stream_options") {
            None => false,
            Some(Value::Object(opts)) => {
                if !stream {
                    return Err(ApiError::invalid(
                        "stream_options",
                        "`stream_options` is only allowed when `stream` is true",
                    ));
                }
                let opts = Fields::new(opts);
                let include = opts.bool("include_usage").map_err(|mut e| {
                    e.param = Some("stream_options.include_usage".into());
                    e
                })?;
                compat::refuse_unread(&opts, "stream_options.")?;
                include.unwrap_or(false)
            }
            Some(other) => return Err(wrong_type("stream_options", "an object", other)),
        };
        let (logprobs, top_logprobs) = self.logprobs(endpoint, &f, &limits)?;
        let sampling = self.sampling(&f)?;
        let min_tokens = f.int("min_tokens", 0, i64::MAX)?.unwrap_or(0) as usize;
        if min_tokens > max_tokens {
            return Err(ApiError::invalid(
                "min_tokens",
                format!("`min_tokens` ({min_tokens}) must not exceed max_tokens ({max_tokens})"),
            ));
        }
        let stop_token_ids = match f.get("stop_token_ids") {
            None => Vec::new(),
            Some(Value::Array(items)) => {
                items.iter().map(|v| self.token_id(v, "stop_token_ids")).collect::<Result<_, _>>()?
            }
            Some(other) => {
                return Err(wrong_type("stop_token_ids", "an array of token ids", other));
            }
        };
        let constraint = self.constraint(&f, &tool_mode, tools_value, &limits)?;
        let (reasoning, thinking_budget) = match endpoint {
            Endpoint::Chat => self.reasoning(&f, opened, &tool_mode, constraint.is_some())?,
            Endpoint::Completion => (None, None),
        };
        let generate = GenerateRequest {
            prompt,
            n: f.int("n", 1, limits.max_n as i64)?.unwrap_or(1) as usize,
            max_tokens,
            min_tokens,
            ignore_eos: f.bool("ignore_eos")?.unwrap_or(false),
            stop: f.strings("stop", limits.max_stop_strings, limits.max_stop_len)?,
            stop_token_ids,
            sampling,
            logprobs: logprobs.then_some(top_logprobs),
            timeout: f.number("timeout", 0.001, 86_400.0)?.map(std::time::Duration::from_secs_f32),
            constraint,
            keep_stop: f.bool("include_stop_str_in_output")?.unwrap_or(false)
                | f.bool("no_stop_trim")?.unwrap_or(false),
            thinking_budget,
            incremental: stream,
        };
        if echo.is_some() && logprobs {
            return Err(ApiError::invalid(
                "echo",
                "`echo` with `logprobs` would need the prompt's log-probabilities, which chatd does not compute",
            ));
        }
        compat::refuse_unread(&f, "")?;
        Ok(ParsedRequest {
            endpoint,
            model,
            stream,
            include_usage,
            logprobs,
            tools: tool_mode,
            echo,
            reasoning,
            generate,
        })
    }

    /// Hands a parsed request to the engine, mapping refusals to API errors.
    pub fn submit(&self, engine: &Engine, request: &ParsedRequest) -> Result<RequestHandle, ApiError> {
        engine.submit(request.generate.clone()).map_err(|e| match e {
            SubmitError::Overloaded => ApiError::overloaded(e.to_string()),
            SubmitError::Stopped => ApiError::unavailable(e.to_string()),
            SubmitError::ContextLength(m) => ApiError::context_length(request.endpoint.prompt_param(), m),
            SubmitError::TooManyChoices(m) => ApiError::invalid("n", m),
        })
    }

    /// The API error for a request the engine gave up on.
    pub fn engine_error(error: &EngineError) -> ApiError {
        match error.kind {
            ErrorKind::Overloaded => ApiError::overloaded(error.message()),
            ErrorKind::Timeout => ApiError::timeout(error.message()),
            ErrorKind::TooLarge => ApiError::context_length("max_tokens", error.message()),
            ErrorKind::Constraint => ApiError::constraint_failed(error.message()),
            ErrorKind::Internal => ApiError::internal(error.message()),
            ErrorKind::Unavailable => ApiError::unavailable(error.message()),
        }
    }

    /// The served model's name; a request naming another is a 404.
    pub(super) fn model(&self, f: &Fields<'_>) -> Result<String, ApiError> {
        match f.str("model")? {
            Some(name) if name != self.served_name => Err(ApiError::model_not_found(name)),
            _ => Ok(self.served_name.clone()),
        }
    }

    /// `tools` (each a function with a name) and `tool_choice`.
    pub(super) fn tools<'a>(&self, f: &Fields<'a>) -> Result<(ToolMode, Option<&'a Value>), ApiError> {
        let tools = match f.get("tools") {
            None => None,
            Some(Value::Array(items)) if items.len() > tools::MAX_TOOLS => {
                return Err(ApiError::invalid(
                    "tools",
                    format!("`tools` may hold at most {} tools, got {}", tools::MAX_TOOLS, items.len()),
                ));
            }
            Some(v @ Value::Array(items)) => {
                for (i, tool) in items.iter().enumerate() {
                    let name = tool.get("function").and_then(|f| f.get("name")).and_then(Value::as_str);
                    if tool.get("type").and_then(Value::as_str) != Some("function") || name.is_none() {
                        return Err(ApiError::invalid(
                            format!("tools[{i}]"),
                            format!("`tools[{i}]` must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"),
                        ));
                    }
                }
                Some(v)
            }
            Some(other) => return Err(wrong_type("tools", "an array", other)),
        };
        let default = CallFormat::default();
        let format = self.template_for(tools.is_some()).map_or(&default, |t| &t.call_format);
        Ok((tools::tool_mode(tools, f.get("tool_choice"), format)?, tools))
    }

    /// The one constraint a request may carry, compiled.
    fn constraint(
        &self,
        f: &Fields<'_>,
        mode: &ToolMode,
        tools: Option<&Value>,
        limits: &Limits,
    ) -> Result<Option<Prepared>, ApiError> {
        let mut given = constraints::given(f, limits.max_constraint_bytes)?;
        if let ToolMode::Forced { names, format } = mode {
            given.push(("tool_choice".to_owned(), format.spec(tools, names)));
        }
        let (field, spec) = match given.len() {
            0 => return Ok(None),
            1 => given.pop().expect("one"),
            _ => {
                let names: Vec<String> = given.iter().map(|(n, _)| format!("`{n}`")).collect();
                return Err(ApiError::invalid(
                    given[1].0.as_str(),
                    format!("only one constraint per request, but {} were given", names.join(" and ")),
                ));
            }
        };
        let compiler = self.constraints.as_ref().map_err(|e| {
            ApiError::invalid(&field, format!("constrained decoding is unavailable for this model's tokenizer: {e}"))
        })?;
        compiler
            .compile(&spec, limits.max_constraint_bytes)
            .map(Some)
            .map_err(|e| ApiError::invalid(&field, format!("invalid `{field}`: {e}")))
    }

    /// A chat request's reasoning split (SGLang's `separate_reasoning`, on by default for a
    /// thinking model) and thinking budget (`reasoning_budget`). A forced tool call or other
    /// constraint leaves no room to think: the split is off and a budget is refused.
    fn reasoning(
        &self,
        f: &Fields<'_>,
        opened: bool,
        tools: &ToolMode,
        constrained: bool,
    ) -> Result<(Option<Reasoning>, Option<ThinkingBudget>), ApiError> {
        let separate = f.bool("separate_reasoning")?.unwrap_or(true);
        let budget = f.int("reasoning_budget", 0, i64::MAX)?.map(|n| n as usize);
        let Some(markers) = &self.markers else {
            return match budget {
                Some(_) => Err(ApiError::invalid(
                    "reasoning_budget",
                    "this model is not a thinking model (its tokenizer has no <think> or [THINK] token)",
                )),
                None => Ok((None, None)),
            };
        };
        if budget.is_some() && constrained {
            return Err(ApiError::invalid(
                "reasoning_budget",
                "a constrained answer (tool_choice, response_format, regex, grammar...) starts at once, without reasoning",
            ));
        }
        let split = separate && !constrained && !matches!(tools, ToolMode::Forced { .. });
        let thinking =
            budget.map(|tokens| ThinkingBudget { tokens, start: markers.start_id, end: markers.end_id, opened });
        Ok((split.then(|| Reasoning { markers: markers.clone(), opened }), thinking))
    }

    /// The template a chat is rendered with: as transformers, the model's tool-use template
    /// when tools are offered and it has one.
    fn template_for(&self, tools_offered: bool) -> Option<&Template> {
        match tools_offered {
            true => self.tool_use_template.as_ref().or(self.template.as_ref()),
            false => self.template.as_ref(),
        }
    }

    /// The chat request's messages rendered by the model's template.
    pub(super) fn chat_text(
        &self,
        messages: Option<Value>,
        f: &Fields<'_>,
        limits: &Limits,
        tools: Option<&Value>,
        mode: &ToolMode,
    ) -> Result<String, ApiError> {
        let messages = match messages {
            None | Some(Value::Null) => return Err(ApiError::invalid("messages", "`messages` is required")),
            Some(Value::Array(list)) if list.is_empty() => {
                return Err(ApiError::invalid("messages", "`messages` must contain at least one message"));
            }
            Some(Value::Array(list)) if list.len() > limits.max_messages => {
                return Err(ApiError::invalid(
                    "messages",
                    format!(
                        "`messages` may hold at most {} messages on this server, got {}",
                        limits.max_messages,
                        list.len()
                    ),
                ));
            }
            Some(Value::Array(list)) => list,
            Some(other) => return Err(wrong_type("messages", "an array", &other)),
        };
        let mut normalized =
            messages.into_iter().enumerate().map(|(i, m)| normalize_message(i, m)).collect::<Result<Vec<_>, _>>()?;
        // The messages' own text already bounds the prompt from below: a chat far over the
        // budget is refused before the template copies it (which would cost more than parsing).
        let text_bytes: usize = normalized.iter().filter_map(|m| m["content"].as_str()).map(str::len).sum();
        if let Some(at_least) = self.tokenizer.fewest_tokens(text_bytes).filter(|&n| n > self.prompt_budget(limits)) {
            return Err(self.prompt_too_long("messages", limits, format!("at least {at_least}")));
        }
        // With `tool_choice: "none"` the tools reach only a template that takes the variable.
        let offered = tools.filter(|_| *mode != ToolMode::None);
        let template = self.template_for(offered.is_some()).ok_or_else(|| {
            ApiError::invalid(
                "messages",
                "this model has no chat template (chat_template.jinja or tokenizer_config.json); use /v1/completions",
            )
        })?;
        match (offered, template.tools_in) {
            (Some(tools), ToolsIn::Nowhere) => template.add_instructions(&mut normalized, &tools::system_prompt(tools)),
            (Some(tools), ToolsIn::SystemMessage) => {
                add_system_field(&mut normalized, "tools", tools::system_message_tools(tools))
            }
            _ => {}
        }
        let continue_final = f.bool("continue_final_message")?.unwrap_or(false);
        let add_generation_prompt = f.bool("add_generation_prompt")?.unwrap_or(!continue_final);
        if continue_final && add_generation_prompt {
            return Err(ApiError::invalid(
                "continue_final_message",
                "`continue_final_message` continues the last message, so `add_generation_prompt` must be false",
            ));
        }
        let kwargs = match f.get("chat_template_kwargs") {
            None => None,
            Some(v @ Value::Object(_)) => Some(v),
            Some(other) => return Err(wrong_type("chat_template_kwargs", "an object", other)),
        };
        // Converting tools for the template costs as much as parsing them: only for templates
        // that use them.
        let tools = tools.filter(|_| template.tools_in == ToolsIn::Variable);
        let last = continue_final.then(|| final_message_text(&normalized)).transpose()?;
        let render = |messages: &Value, tools: Option<&Value>| {
            template.jinja.render(messages, tools, add_generation_prompt, kwargs).map_err(|e| {
                ApiError::invalid("messages", format!("the model's chat template rejected the messages: {e}"))
            })
        };
        let mut messages = Value::Array(normalized);
        let mut text = render(&messages, tools)?;
        // A template that takes `tools` may still leave them out of the prompt (in some
        // branches, for some roles): the model must see them, so chatd's tool prompt is added.
        if let Some(offered) = offered.filter(|o| template.tools_in == ToolsIn::Variable && !tools::all_in(o, &text)) {
            log::debug!("the chat template took the tools but did not render them: chatd's tool prompt is added");
            if let Value::Array(list) = &mut messages {
                template.add_instructions(list, &tools::system_prompt(offered));
            }
            text = render(&messages, tools)?;
        }
        if let Some(last) = last {
            cut_after_final_message(&mut text, &last)?;
        }
        Ok(text)
    }

    /// The prompt's tokens, or `context_length_exceeded` without tokenizing more of it than
    /// needed to know (see `Tokenizer::encode_within`).
    /// `add_special`: with what the tokenizer's post-processor adds around a text (a BOS).
    pub(super) fn encode_prompt(
        &self,
        text: &str,
        param: &str,
        limits: &Limits,
        add_special: bool,
    ) -> Result<Vec<u32>, ApiError> {
        let budget = self.prompt_budget(limits);
        let encoded = self.tokenizer.encode_within(text, budget, add_special);
        match encoded.map_err(|e| ApiError::internal(format!("{e:#}")))? {
            Encoded::Ids(ids) => Ok(ids),
            Encoded::TooLong { tokens, exact: true } => Err(self.prompt_too_long(param, limits, tokens.to_string())),
            Encoded::TooLong { tokens, exact: false } => {
                Err(self.prompt_too_long(param, limits, format!("at least {tokens}")))
            }
        }
    }

    /// Most prompt tokens a request may have: the server's limit, and room in the context for
    /// at least one generated token.
    fn prompt_budget(&self, limits: &Limits) -> usize {
        let context = self.info.context_length.saturating_sub(1);
        if limits.max_prompt_tokens > 0 { limits.max_prompt_tokens.min(context) } else { context }
    }

    /// `context_length_exceeded` for a prompt of `tokens` tokens (a count, or "at least N").
    fn prompt_too_long(&self, param: &str, limits: &Limits, tokens: String) -> ApiError {
        let limit = if limits.max_prompt_tokens > 0 && limits.max_prompt_tokens < self.info.context_length {
            format!("This server accepts at most {} prompt tokens", limits.max_prompt_tokens)
        } else {
            format!("This model's maximum context length is {} tokens", self.info.context_length)
        };
        ApiError::context_length(
            param,
            format!(
                "{limit}. However, your {param} resulted in {tokens} tokens. Please reduce the length of the {param}."
            ),
        )
    }

    fn completion_prompt(&self, f: &Fields<'_>, limits: &Limits) -> Result<Vec<u32>, ApiError> {
        let prompt = match f.get("prompt") {
            None => return Err(ApiError::invalid("prompt", "`prompt` is required")),
            Some(p) => p,
        };
        // As vLLM: a text prompt gets what the tokenizer's post-processor adds (Llama's BOS).
        let add_special = f.bool("add_special_tokens")?.unwrap_or(true);
        let ids = match prompt {
            Value::String(s) => self.encode_prompt(s, "prompt", limits, add_special)?,
            Value::Array(items) if items.len() == 1 && items[0].is_string() => {
                self.encode_prompt(items[0].as_str().unwrap_or_default(), "prompt", limits, add_special)?
            }
            Value::Array(items) if items.iter().all(Value::is_number) => {
                let ids: Vec<u32> = items.iter().map(|v| self.token_id(v, "prompt")).collect::<Result<_, _>>()?;
                if ids.len() > self.prompt_budget(limits) {
                    return Err(self.prompt_too_long("prompt", limits, ids.len().to_string()));
                }
                ids
            }
            Value::Array(_) => {
                return Err(ApiError::invalid(
                    "prompt",
                    "`prompt` must be a string, a list of one string, or a list of token ids",
                ));
            }
            other => return Err(wrong_type("prompt", "a string or an array", other)),
        };
        if ids.is_empty() {
            return Err(ApiError::invalid("prompt", "`prompt` must not be empty"));
        }
        Ok(ids)
    }

    /// The prompt's text when `echo` asks for it: as sent, or decoded from token ids.
    fn echo(&self, f: &Fields<'_>, prompt: &[u32]) -> Result<Option<String>, ApiError> {
        if !f.bool("echo")?.unwrap_or(false) {
            return Ok(None);
        }
        let text = match f.get("prompt") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(items)) if items.len() == 1 && items[0].is_string() => {
                items[0].as_str().unwrap_or_default().to_owned()
            }
            _ => self.tokenizer.decode(prompt).map_err(|e| ApiError::internal(format!("{e:#}")))?,
        };
        Ok(Some(text))
    }

    pub(super) fn token_id(&self, v: &Value, param: &str) -> Result<u32, ApiError> {
        match v.as_u64() {
            Some(id) if (id as usize) < self.info.vocab_size => Ok(id as u32),
            _ => Err(ApiError::invalid(
                param,
                format!("`{param}` holds {v}, which is not a token id below {}", self.info.vocab_size),
            )),
        }
    }

    fn logprobs(&self, endpoint: Endpoint, f: &Fields<'_>, limits: &Limits) -> Result<(bool, usize), ApiError> {
        let max = limits.max_top_logprobs as i64;
        match endpoint {
            Endpoint::Chat => {
                let wanted = f.bool("logprobs")?.unwrap_or(false);
                let top = f.int("top_logprobs", 0, max)?;
                if top.is_some() && !wanted {
                    return Err(ApiError::invalid("top_logprobs", "`top_logprobs` requires `logprobs` to be true"));
                }
                Ok((wanted, top.unwrap_or(0) as usize))
            }
            // The legacy endpoint's `logprobs` is the number of alternatives.
            Endpoint::Completion => Ok(match f.int("logprobs", 0, max.min(5))? {
                Some(n) => (true, n as usize),
                None => (false, 0),
            }),
        }
    }

    fn sampling(&self, f: &Fields<'_>) -> Result<SamplingParams, ApiError> {
        let info = &self.info;
        let top_k = match f.int("top_k", -1, i64::from(u32::MAX))? {
            Some(k) if k > 0 => k as usize,
            Some(_) => 0,
            None => info.defaults.top_k,
        };
        let repetition_penalty = f.number("repetition_penalty", 0.0, 10.0)?.unwrap_or(info.defaults.repetition_penalty);
        if repetition_penalty <= 0.0 {
            return Err(ApiError::invalid("repetition_penalty", "`repetition_penalty` must be greater than 0"));
        }
        let top_p = f.number("top_p", 0.0, 1.0)?.unwrap_or(info.defaults.top_p);
        if top_p <= 0.0 {
            return Err(ApiError::invalid("top_p", "`top_p` must be greater than 0"));
        }
        let logit_bias = match f.get("logit_bias") {
            None => Vec::new(),
            Some(Value::Object(map)) => {
                // Keys such as "12" and "012" name the same token: the last one counts, so the
                // work per token is bounded by the vocabulary, not by the request.
                let mut biases = std::collections::BTreeMap::new();
                let mut bad = Vec::new();
                for (k, v) in map {
                    let token = k.parse::<u32>().ok().filter(|&t| (t as usize) < info.vocab_size);
                    let bias = v.as_f64().filter(|b| (-100.0..=100.0).contains(b));
                    match (token, bias) {
                        (Some(token), Some(bias)) => {
                            biases.insert(token, bias as f32);
                        }
                        _ => bad.push(k.as_str()),
                    }
                }
                if !bad.is_empty() {
                    return Err(ApiError::invalid("logit_bias", logit_bias_error(&bad, info.vocab_size)));
                }
                biases.into_iter().collect()
            }
            Some(other) => return Err(wrong_type("logit_bias", "an object", other)),
        };
        Ok(SamplingParams {
            temperature: f.number("temperature", 0.0, 2.0)?.unwrap_or(info.defaults.temperature),
            top_p,
            top_k,
            min_p: f.number("min_p", 0.0, 1.0)?.unwrap_or(0.0),
            presence_penalty: f.number("presence_penalty", -2.0, 2.0)?.unwrap_or(0.0),
            frequency_penalty: f.number("frequency_penalty", -2.0, 2.0)?.unwrap_or(0.0),
            repetition_penalty,
            logit_bias,
            seed: f.int("seed", i64::MIN, i64::MAX)?.map(|s| s as u64),
        })
    }
}

/// The text of the last message, which `continue_final_message` continues: it must be the
/// assistant's and hold text.
fn final_message_text(messages: &[Value]) -> Result<String, ApiError> {
    let last = messages.last().expect("messages are not empty");
    let text = last.get("content").and_then(Value::as_str).unwrap_or_default().trim();
    if last.get("role").and_then(Value::as_str) != Some("assistant") || text.is_empty() {
        return Err(ApiError::invalid(
            "continue_final_message",
            "`continue_final_message` needs the last message to be the assistant's, with text to continue",
        ));
    }
    Ok(text.to_owned())
}

/// Cuts the rendered prompt right after the last message's text, dropping what the template
/// puts after a finished turn (its end-of-turn marker), as transformers does for
/// `continue_final_message`.
fn cut_after_final_message(text: &mut String, last: &str) -> Result<(), ApiError> {
    let at = text.rfind(last).ok_or_else(|| {
        ApiError::invalid(
            "continue_final_message",
            "the chat template does not render the last message's text as it is, so it cannot be continued",
        )
    })?;
    text.truncate(at + last.len());
    Ok(())
}

/// Sets `field` of the system message, adding an empty one if there is none.
fn add_system_field(messages: &mut Vec<Value>, field: &str, value: String) {
    if messages.first().and_then(|m| m.get("role")).and_then(Value::as_str) != Some("system") {
        messages.insert(0, serde_json::json!({"role": "system", "content": ""}));
    }
    if let Some(Value::Object(system)) = messages.first_mut() {
        system.insert(field.to_owned(), Value::String(value));
    }
}

/// Checks one message and flattens an array of text parts into one string for the template.
fn normalize_message(index: usize, message: Value) -> Result<Value, ApiError> {
    let param = format!("messages[{index}]");
    let mut obj = match message {
        Value::Object(obj) => obj,
        other => return Err(wrong_type(&param, "an object", &other)),
    };
    if let Some(calls) = obj.get_mut("tool_calls").filter(|c| !c.is_null()) {
        parse_call_arguments(&format!("{param}.tool_calls"), calls)?;
    }
    let role = match obj.get("role") {
        Some(Value::String(r)) => r.as_str(),
        Some(other) => return Err(wrong_type(&format!("{param}.role"), "a string", other)),
        None => {
            return Err(ApiError::invalid(format!("{param}.role"), format!("`{param}.role` is required")));
        }
    };
    if !matches!(role, "system" | "developer" | "user" | "assistant" | "tool") {
        return Err(ApiError::invalid(
            format!("{param}.role"),
            format!("`{param}.role` must be one of system, developer, user, assistant, tool; got {role:?}"),
        ));
    }
    let content_param = format!("{param}.content");
    let joined = match obj.get("content") {
        // Already what the template takes: kept as it is, not copied.
        Some(Value::String(_)) => return Ok(Value::Object(obj)),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                let part_param = format!("{content_param}[{j}]");
                match (part.get("type").and_then(Value::as_str), part.get("text")) {
                    (Some("text"), Some(Value::String(t))) => texts.push(t.as_str()),
                    (Some("text"), _) => {
                        return Err(ApiError::invalid(
                            part_param.clone(),
                            format!("`{part_param}.text` must be a string"),
                        ));
                    }
                    (Some(other), _) => {
                        return Err(ApiError::invalid(
                            part_param,
                            format!("content parts of type {other:?} are not supported; only \"text\""),
                        ));
                    }
                    (None, _) => {
                        return Err(ApiError::invalid(part_param.clone(), format!("`{part_param}.type` is required")));
                    }
                }
            }
            texts.join("\n")
        }
        None | Some(Value::Null) if role == "assistant" => String::new(),
        None => {
            return Err(ApiError::invalid(content_param.clone(), format!("`{content_param}` is required")));
        }
        Some(other) => {
            return Err(wrong_type(&content_param, "a string or an array of text parts", other));
        }
    };
    obj.insert("content".into(), Value::String(joined));
    Ok(Value::Object(obj))
}

/// Checks the tool calls of a message in the history and turns each call's `arguments` (a
/// JSON text, as OpenAI sends it) into the object it holds, as vLLM hands them to templates;
/// arguments that are not a JSON object are a 400 naming the call.
fn parse_call_arguments(param: &str, calls: &mut Value) -> Result<(), ApiError> {
    let Value::Array(list) = calls else { return Err(wrong_type(param, "an array", calls)) };
    for (i, call) in list.iter_mut().enumerate() {
        let at = format!("{param}[{i}].function.arguments");
        let Some(arguments) = call.get_mut("function").and_then(|f| f.get_mut("arguments")) else {
            return Err(ApiError::invalid(at.clone(), format!("`{at}` is required")));
        };
        let parsed = match &*arguments {
            Value::String(text) => serde_json::from_str::<Value>(text)
                .map_err(|e| ApiError::invalid(at.clone(), format!("`{at}` is not valid JSON ({e})")))?,
            _ => arguments.take(),
        };
        if !parsed.is_object() {
            return Err(ApiError::invalid(at.clone(), format!("`{at}` must be a JSON object")));
        }
        *arguments = parsed;
    }
    Ok(())
}

/// Names every bad `logit_bias` key (the first 16, then how many more), so a client fixes them
/// in one go.
fn logit_bias_error(bad: &[&str], vocab_size: usize) -> String {
    const SHOWN: usize = 16;
    let mut names: Vec<String> = bad.iter().take(SHOWN).map(|k| format!("{k:?}")).collect();
    if bad.len() > SHOWN {
        names.push(format!("and {} more", bad.len() - SHOWN));
    }
    format!(
        "`logit_bias` maps token ids below {vocab_size} to numbers between -100 and 100; these entries are not: {}",
        names.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_template_that_refuses_or_drops_a_system_message_is_told_apart() {
        let template = |source| ChatTemplate::new(source, Some("<bos>"), None).unwrap();
        let plain = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}";
        // Gemma 2's.
        let refusing = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}\
                        {% endif %}{% for m in messages %}{{ m.content }}{% endfor %}";
        let dropping = "{% for m in messages if m.role != 'system' %}{{ m.content }}{% endfor %}";
        assert!(renders_a_system_message(&template(plain)));
        assert!(!renders_a_system_message(&template(refusing)));
        assert!(!renders_a_system_message(&template(dropping)));
        // Without the tools it counts, this one renders nothing: it is not judged.
        assert!(renders_a_system_message(&template("{{ tools | length }}")));
    }

    #[test]
    fn instructions_go_first_in_the_system_message_or_else_the_first_user_message() {
        let chat = || vec![json!({"role": "user", "content": "Hi"}), json!({"role": "assistant", "content": "Hello"})];
        let mut messages = chat();
        add_instructions(&mut messages, "Tools.", true);
        assert_eq!(messages[0], json!({"role": "system", "content": "Tools."}));
        add_instructions(&mut messages, "More.", true);
        assert_eq!(messages[0]["content"], "More.\n\nTools.");
        let mut messages = chat();
        add_instructions(&mut messages, "Tools.", false);
        assert_eq!((messages.len(), &messages[0]["content"]), (2, &json!("Tools.\n\nHi")));
        let mut messages = vec![json!({"role": "assistant", "content": "Hello"})];
        add_instructions(&mut messages, "Tools.", false);
        assert_eq!(messages[0], json!({"role": "user", "content": "Tools."}));
    }
}
