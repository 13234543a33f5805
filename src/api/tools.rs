//! Tool calls: what `tools` and `tool_choice` ask for, the schema a forced call must follow,
//! and finding a call in a model's output.
//!
//! A forced call (`tool_choice: "required"` or a named function) is generated under a schema
//! built from the tools' `parameters`, so it is always well formed, and in the model's own
//! format ([`CallFormat`]): between its markers where its files name some (Qwen's `<tool_call>`,
//! Phi-4-mini's `<|tool_call|>`, Mistral's `[TOOL_CALLS]`), with Llama 3's `parameters` for
//! `arguments`, else as the JSON object `{"name": ..., "arguments": {...}}`. With `"auto"` the
//! model decides, and a call is recognised in each of those formats.
//!
//! This module must not know HTTP or the engine: it sees request JSON, template text and output
//! text.

use serde_json::{Map, Value, json};

use super::ApiError;
use crate::constraint::{Literal, Spec};
use crate::text::Tokenizer;

/// How the answer relates to tools.
#[derive(Clone, Debug, PartialEq)]
pub enum ToolMode {
    /// Plain content.
    None,
    /// The model may call a tool; its output is checked for a call.
    Auto,
    /// The output is a call to one of the tools of these names, by construction, written in
    /// `format`.
    Forced { names: Vec<String>, format: CallFormat },
}

/// A call found in (or forced on) the output.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    pub name: String,
    /// The arguments as a JSON string, as OpenAI returns them.
    pub arguments: String,
}

/// Most tools a request may offer (OpenAI's limit).
pub const MAX_TOOLS: usize = 128;

/// Reads `tools` (already checked to be at most `MAX_TOOLS` function tools) and `tool_choice`;
/// a forced call is to be written in `format`.
pub fn tool_mode(tools: Option<&Value>, choice: Option<&Value>, format: &CallFormat) -> Result<ToolMode, ApiError> {
    let forced = |names: Vec<String>| ToolMode::Forced { names, format: format.clone() };
    let tools = tool_list(tools);
    let names = || tools.iter().map(name_of).collect::<Vec<_>>().join(", ");
    match choice {
        None if tools.is_empty() => Ok(ToolMode::None),
        None => Ok(ToolMode::Auto),
        Some(Value::String(s)) if s == "none" => Ok(ToolMode::None),
        // As OpenAI answers: choosing among no tools is a mistake, not a no-op ("none" is what
        // happens anyway, so it is honoured).
        Some(Value::String(s)) if s == "auto" && tools.is_empty() => {
            Err(ApiError::invalid("tool_choice", "`tool_choice` \"auto\" needs `tools`"))
        }
        Some(Value::String(s)) if s == "auto" => Ok(ToolMode::Auto),
        Some(Value::String(s)) if s == "required" => {
            if tools.is_empty() {
                return Err(ApiError::invalid("tool_choice", "`tool_choice` \"required\" needs `tools`"));
            }
            Ok(forced(tools.iter().map(|t| name_of(t).to_owned()).collect()))
        }
        Some(Value::Object(obj)) => {
            let name = obj.get("function").and_then(|f| f.get("name")).and_then(Value::as_str);
            match (obj.get("type").and_then(Value::as_str), name) {
                (Some("function"), Some(name)) => match tools.iter().find(|t| name_of(t) == name) {
                    Some(_) => Ok(forced(vec![name.to_owned()])),
                    None => Err(ApiError::invalid(
                        "tool_choice",
                        format!("`tool_choice` names the function {name:?}, which is not in `tools` ({})", names()),
                    )),
                },
                _ => Err(ApiError::invalid(
                    "tool_choice",
                    "`tool_choice` must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                )),
            }
        }
        Some(_) => Err(ApiError::invalid(
            "tool_choice",
            "`tool_choice` must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}",
        )),
    }
}

fn tool_list(tools: Option<&Value>) -> &[Value] {
    tools.and_then(Value::as_array).map_or(&[], Vec::as_slice)
}

fn name_of(tool: &Value) -> &str {
    tool["function"]["name"].as_str().unwrap_or_default()
}

/// The schema of a call to one of the tools named `names` among `tools`:
/// `{"name": <its name>, <arguments_key>: <its parameters>}` (`{"type": "object"}` when it has
/// none). Arguments get no properties beyond those declared unless the schema says otherwise
/// (as OpenAI's strict function calling does): left open, a small model keeps inventing keys.
/// The schemas are copied only here, once the prompt has been found to fit.
fn call_schema(tools: Option<&Value>, names: &[String], arguments_key: &str) -> Value {
    // A schema with references (`$ref: "#/$defs/..."`, what nested pydantic models give) is
    // moved whole under the root's `$defs` and its references rewritten to point into it, so
    // that they resolve from the call schema's root.
    let mut defs = serde_json::Map::new();
    let mut one = |index: usize, t: &Value| {
        let mut arguments = arguments_schema(t);
        if has_local_ref(&arguments) {
            let key = format!("tool{index}");
            rebase_refs(&mut arguments, &format!("#/$defs/{key}"));
            defs.insert(key.clone(), arguments);
            arguments = json!({"$ref": format!("#/$defs/{key}")});
        }
        json!({
            "type": "object",
            "properties": {"name": {"const": name_of(t)}, arguments_key: arguments},
            "required": ["name", arguments_key],
            "additionalProperties": false,
        })
    };
    let mut schema = match chosen(tools, names).as_slice() {
        [tool] => one(0, tool),
        chosen => json!({"anyOf": chosen.iter().enumerate().map(|(i, t)| one(i, t)).collect::<Vec<_>>()}),
    };
    if !defs.is_empty() {
        schema["$defs"] = Value::Object(defs);
    }
    schema
}

/// The tools named `names` among `tools`, in their order.
fn chosen<'t>(tools: Option<&'t Value>, names: &[String]) -> Vec<&'t Value> {
    tool_list(tools).iter().filter(|t| names.iter().any(|n| n == name_of(t))).collect()
}

