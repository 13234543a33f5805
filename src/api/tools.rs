//! Tool calls: what `tools` and `tool_choice` ask for, the schema a forced call must follow,
//! and finding a call in a model's output.
//!
//! A forced call (`tool_choice: "required"` or a named function) is generated as the JSON object
//! `{"name": ..., "arguments": {...}}` under a schema built from the tools' `parameters`, so it is
//! always well formed. With `"auto"` the model decides; a call is recognised in two formats:
//! Hermes-style `<tool_call>{"name": ..., "arguments": ...}</tool_call>` (Qwen2.5, SmolLM3,
//! Hermes, and the tool prompt chatd adds for templates without tools), or an output that is
//! just such a JSON object (Llama 3.x style; `parameters` is accepted for `arguments`).

use serde_json::{Map, Value, json};

use super::ApiError;

/// How the answer relates to tools.
#[derive(Clone, Debug, PartialEq)]
pub enum ToolMode {
    /// Plain content.
    None,
    /// The model may call a tool; its output is checked for a call.
    Auto,
    /// The output is a call to one of the tools of these names, by construction.
    Forced(Vec<String>),
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

/// Reads `tools` (already checked to be at most `MAX_TOOLS` function tools) and `tool_choice`.
pub fn tool_mode(tools: Option<&Value>, choice: Option<&Value>) -> Result<ToolMode, ApiError> {
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
            Ok(ToolMode::Forced(tools.iter().map(|t| name_of(t).to_owned()).collect()))
        }
        Some(Value::Object(obj)) => {
            let name = obj.get("function").and_then(|f| f.get("name")).and_then(Value::as_str);
            match (obj.get("type").and_then(Value::as_str), name) {
                (Some("function"), Some(name)) => match tools.iter().find(|t| name_of(t) == name) {
                    Some(_) => Ok(ToolMode::Forced(vec![name.to_owned()])),
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
/// `{"name": <its name>, "arguments": <its parameters>}` (`{"type": "object"}` when it has
/// none). Arguments get no properties beyond those declared unless the schema says otherwise
/// (as OpenAI's strict function calling does): left open, a small model keeps inventing keys.
/// The schemas are copied only here, once the prompt has been found to fit.
pub fn call_schema(tools: Option<&Value>, names: &[String]) -> Value {
    // A schema with references (`$ref: "#/$defs/..."`, what nested pydantic models give) is
    // moved whole under the root's `$defs` and its references rewritten to point into it, so
    // that they resolve from the call schema's root.
    let mut defs = serde_json::Map::new();
    let mut one = |index: usize, t: &Value| {
        let mut arguments = match &t["function"]["parameters"] {
            Value::Null => json!({"type": "object"}),
            p => p.clone(),
        };
        if let Value::Object(schema) = &mut arguments
            && schema.contains_key("properties")
        {
            schema.entry("additionalProperties").or_insert(Value::Bool(false));
        }
        if has_local_ref(&arguments) {
            let key = format!("tool{index}");
            rebase_refs(&mut arguments, &format!("#/$defs/{key}"));
            defs.insert(key.clone(), arguments);
            arguments = json!({"$ref": format!("#/$defs/{key}")});
        }
        json!({
            "type": "object",
            "properties": {"name": {"const": name_of(t)}, "arguments": arguments},
            "required": ["name", "arguments"],
            "additionalProperties": false,
        })
    };
    let chosen: Vec<&Value> = tool_list(tools).iter().filter(|t| names.iter().any(|n| n == name_of(t))).collect();
    let mut schema = match chosen.as_slice() {
        [tool] => one(0, tool),
        _ => json!({"anyOf": chosen.into_iter().enumerate().map(|(i, t)| one(i, t)).collect::<Vec<_>>()}),
    };
    if !defs.is_empty() {
        schema["$defs"] = Value::Object(defs);
    }
    schema
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

/// The call in a forced output so far: `{"name":"...","arguments":...}`, which the constraint
/// generates in that order and without free whitespace. `None` until the name is complete;
/// then the name and the arguments' text so far, exactly as generated. When the output is
/// `complete`, the call's closing brace is left out and the arguments must be a JSON object.
pub fn forced_parts(text: &str, complete: bool) -> Option<(String, &str)> {
    const KEY: &str = "\"arguments\"";
    let key = text.find(KEY)?;
    let after_key = &text[key + KEY.len()..];
    let colon = after_key.find(':')?;
    let head = format!("{}}}", text[..key].trim_end().trim_end_matches(',').trim_end());
    let name = serde_json::from_str::<Value>(&head).ok()?.get("name")?.as_str()?.to_owned();
    let mut arguments = after_key[colon + 1..].trim_start();
    if complete {
        arguments = arguments.trim_end().strip_suffix('}')?.trim_end();
        serde_json::from_str::<Map<String, Value>>(arguments).ok()?;
    }
    Some((name, arguments))
}

/// The call in a complete forced output (the whole output is the call's JSON object), its
/// arguments as generated.
pub fn parse_forced(text: &str) -> Option<ToolCall> {
    forced_parts(text, true)
        .map(|(name, arguments)| ToolCall { name, arguments: arguments.to_owned() })
        .or_else(|| call_from_json(&serde_json::from_str(text.trim()).ok()?))
}

/// Where families write a call in free output, as (opening, closing) marker: Qwen's and
/// Hermes' `<tool_call>`, Phi-4-mini's `<|tool_call|>`, Mistral's `[TOOL_CALLS]` (no closing).
/// Markers that are special tokens never reach the text: the call is then the bare JSON (an
/// object, or a list of calls as Phi-4 and Mistral write them), as Llama 3's is anyway.
const CALL_MARKERS: &[(&str, &str)] =
    &[("<tool_call>", "</tool_call>"), ("<|tool_call|>", "<|/tool_call|>"), ("[TOOL_CALLS]", "")];

/// A call in a free output, with the content before it. Of a list of calls, the first (chatd
/// makes one call per answer).
pub fn detect(text: &str) -> Option<(String, ToolCall)> {
    for (open, close) in CALL_MARKERS {
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
    t.is_empty() || json_start(t) || CALL_MARKERS.iter().any(|(open, _)| t.starts_with(open) || open.starts_with(t))
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
        assert_eq!(forced_parts("{\"name\":\"get_wea", false), None);
        assert_eq!(forced_parts("{\"name\":\"f\",\"arguments\":{\"ci", false), Some(("f".into(), "{\"ci")));
        let whole = "{\"name\":\"f\",\"arguments\":{\"city\":\"P\\u00e9\"}}";
        assert_eq!(forced_parts(whole, true), Some(("f".into(), "{\"city\":\"P\\u00e9\"}")));
        assert_eq!(parse_forced(whole).unwrap().arguments, "{\"city\":\"P\\u00e9\"}");
        assert_eq!(forced_parts("{\"name\":\"f\",\"arguments\":{\"ci", true), None);
    }

    #[test]
    fn references_of_forced_tools_resolve_from_the_root() {
        let tools = json!([{"type": "function", "function": {"name": "t", "parameters": {
            "$defs": {"Item": {"type": "object"}}, "type": "object",
            "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/Item"}}, "self": {"$ref": "#"}}}}}]);
        let schema = call_schema(Some(&tools), &["t".to_owned()]);
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
        assert_eq!(tool_mode(Some(&tools), None).unwrap(), ToolMode::Auto);
        assert_eq!(tool_mode(None, None).unwrap(), ToolMode::None);
        let ToolMode::Forced(forced) =
            tool_mode(Some(&tools), Some(&json!({"type": "function", "function": {"name": "b"}}))).unwrap()
        else {
            panic!()
        };
        assert_eq!(forced, ["b"]);
        let e = tool_mode(Some(&tools), Some(&json!({"type": "function", "function": {"name": "c"}}))).unwrap_err();
        assert!(e.message.contains("\"c\"") && e.message.contains("a, b"), "{}", e.message);
        assert!(tool_mode(None, Some(&json!("required"))).is_err());
        let arguments = &call_schema(Some(&tools), &forced)["properties"]["arguments"];
        assert!(arguments["properties"]["x"].is_object() && arguments["additionalProperties"] == false);
    }
}
