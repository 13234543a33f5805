//! The constraint fields of a request, in every spelling chatd takes: OpenAI's
//! `response_format`, SGLang's `regex` and `ebnf`, `grammar` (Lark, or GBNF as llama.cpp's
//! clients send it), llama.cpp's `json_schema` and `response_format.schema`, and vLLM's
//! `structured_outputs` (and its older `guided_*` fields). Each becomes one `Spec`; the
//! caller refuses more than one.

use serde_json::Value;

use super::ApiError;
use super::params::{Fields, wrong_type};
use crate::constraint::{self, Spec};

/// vLLM's `structured_outputs` keys, each also a top-level `guided_*` field in older vLLM.
const VLLM_KINDS: [&str; 5] = ["json", "regex", "choice", "grammar", "json_object"];

/// Every constraint the request's fields give, with the field that gave it.
pub(super) fn given(f: &Fields<'_>, max_bytes: usize) -> Result<Vec<(String, Spec)>, ApiError> {
    let mut given = Vec::new();
    if let Some(rx) = f.str("regex")? {
        given.push(("regex".to_owned(), Spec::Regex(rx.to_owned())));
    }
    if let Some(format) = f.get("response_format")
        && let Some(spec) = response_format(format, max_bytes)?
    {
        given.push(("response_format".to_owned(), spec));
    }
    if let Some(text) = f.str("ebnf")? {
        given.push(("ebnf".to_owned(), Spec::Gbnf(text.to_owned())));
    }
    if let Some(text) = f.str("grammar")? {
        given.push(("grammar".to_owned(), grammar(text)));
    }
    if let Some(schema) = f.get("json_schema") {
        given.push(("json_schema".to_owned(), json_schema("json_schema", schema, max_bytes)?));
    }
    match f.get("structured_outputs") {
        None => {}
        Some(Value::Object(fields)) => {
            for (key, value) in fields.iter().filter(|(_, v)| !v.is_null()) {
                let name = format!("structured_outputs.{key}");
                if let Some(spec) = vllm(&name, key, value, max_bytes)? {
                    given.push((name, spec));
                }
            }
        }
        Some(other) => return Err(wrong_type("structured_outputs", "an object", other)),
    }
    for kind in VLLM_KINDS {
        let name = format!("guided_{kind}");
        if let Some(value) = f.get(&name)
            && let Some(spec) = vllm(&name, kind, value, max_bytes)?
        {
            given.push((name, spec));
        }
    }
    Ok(given)
}

/// `grammar` as its syntax says: GBNF has `name ::= ...` rules, Lark has `name: ...`.
fn grammar(text: &str) -> Spec {
    let gbnf = text.lines().any(|line| {
        let line = line.trim_start();
        line.split_once("::=").is_some_and(|(name, _)| {
            !name.trim().is_empty() && name.trim().chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        })
    });
    if gbnf { Spec::Gbnf(text.to_owned()) } else { Spec::Lark(text.to_owned()) }
}

/// A JSON schema given as an object (or `true`/`false`), or as JSON text (vLLM takes both).
fn json_schema(field: &str, schema: &Value, max_bytes: usize) -> Result<Spec, ApiError> {
    let parsed;
    let schema = match schema {
        Value::String(text) => {
            constraint::check_size(text.len(), max_bytes)
                .map_err(|e| ApiError::invalid(field, format!("invalid `{field}`: {e}")))?;
            parsed = serde_json::from_str::<Value>(text)
                .map_err(|e| ApiError::invalid(field, format!("`{field}` is not a JSON schema: {e}")))?;
            &parsed
        }
        other => other,
    };
    match schema {
        Value::Object(_) | Value::Bool(_) => {
            constraint::check_size(constraint::json_len(schema), max_bytes)
                .map_err(|e| ApiError::invalid(field, format!("invalid `{field}`: {e}")))?;
            Ok(Spec::JsonSchema(schema.clone()))
        }
        other => Err(wrong_type(field, "a JSON schema object", other)),
    }
}

