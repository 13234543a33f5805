use std::path::Path;

use anyhow::{Context, Result, anyhow};

/// The model's tokenizer (`tokenizer.json`) plus what `tokenizer_config.json` says about special
/// tokens and the chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Jinja source of the chat template, when the model ships one.
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

impl Tokenizer {
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("reading {}", path.display()))?;
        let config_path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text).with_context(|| format!("parsing {}", config_path.display()))?,
            Err(_) => serde_json::Value::Null,
        };
        Ok(Self {
            inner,
            chat_template: chat_template_of(&config),
            bos_token: special_token(&config, "bos_token"),
            eos_token: special_token(&config, "eos_token"),
        })
    }

    /// Encodes text as the model sees it. Special tokens written in the text (such as
    /// `<|im_start|>` from a rendered chat template) become their ids; nothing is added around it,
    /// as Hugging Face does for a rendered chat prompt.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, false).map_err(|e| anyhow!("tokenizing: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| anyhow!("decoding: {e}"))
    }

    /// The text of one token on its own (for logprobs): special tokens included, possibly a
    /// replacement character when the token is part of a multi-byte character.
    pub fn token_text(&self, id: u32) -> String {
        self.inner.decode(&[id], false).unwrap_or_default()
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub(crate) fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// `chat_template` is a string, or a list of named templates of which "default" is the chat one.
fn chat_template_of(config: &serde_json::Value) -> Option<String> {
    match config.get("chat_template")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_owned)),
        _ => None,
    }
}

/// A special token is written either as a string or as an AddedToken object with `content`.
fn special_token(config: &serde_json::Value, key: &str) -> Option<String> {
    match config.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        obj => obj.get("content")?.as_str().map(str::to_owned),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The shared SmolLM2 tokenizer; `../shared/models` sits beside every checkout, CI's too.
    pub(crate) fn smollm_tokenizer() -> Tokenizer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/models/smollm2-135m-instruct");
        Tokenizer::load(&dir).unwrap_or_else(|e| panic!("the test model is needed at {}: {e:#}", dir.display()))
    }

    #[test]
    fn special_tokens_and_template_come_from_the_config() {
        let tok = smollm_tokenizer();
        assert_eq!(tok.bos_token.as_deref(), Some("<|im_start|>"));
        assert_eq!(tok.eos_token.as_deref(), Some("<|im_end|>"));
        assert!(tok.chat_template.as_deref().unwrap().contains("im_start"));
        assert_eq!(tok.encode("<|im_start|>user").unwrap()[0], 1);
    }
}