/// A tool's arguments schema: its `parameters` (`{"type": "object"}` when it has none), with no
/// properties beyond those declared unless it says otherwise.
fn arguments_schema(tool: &Value) -> Value {
    let mut arguments = match &tool["function"]["parameters"] {
        Value::Null => json!({"type": "object"}),
        p => p.clone(),
    };
    if let Value::Object(schema) = &mut arguments
        && schema.contains_key("properties")
    {
        schema.entry("additionalProperties").or_insert(Value::Bool(false));
    }
    arguments
}

/// Whether `schema` holds a `$ref` into itself (`#...`).
fn has_local_ref(schema: &Value) -> bool {
    match schema {
        Value::Object(map) => {
            map.iter().any(|(k, v)| (k == "$ref" && v.as_str().is_some_and(|r| r.starts_with('#'))) || has_local_ref(v))
        }
        Value::Array(items) => items.iter().any(has_local_ref),
        _ => false,
    }
}

/// Rewrites every `$ref: "#/..."` in `schema` to `"{base}/..."` (and `"#"` to `base`).
fn rebase_refs(schema: &mut Value, base: &str) {
    match schema {
        Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                match value {
                    Value::String(r) if key == "$ref" && r.starts_with('#') => *r = format!("{base}{}", &r[1..]),
                    _ => rebase_refs(value, base),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| rebase_refs(v, base)),
        _ => {}
    }
}

/// Where a chat template takes the request's `tools`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolsIn {
    /// The `tools` variable, as Hugging Face passes it (Qwen, Llama 3.x, Hermes, ...).
    Variable,
    /// A JSON text in the system message's `tools` field (Phi-4-mini's `message['tools']`).
    SystemMessage,
    /// Nowhere: chatd puts its own tool instructions in the system message.
    Nowhere,
}

impl ToolsIn {
    /// Reads a template's source: a `tools` name of its own (not `message.tools`, not part of
    /// a longer name) is the variable; otherwise a message's `tools` field.
    pub fn of(template: &str) -> ToolsIn {
        let bytes = template.as_bytes();
        let is_name = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
        let mut message_field = false;
        for (at, _) in template.match_indices("tools") {
            let before = at.checked_sub(1).map(|i| bytes[i]);
            let after = bytes.get(at + "tools".len()).copied();
            if before.is_some_and(is_name) || after.is_some_and(is_name) {
                continue;
            }
            let field = template[..at].ends_with("message.")
                || template[..at].ends_with("message['")
                || template[..at].ends_with("message[\"");
            if field {
                message_field = true;
            } else if !matches!(before, Some(b'.' | b'\'' | b'"')) {
                return ToolsIn::Variable;
            }
        }
        if message_field { ToolsIn::SystemMessage } else { ToolsIn::Nowhere }
    }
}