/// One of vLLM's structured-output kinds, given in the field `name`.
fn vllm(name: &str, kind: &str, value: &Value, max_bytes: usize) -> Result<Option<Spec>, ApiError> {
    let text = || value.as_str().ok_or_else(|| wrong_type(name, "a string", value));
    Ok(Some(match kind {
        "json" => json_schema(name, value, max_bytes)?,
        "regex" => Spec::Regex(text()?.to_owned()),
        "grammar" => grammar(text()?),
        "choice" => Spec::Regex(choice_regex(name, value)?),
        "json_object" => match value {
            Value::Bool(true) => Spec::JsonObject,
            Value::Bool(false) => return Ok(None),
            other => return Err(wrong_type(name, "a boolean", other)),
        },
        _ => {
            return Err(ApiError::invalid(
                name,
                format!("`{name}` is not supported; chatd takes {}", VLLM_KINDS.map(|k| format!("`{k}`")).join(", ")),
            ));
        }
    }))
}

/// vLLM's `choice`: the output is exactly one of the strings.
fn choice_regex(name: &str, value: &Value) -> Result<String, ApiError> {
    let Some(items) = value.as_array().filter(|items| !items.is_empty()) else {
        return Err(wrong_type(name, "a non-empty array of strings", value));
    };
    let choices: Vec<String> = items
        .iter()
        .map(|v| v.as_str().map(regex_escape).ok_or_else(|| wrong_type(name, "an array of strings", v)))
        .collect::<Result<_, _>>()?;
    Ok(format!("({})", choices.join("|")))
}

/// `text` as a regular expression matching exactly it.
fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// `response_format` as a constraint (`None` for plain text); a schema over `max_bytes` is
/// refused before it is copied. llama.cpp's clients put the schema in `schema` beside `type`.
fn response_format(format: &Value, max_bytes: usize) -> Result<Option<Spec>, ApiError> {
    const FIELD: &str = "response_format";
    let kind = format.get("type").and_then(Value::as_str);
    let inline = format.get("schema").filter(|s| !s.is_null());
    match (kind, inline) {
        (Some("text"), _) => Ok(None),
        (Some("json_object" | "json_schema"), Some(schema)) => json_schema(FIELD, schema, max_bytes).map(Some),
        (Some("json_object"), None) => Ok(Some(Spec::JsonObject)),
        (Some("json_schema"), None) => match format.get("json_schema").and_then(|s| s.get("schema")) {
            Some(schema @ (Value::Object(_) | Value::Bool(_))) => json_schema(FIELD, schema, max_bytes).map(Some),
            _ => Err(ApiError::invalid(
                FIELD,
                "`response_format` of type json_schema needs `json_schema.schema`, a JSON schema object",
            )),
        },
        _ => {
            Err(ApiError::invalid(FIELD, "`response_format.type` must be \"text\", \"json_object\" or \"json_schema\""))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grammar_syntax_decides_between_gbnf_and_lark() {
        assert!(matches!(grammar("root ::= \"yes\" | \"no\""), Spec::Gbnf(_)));
        assert!(matches!(grammar("# answer\n  answer-rule ::= [a-z]+\nroot ::= answer-rule"), Spec::Gbnf(_)));
        assert!(matches!(grammar("start: \"yes\" | \"no\""), Spec::Lark(_)));
        // `::=` inside a Lark literal is not a GBNF rule.
        assert!(matches!(grammar("start: \"a ::= b\""), Spec::Lark(_)));
    }

    #[test]
    fn choices_match_only_themselves() {
        let rx = choice_regex("c", &serde_json::json!(["a.b", "(x)|y", "1+1"])).unwrap();
        assert_eq!(rx, r"(a\.b|\(x\)\|y|1\+1)");
        assert!(choice_regex("c", &serde_json::json!([])).is_err());
        assert!(choice_regex("c", &serde_json::json!([1])).is_err());
    }
}
