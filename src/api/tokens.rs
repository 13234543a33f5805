//! The tokenizer and chat template on their own, as llama-server and vLLM serve them:
//! `/tokenize`, `/detokenize` and `/apply-template`. Each takes both servers' field names and
//! answers with both servers' result fields, so either's clients work unchanged.

use serde_json::{Value, json};

use super::params::{self, Fields, wrong_type};
use super::{ApiError, Frontend, compat};

impl Frontend {
    /// `/tokenize`: `content` (llama-server) or `prompt` (vLLM) text, or vLLM's chat form
    /// (`messages`, rendered by the template); `add_special` / `add_special_tokens`;
    /// `with_pieces` (llama-server) / `return_token_strs` (vLLM).
    pub fn tokenize(&self, body: &[u8]) -> Result<Value, ApiError> {
        let mut obj = params::object(body)?;
        let messages = obj.shift_remove("messages");
        let f = Fields::new(&obj);
        self.model(&f)?;
        let limits = self.limits();
        let special = f.bool("add_special")?.or(f.bool("add_special_tokens")?);
        let ids = match (messages, f.get("content").or(f.get("prompt"))) {
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid("messages", "give either `messages` or a text, not both"));
            }
            (Some(messages), None) => {
                let (mode, tools) = self.tools(&f)?;
                let text = self.chat_text(Some(messages), &f, &limits, tools, &mode)?;
                self.encode_prompt(&text, "messages", &limits, special.unwrap_or(false))?
            }
            (None, Some(Value::String(text))) => {
                let param = if f.get("content").is_some() { "content" } else { "prompt" };
                self.encode_prompt(text, param, &limits, special.unwrap_or(true))?
            }
            (None, Some(other)) => return Err(wrong_type("content", "a string", other)),
            (None, None) => {
                return Err(ApiError::invalid("content", "`content` (or `prompt`, or `messages`) is required"));
            }
        };
        let with_pieces = f.bool("with_pieces")?.unwrap_or(false);
        let token_strs = f.bool("return_token_strs")?.unwrap_or(false);
        compat::refuse_unread(&f, "")?;
        let tokenizer = self.tokenizer();
        let tokens: Vec<Value> = if with_pieces {
            ids.iter().map(|&id| json!({"id": id, "piece": tokenizer.token_text(id)})).collect()
        } else {
            ids.iter().map(|&id| json!(id)).collect()
        };
        let mut answer = json!({"tokens": tokens, "count": ids.len(), "max_model_len": self.info().context_length});
        if token_strs {
            answer["token_strs"] = ids.iter().map(|&id| Value::String(tokenizer.token_text(id))).collect();
        }
        Ok(answer)
    }

    /// `/detokenize`: `tokens` back to text, as `content` (llama-server) and `prompt` (vLLM).
    pub fn detokenize(&self, body: &[u8]) -> Result<Value, ApiError> {
        let obj = params::object(body)?;
        let f = Fields::new(&obj);
        self.model(&f)?;
        let ids: Vec<u32> = match f.get("tokens") {
            Some(Value::Array(items)) => items.iter().map(|v| self.token_id(v, "tokens")).collect::<Result<_, _>>()?,
            Some(other) => return Err(wrong_type("tokens", "an array of token ids", other)),
            None => return Err(ApiError::invalid("tokens", "`tokens` is required")),
        };
        compat::refuse_unread(&f, "")?;
        let text = self.tokenizer().decode(&ids).map_err(|e| ApiError::internal(format!("{e:#}")))?;
        Ok(json!({"content": text, "prompt": text}))
    }

    /// `/apply-template` (llama-server): the prompt a chat request would be given, as text.
    pub fn apply_template(&self, body: &[u8]) -> Result<Value, ApiError> {
        let mut obj = params::object(body)?;
        let messages = obj.shift_remove("messages");
        let f = Fields::new(&obj);
        self.model(&f)?;
        let (mode, tools) = self.tools(&f)?;
        let text = self.chat_text(messages, &f, &self.limits(), tools, &mode)?;
        compat::refuse_unread(&f, "")?;
        Ok(json!({"prompt": text}))
    }
}