/// Whether every tool's name is in `prompt`: a template that takes `tools` rendered them.
pub fn all_in(tools: &Value, prompt: &str) -> bool {
    tool_list(Some(tools)).iter().all(|t| prompt.contains(name_of(t)))
}

/// The tools as Phi-4-mini's documentation puts them in the system message: a JSON text of
/// the function objects.
pub fn system_message_tools(tools: &Value) -> String {
    let functions: Vec<&Value> = tool_list(Some(tools)).iter().map(|t| &t["function"]).collect();
    serde_json::to_string(&functions).unwrap_or_default()
}

/// Instructions for templates that ignore `tools` (Hermes-style, as Hugging Face's tool-use
/// templates write them), put in front of the system message.
pub fn system_prompt(tools: &Value) -> String {
    format!(
        "You are a function calling AI model. You are provided with function signatures within <tools></tools> \
         XML tags. You may call one of these functions to answer the user. Here are the available tools: \
         <tools>{tools}</tools>\nFor a function call, return a JSON object with the function name and arguments \
         within <tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>"
    )
}

/// How a family writes a call in free output: its opening and closing markers (Mistral's has
/// no closing one), whether the calls between them are a JSON list, and whether a newline
/// stands on each side of the call inside the markers.
struct Markers {
    open: &'static str,
    close: &'static str,
    list: bool,
    newlines: bool,
}

/// Qwen's and Hermes' `<tool_call>`, Phi-4-mini's `<|tool_call|>`, Mistral's `[TOOL_CALLS]`.
/// Markers that are special tokens never reach the text: the call is then the bare JSON (an
/// object, or a list of calls as Phi-4 and Mistral write them), as Llama 3's is anyway.
const MARKERS: &[Markers] = &[
    Markers { open: "<tool_call>", close: "</tool_call>", list: false, newlines: true },
    Markers { open: "<|tool_call|>", close: "<|/tool_call|>", list: true, newlines: false },
    Markers { open: "[TOOL_CALLS]", close: "", list: true, newlines: false },
];

/// How a model writes a tool call: what stands before and after the call object, and the key
/// of its arguments. A forced call is generated in this format, so that the model writes what
/// it was trained to write (and what its template renders for the calls of earlier turns).
#[derive(Clone, Debug, PartialEq)]
pub struct CallFormat {
    before: Vec<Literal>,
    shape: Shape,
    after: Vec<Literal>,
}

/// How the call itself is written.
#[derive(Clone, Debug, PartialEq)]
enum Shape {
    /// `{"name": ..., <key>: {...}}`; the key is `arguments`, or `parameters` as Llama 3
    /// writes it.
    Object { arguments_key: &'static str },
    /// The name, `between`, then the arguments object: Mistral's newer `name[ARGS]{...}`.
    NameThenArguments { between: Literal },
}

impl Default for CallFormat {
    /// The JSON object alone: `{"name": ..., "arguments": {...}}`.
    fn default() -> Self {
        Self { before: Vec::new(), shape: Shape::Object { arguments_key: "arguments" }, after: Vec::new() }
    }
}

/// Mistral's marker between a call's name and its arguments (Ministral 3, Mistral Small 3.2).
const ARGS_MARKER: &str = "[ARGS]";

impl CallFormat {
    /// The format of a model whose template is `template`: the markers its files name
    /// (`named`, token ids from `genai_config.json`), else the markers the template writes,
    /// else Llama 3's `parameters` where the template writes that, else those of [`MARKERS`]
    /// that are tokens of the vocabulary when the template takes tools (Phi-4-mini's renders
    /// no call).
    pub fn of(template: &str, takes_tools: bool, tokenizer: &Tokenizer, named: Option<(u32, u32)>) -> Self {
        let literal = |text: &str| Literal { text: text.to_owned(), token: tokenizer.token_id(text) };
        if let Some((open, close)) = named {
            let (open, close) = (tokenizer.token_text(open), tokenizer.token_text(close));
            let known = MARKERS.iter().find(|m| m.open == open);
            return match known {
                Some(markers) => Self::between(markers, literal),
                None if !open.is_empty() => {
                    Self { before: vec![literal(&open)], after: vec![literal(&close)], ..Self::default() }
                }
                None => Self::default(),
            };
        }
        if let Some(markers) = MARKERS.iter().find(|m| template.contains(m.open)) {
            let mut format = Self::between(markers, literal);
            if template.contains(ARGS_MARKER) {
                // `[TOOL_CALLS]name[ARGS]{...}`: no list around the call.
                format = Self {
                    before: vec![literal(markers.open)],
                    shape: Shape::NameThenArguments { between: literal(ARGS_MARKER) },
                    after: Vec::new(),
                };
            }
            return format;
        }
        if template.contains("\"parameters\":") || template.contains("\\\"parameters\\\":") {
            return Self { shape: Shape::Object { arguments_key: "parameters" }, ..Self::default() };
        }
        match MARKERS.iter().find(|m| takes_tools && tokenizer.token_id(m.open).is_some()) {
            Some(markers) => Self::between(markers, literal),
            None => Self::default(),
        }
    }

