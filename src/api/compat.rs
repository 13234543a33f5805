//! The fields a request may carry beyond those the parser reads: ones that change nothing in
//! what chatd does, and ones accepted only at the value that describes what chatd does anyway.
//! Everything else that no one read is refused by name: nothing a client sends is ignored in
//! silence. The README's Compatibility section lists these tables (a test checks it).

use serde_json::Value;

use super::ApiError;
use super::params::Fields;

/// Accepted with no effect on the answer, with why no effect is right.
pub const NO_EFFECT: &[(&str, &str)] = &[
    ("user", "OpenAI: an end-user id for the provider's abuse monitoring"),
    ("safety_identifier", "OpenAI: an end-user id for the provider's abuse monitoring"),
    ("metadata", "OpenAI: tags for stored completions"),
    ("prompt_cache_key", "OpenAI: a caching hint; chatd's prefix cache matches prompts by their tokens"),
    ("cache_prompt", "llama.cpp: chatd always reuses cached prefixes, which changes no output"),
    ("parallel_tool_calls", "OpenAI: chatd makes at most one call per answer, which both values allow"),
];

/// Accepted only at these values (JSON text): what chatd does without being asked.
pub const ONLY_AT: &[(&str, &[&str])] = &[
    ("store", &["false"]),
    ("service_tier", &["\"auto\"", "\"default\""]),
    ("modalities", &["[\"text\"]"]),
    ("echo", &["false"]),
    ("best_of", &["1"]),
    ("suffix", &["\"\""]),
    ("skip_special_tokens", &["true"]),
    ("spaces_between_special_tokens", &["true"]),
    ("return_token_ids", &["false"]),
    ("return_tokens_as_token_ids", &["false"]),
    ("stream_options.continuous_usage_stats", &["false"]),
];

/// Refuses the first field of `f` that was given, not read, and is not in the tables above.
/// `prefix` names the object the fields are in ("" for the body, "stream_options." inside it).
pub(super) fn refuse_unread(f: &Fields<'_>, prefix: &str) -> Result<(), ApiError> {
    for (key, value) in f.unread() {
        let name = format!("{prefix}{key}");
        if NO_EFFECT.iter().any(|(field, _)| *field == name) {
            continue;
        }
        match ONLY_AT.iter().find(|(field, _)| *field == name) {
            Some((_, allowed)) if allowed.iter().any(|text| is_json(text, value)) => {}
            Some((_, allowed)) => {
                return Err(ApiError::invalid(
                    name.as_str(),
                    format!(
                        "`{name}` is not supported by this server except as {} (got {value})",
                        allowed.join(" or ")
                    ),
                ));
            }
            None => {
                return Err(ApiError::invalid(
                    name.as_str(),
                    format!(
                        "Unrecognized request argument supplied: {name} (the README's Compatibility section lists the \
                         fields chatd takes)"
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn is_json(text: &str, value: &Value) -> bool {
    serde_json::from_str::<Value>(text).is_ok_and(|v| v == *value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_in_the_tables_is_json() {
        for (field, allowed) in ONLY_AT {
            for text in *allowed {
                assert!(serde_json::from_str::<Value>(text).is_ok(), "{field}: {text}");
            }
        }
    }

    #[test]
    fn the_readme_lists_every_field_of_the_tables() {
        let readme = include_str!("../../README.md");
        let section = readme.split("## Compatibility").nth(1).expect("a Compatibility section");
        let section = section.split("\n## ").next().unwrap_or(section);
        for field in NO_EFFECT.iter().map(|(f, _)| *f).chain(ONLY_AT.iter().map(|(f, _)| *f)) {
            let named = section.contains(&format!("`{field}`")) || section.contains(&format!("`{field}: "));
            assert!(named, "the README's Compatibility section lacks `{field}`");
        }
    }
}