    fn between(markers: &Markers, literal: impl Fn(&str) -> Literal) -> Self {
        let text = |t: &str| Literal { text: t.to_owned(), token: None };
        let mut before = vec![literal(markers.open)];
        let mut after = Vec::new();
        if markers.newlines {
            before.push(text("\n"));
            after.push(text("\n"));
        }
        if markers.list {
            before.push(text("["));
            after.push(text("]"));
        }
        if !markers.close.is_empty() {
            after.push(literal(markers.close));
        }
        Self { before, after, ..Self::default() }
    }

    /// The constraint of a forced call to one of the tools named `names` among `tools`.
    pub fn spec(&self, tools: Option<&Value>, names: &[String]) -> Spec {
        let arguments_key = match &self.shape {
            Shape::Object { arguments_key } => arguments_key,
            Shape::NameThenArguments { between } => {
                let calls = chosen(tools, names).into_iter().map(|t| (name_of(t).to_owned(), arguments_schema(t)));
                return Spec::NamedJson {
                    before: self.before.clone(),
                    between: between.clone(),
                    calls: calls.collect(),
                };
            }
        };
        let schema = call_schema(tools, names, arguments_key);
        match (self.before.is_empty(), self.after.is_empty()) {
            (true, true) => Spec::JsonSchema(schema),
            _ => Spec::JsonBetween { before: self.before.clone(), schema, after: self.after.clone() },
        }
    }

    /// The call in a forced output so far, which the constraint generated as `before`, then
    /// `{"name":"...","<arguments_key>":...}` in that order and without free whitespace (or
    /// the name, `between` and the arguments), then `after`. `None` until the name is
    /// complete; then the name and the arguments' text so far, exactly as generated, up to
    /// their closing brace. When the output is `complete` the arguments must be a whole JSON
    /// object. Markers that are special tokens are not in the text (they are skipped when
    /// decoding), so each is optional.
    pub fn parts<'t>(&self, text: &'t str, complete: bool) -> Option<(String, &'t str)> {
        let mut call = text;
        for piece in &self.before {
            call = call.trim_start();
            call = call.strip_prefix(piece.text.trim()).unwrap_or(call);
        }
        let (name, mut arguments) = match &self.shape {
            Shape::Object { arguments_key } => {
                let key = format!("\"{arguments_key}\"");
                let at = call.find(&key)?;
                let after_key = &call[at + key.len()..];
                let colon = after_key.find(':')?;
                let head = format!("{}}}", call[..at].trim_start().trim_end().trim_end_matches(',').trim_end());
                let name = serde_json::from_str::<Value>(&head).ok()?.get("name")?.as_str()?.to_owned();
                (name, after_key[colon + 1..].trim_start())
            }
            // The name ends at the marker, or (a special marker skipped) where the arguments
            // begin.
            Shape::NameThenArguments { between } => {
                let end = call.find(between.text.as_str()).or_else(|| call.find('{'))?;
                let rest = &call[end..];
                let rest = rest.strip_prefix(between.text.as_str()).unwrap_or(rest);
                (call[..end].trim().to_owned(), rest.trim_start())
            }
        };
        arguments = arguments_so_far(arguments);
        if complete {
            serde_json::from_str::<Map<String, Value>>(arguments).ok()?;
        }
        Some((name, arguments))
    }

    /// The call in a complete forced output, its arguments as generated.
    pub fn parse(&self, text: &str) -> Option<ToolCall> {
        self.parts(text, true).map(|(name, arguments)| ToolCall { name, arguments: arguments.to_owned() })
    }
}

/// The arguments in a forced call's text that starts with them: up to where their object
/// closes, or all of it while it is open.
pub fn arguments_so_far(text: &str) -> &str {
    &text[..object_end(text).unwrap_or(text.len())]
}

/// Where the JSON object at the start of `text` ends (just past its closing brace), once it
/// has; `None` while it is still open, or when `text` does not start with one.
fn object_end(text: &str) -> Option<usize> {
    if !text.starts_with('{') {
        return None;
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (i, b) in text.bytes().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' if in_string => escaped = true,
            b'"' => in_string = !in_string,
            b'{' | b'[' if !in_string => depth += 1,
            b'}' | b']' if !in_string => {
                depth -= 1;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            _ => {}
        }
    }
    None
}

/// A call in a free output, with the content before it. Of a list of calls, the first (chatd
/// makes one call per answer).
pub fn detect(text: &str) -> Option<(String, ToolCall)> {
    for Markers { open, close, .. } in MARKERS {
        if let Some(start) = text.find(open) {
            let rest = &text[start + open.len()..];
            let body = if close.is_empty() { rest } else { rest.split(close).next().unwrap_or(rest) };
            return Some((text[..start].trim().to_owned(), call_in(body)?));
        }
    }
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        return Some((String::new(), call_in(trimmed)?));
    }
    None
}

/// The call in a marker's body: a JSON call object, a list of them, or Mistral's newer
/// `name[ARGS]{arguments}`.
fn call_in(body: &str) -> Option<ToolCall> {
    let body = body.trim();
    if let Some((name, arguments)) = body.split_once("[ARGS]") {
        serde_json::from_str::<Map<String, Value>>(arguments.trim()).ok()?;
        return Some(ToolCall { name: name.trim().to_owned(), arguments: arguments.trim().to_owned() });
    }
    match serde_json::from_str(body).ok()? {
        Value::Array(calls) => call_from_json(calls.first()?),
        call => call_from_json(&call),
    }
}

/// Whether a streamed output that starts with `text` may still turn out to be a call, so its
/// content must be held back for now.
pub fn could_be_call(text: &str) -> bool {
    let t = text.trim_start();
    let json_start = |t: &str| match t.strip_prefix('[') {
        Some(rest) => rest.trim_start().is_empty() || rest.trim_start().starts_with('{'),
        None => t.starts_with('{'),
    };
    t.is_empty() || json_start(t) || MARKERS.iter().any(|m| t.starts_with(m.open) || m.open.starts_with(t))
}

fn call_from_json(value: &Value) -> Option<ToolCall> {
    let obj = value.as_object()?;
    let name = obj.get("name")?.as_str()?.to_owned();
    let arguments = match obj.get("arguments").or_else(|| obj.get("parameters")) {
        Some(Value::String(s)) => s.clone(),
        Some(v @ Value::Object(_)) => v.to_string(),
        None => Value::Object(Map::new()).to_string(),
        Some(_) => return None,
    };
    Some(ToolCall { name, arguments })
}

/// A call as OpenAI returns it in `message.tool_calls`.
pub fn call_json(call: &ToolCall, id: &str) -> Value {
    json!({"id": id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_found_in_both_formats() {
        let hermes = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        let (content, call) = detect(hermes).unwrap();
        assert_eq!(content, "Let me check.");
        assert_eq!(call, ToolCall { name: "get_weather".into(), arguments: "{\"city\":\"Paris\"}".into() });
        let llama = " {\"name\": \"f\", \"parameters\": {\"x\": 1}}";
        assert_eq!(detect(llama).unwrap().1.arguments, "{\"x\":1}");
        assert!(detect("Paris is the capital.").is_none());
        assert!(detect("{\"not\": \"a call\"}").is_none());
        assert!(could_be_call("  <tool") && could_be_call("{") && !could_be_call("Hello"));
    }

    #[test]
    fn calls_are_found_in_each_familys_format() {
        let weather = ToolCall { name: "get_weather".into(), arguments: "{\"city\":\"Paris\"}".into() };
        let list = "[{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}]";
        // Phi-4-mini, with its markers in the text and without (special tokens skipped).
        assert_eq!(detect(&format!("<|tool_call|>{list}<|/tool_call|>")).unwrap().1, weather);
        assert_eq!(detect(list).unwrap(), (String::new(), weather.clone()));
        // Mistral v0.3, and its newer `name[ARGS]arguments`.
        assert_eq!(detect(&format!("[TOOL_CALLS] {list}")).unwrap().1, weather);
        let (content, call) = detect("Sure. [TOOL_CALLS]get_weather[ARGS]{\"city\": \"Paris\"}").unwrap();
        assert_eq!(
            (content.as_str(), call.name.as_str(), call.arguments.as_str()),
            ("Sure.", "get_weather", "{\"city\": \"Paris\"}")
        );
        assert!(detect("[1, 2, 3]").is_none() && detect("[TOOL_CALLS]oops").is_none());
        // Streaming holds back what may still be a call, and only that.
        assert!(could_be_call("[") && could_be_call(" [ {") && could_be_call("<|tool") && could_be_call("[TOOL"));
        assert!(!could_be_call("[link](x)") && !could_be_call("[1, 2]"));
    }

    #[test]
    fn forced_output_is_split_into_name_and_arguments_as_it_grows() {
        let bare = CallFormat::default();
        assert_eq!(bare.parts("{\"name\":\"get_wea", false), None);
        assert_eq!(bare.parts("{\"name\":\"f\",\"arguments\":{\"ci", false), Some(("f".into(), "{\"ci")));
        // The call's own closing brace is not part of the arguments, even before the finish.
        let whole = "{\"name\":\"f\",\"arguments\":{\"city\":\"P\\u00e9\",\"t\":\"}\\\"\"}}";
        let arguments = "{\"city\":\"P\\u00e9\",\"t\":\"}\\\"\"}";
        assert_eq!(bare.parts(whole, false), Some(("f".into(), arguments)));
        assert_eq!(bare.parts(whole, true), Some(("f".into(), arguments)));
        assert_eq!(bare.parse(whole).unwrap().arguments, arguments);
        assert_eq!(bare.parts("{\"name\":\"f\",\"arguments\":{\"ci", true), None);
    }

    /// The format a template and vocabulary give, and the text a forced call to `f` is
    /// generated as in it (markers that are tokens written as `<[id]>`).
    fn forced_text(template: &str, tok: &Tokenizer, named: Option<(u32, u32)>) -> (CallFormat, String) {
        let format = CallFormat::of(template, true, tok, named);
        let piece = |l: &Literal| l.token.map_or(l.text.clone(), |id| format!("<[{id}]>"));
        let text = |pieces: &[Literal]| pieces.iter().map(piece).collect::<String>();
        let call = match &format.shape {
            Shape::Object { arguments_key } => format!("{{\"name\":\"f\",\"{arguments_key}\":{{\"x\":1}}}}"),
            Shape::NameThenArguments { between } => format!("f{}{{\"x\":1}}", piece(between)),
        };
        let whole = format!("{}{call}{}", text(&format.before), text(&format.after));
        (format, whole)
    }

    #[test]
    fn forced_calls_are_written_in_each_familys_format() {
        let tok = crate::text::smollm_tokenizer_with(&[("<tool_call>", false), ("</tool_call>", false)]);
        let phi = crate::text::smollm_tokenizer_with(&[("<|tool_call|>", true), ("<|/tool_call|>", true)]);
        let id = |t: &str| tok.token_id(t).or_else(|| phi.token_id(t)).unwrap();
        let (open, close) = (id("<tool_call>"), id("</tool_call>"));
        let qwen = "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}";
        let (format, text) = forced_text(qwen, &tok, None);
        assert_eq!(text, format!("<[{open}]>\n{{\"name\":\"f\",\"arguments\":{{\"x\":1}}}}\n<[{close}]>"));
        // As decoded: a non-special marker is in the text.
        let decoded = "<tool_call>\n{\"name\":\"f\",\"arguments\":{\"x\":1}}\n</tool_call>";
        assert_eq!(format.parse(decoded).unwrap(), ToolCall { name: "f".into(), arguments: "{\"x\":1}".into() });
        // Phi-4-mini's template renders no call: its vocabulary has the markers.
        let (open, close) = (id("<|tool_call|>"), id("<|/tool_call|>"));
        let phi4 = "{% if 'tools' in message %}{{ message['tools'] }}{% endif %}";
        let (format, text) = forced_text(phi4, &phi, None);
        assert_eq!(text, format!("<[{open}]>[{{\"name\":\"f\",\"arguments\":{{\"x\":1}}}}]<[{close}]>"));
        // As decoded: special markers are skipped.
        assert_eq!(format.parse("[{\"name\":\"f\",\"arguments\":{\"x\":1}}]").unwrap().arguments, "{\"x\":1}");
        assert_eq!(CallFormat::of(phi4, false, &phi, None), CallFormat::default());
        // Mistral v0.3 (the marker spelled out where it is not a token), Llama 3.2.
        let mistral = "{{- \"[TOOL_CALLS][\" }}";
        assert_eq!(forced_text(mistral, &tok, None).1, "[TOOL_CALLS][{\"name\":\"f\",\"arguments\":{\"x\":1}}]");
        let llama = "{{- '{\"name\": \"' + tool_call.name + '\", ' }}{{- '\"parameters\": ' }}";
        let (format, text) = forced_text(llama, &tok, None);
        assert_eq!(text, "{\"name\":\"f\",\"parameters\":{\"x\":1}}");
        assert_eq!(format.parse(&text).unwrap().arguments, "{\"x\":1}");
        // Ministral 3 and Mistral Small 3.2: the name, then `[ARGS]`, then the arguments.
        let ministral = "{{- '[TOOL_CALLS]' }}{{- name + '[ARGS]' + arguments }}";
        let (format, text) = forced_text(ministral, &tok, None);
        assert_eq!(text, "[TOOL_CALLS]f[ARGS]{\"x\":1}");
        assert_eq!(format.parse(&text).unwrap(), ToolCall { name: "f".into(), arguments: "{\"x\":1}".into() });
        assert_eq!(format.parse("f{\"x\":1}").unwrap().name, "f", "special markers skipped");
        assert_eq!(format.parts("[TOOL_CALLS]get_wea", false), None);
        assert_eq!(format.parts("[TOOL_CALLS]f[ARGS]{\"x\":", false), Some(("f".into(), "{\"x\":")));
        let plain = crate::text::smollm_tokenizer();
        assert_eq!(forced_text("{{ messages }}", &plain, None).1, "{\"name\":\"f\",\"arguments\":{\"x\":1}}");
        // The ids genai_config.json names come first.
        let (_, text) = forced_text("{{ messages }}", &phi, Some((open, close)));
        assert!(text.starts_with(&format!("<[{open}]>[")), "{text}");
    }

    /// Whether `prepared` takes exactly the tokens of `text` (markers as `<[id]>`).
    fn accepts(prepared: &crate::constraint::Prepared, tok: &Tokenizer, text: &str) -> bool {
        let mut ids = Vec::new();
        for (i, part) in text.split("<[").enumerate() {
            let (id, rest) = match i {
                0 => (None, part),
                _ => part.split_once("]>").map(|(id, rest)| (Some(id.parse::<u32>().unwrap()), rest)).unwrap(),
            };
            ids.extend(id);
            ids.extend(tok.encode(rest).unwrap());
        }
        let mut constraint = prepared.start();
        for id in ids {
            let mut logits = vec![0.0; tok.vocab_size()];
            if constraint.mask(&mut logits).is_err() || logits[id as usize] == f32::NEG_INFINITY {
                return false;
            }
            constraint.consume(id).unwrap();
        }
        constraint.is_complete()
    }

    #[test]
    fn forced_calls_in_a_familys_format_compile_and_follow_the_schema() {
        let tok = std::sync::Arc::new(crate::text::smollm_tokenizer_with(&[
            ("<|tool_call|>", true),
            ("<|/tool_call|>", true),
        ]));
        let compiler = crate::constraint::Compiler::new(&tok, &[2], tok.vocab_size()).unwrap();
        let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}]);
        let ministral = "{{- '[TOOL_CALLS]' }}{{- name + '[ARGS]' + arguments }}";
        for template in ["{{ '<tool_call>' }}", "{% if 'tools' in message %}{% endif %}", "\"parameters\": ", ministral]
        {
            let format = CallFormat::of(template, true, &tok, None);
            let spec = format.spec(Some(&tools), &["f".to_owned()]);
            let prepared = compiler.compile(&spec, 1 << 16).unwrap_or_else(|e| panic!("{template}: {e}"));
            let (_, text) = forced_text(template, &tok, None);
            assert!(accepts(&prepared, &tok, &text), "{template}: {text}");
            let wrong = text.replace("{\"x\":1}", "{\"x\":\"1\"}");
            assert!(!accepts(&prepared, &tok, &wrong), "{wrong}");
            assert!(!accepts(&prepared, &tok, &text.replace("\"x\":1", "\"x\": 1")), "free whitespace");
            assert!(!accepts(&prepared, &tok, &text.replace("\"f\"", "\"g\"").replace("f[", "g[")), "another name");
        }
    }

    #[test]
    fn references_of_forced_tools_resolve_from_the_root() {
        let tools = json!([{"type": "function", "function": {"name": "t", "parameters": {
            "$defs": {"Item": {"type": "object"}}, "type": "object",
            "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/Item"}}, "self": {"$ref": "#"}}}}}]);
        let schema = call_schema(Some(&tools), &["t".to_owned()], "arguments");
        assert_eq!(schema["properties"]["arguments"], json!({"$ref": "#/$defs/tool0"}));
        let moved = &schema["$defs"]["tool0"];
        assert_eq!(moved["properties"]["items"]["items"]["$ref"], "#/$defs/tool0/$defs/Item");
        assert_eq!(moved["properties"]["self"]["$ref"], "#/$defs/tool0");
    }

    #[test]
    fn templates_say_where_they_take_tools() {
        assert_eq!(ToolsIn::of("{% if tools %}{{ tools | tojson }}{% endif %}"), ToolsIn::Variable);
        assert_eq!(ToolsIn::of("{%- if tools is defined and tools -%}"), ToolsIn::Variable);
        let phi4 = "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and \
                    message['tools'] is not none %}{{ '<|tool|>' + message['tools'] + '<|/tool|>' }}{% endif %}{% endfor %}";
        assert_eq!(ToolsIn::of(phi4), ToolsIn::SystemMessage);
        assert_eq!(ToolsIn::of("{{ ns.tools_prefix }}{{ message.content }}"), ToolsIn::Nowhere);
        assert_eq!(ToolsIn::of("{{ messages[0].content }}"), ToolsIn::Nowhere);
        let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
        assert_eq!(system_message_tools(&tools), r#"[{"name":"f","parameters":{"type":"object"}}]"#);
    }

    #[test]
    fn tool_choice_is_checked_against_tools() {
        let tools = json!([{"type": "function", "function": {"name": "a"}}, {"type": "function", "function": {"name": "b", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}]);
        let format = CallFormat::default();
        assert_eq!(tool_mode(Some(&tools), None, &format).unwrap(), ToolMode::Auto);
        assert_eq!(tool_mode(None, None, &format).unwrap(), ToolMode::None);
        let ToolMode::Forced { names: forced, .. } =
            tool_mode(Some(&tools), Some(&json!({"type": "function", "function": {"name": "b"}})), &format).unwrap()
        else {
            panic!()
        };
        assert_eq!(forced, ["b"]);
        let e = tool_mode(Some(&tools), Some(&json!({"type": "function", "function": {"name": "c"}})), &format)
            .unwrap_err();
        assert!(e.message.contains("\"c\"") && e.message.contains("a, b"), "{}", e.message);
        assert!(tool_mode(None, Some(&json!("required")), &format).is_err());
        let arguments = &call_schema(Some(&tools), &forced, "arguments")["properties"]["arguments"];
        assert!(arguments["properties"]["x"].is_object() && arguments["additionalProperties"] == false);
    }
}
