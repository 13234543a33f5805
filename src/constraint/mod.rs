//! Constrained decoding: a regex, a JSON schema, a grammar or a forced tool call becomes a
//! token mask applied to the logits before every sample, so each token keeps the output valid,
//! and the completion ends as soon as the constraint is complete. llguidance does the work.
//!
//! Compiling happens on the HTTP thread that parsed the request (never on the engine thread),
//! and compiled constraints are cached, so a repeated schema costs one clone.

mod gbnf;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use anyhow::{Result, anyhow};
use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde_json::{Value, json};

use crate::text::Tokenizer;

/// What a request asks its output to be.
#[derive(Clone, Debug, PartialEq)]
pub enum Spec {
    /// SGLang's `regex`: the whole completion matches it.
    Regex(String),
    /// `response_format: {"type": "json_object"}`.
    JsonObject,
    /// `response_format: {"type": "json_schema", ...}`, or a forced tool call's schema.
    JsonSchema(Value),
    /// `grammar`: llguidance's Lark dialect.
    Lark(String),
    /// SGLang's `ebnf`: GBNF (`root ::= ...`), converted to Lark.
    Gbnf(String),
}

impl Spec {
    fn grammar(&self) -> Result<TopLevelGrammar, String> {
        Ok(match self {
            Spec::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Spec::JsonObject => TopLevelGrammar::from_json_schema(strict_json(json!({"type": "object"}))),
            Spec::JsonSchema(schema) => TopLevelGrammar::from_json_schema(strict_json(schema.clone())),
            Spec::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
            Spec::Gbnf(text) => TopLevelGrammar::from_lark(gbnf::to_lark(text)?),
        })
    }

    fn cache_key(&self) -> String {
        match self {
            Spec::Regex(rx) => format!("regex\0{rx}"),
            Spec::JsonObject => "json_object".into(),
            Spec::JsonSchema(schema) => format!("schema\0{schema}"),
            Spec::Lark(lark) => format!("lark\0{lark}"),
            Spec::Gbnf(text) => format!("gbnf\0{text}"),
        }
    }
}

/// JSON without free whitespace: a small model cannot wander into blank lines.
fn strict_json(mut schema: Value) -> Value {
    if let Value::Object(map) = &mut schema {
        let guidance = map.entry("x-guidance").or_insert_with(|| json!({}));
        if let Value::Object(g) = guidance {
            g.entry("whitespace_flexible").or_insert(Value::Bool(false));
        }
    }
    schema
}

/// A compiled constraint, ready to be cloned into each sequence that follows it.
#[derive(Clone)]
pub struct Prepared {
    matcher: Arc<Matcher>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Prepared constraint")
    }
}

impl Prepared {
    /// A fresh state for one sequence.
    pub fn start(&self) -> Constraint {
        Constraint { matcher: self.matcher.deep_clone() }
    }
}

/// Compiles constraints for one tokenizer and keeps the most recent ones.
pub struct Compiler {
    factory: Arc<ParserFactory>,
    cache: Mutex<VecDeque<(String, Prepared)>>,
}

/// Compiled constraints kept for reuse.
const CACHE_ENTRIES: usize = 64;

impl Compiler {
    /// `eos` are the model's end-of-sequence ids (allowed once the constraint is complete);
    /// `vocab_size` is the width of the model's logits.
    pub fn new(tokenizer: &Tokenizer, eos: &[u32], vocab_size: usize) -> Result<Self> {
        let mut bytes = toktrie_hf_tokenizers::ByteTokenizer::from_tokenizer(tokenizer.inner().clone())
            .map_err(|e| anyhow!("preparing the tokenizer for constraints: {e}"))?;
        bytes.set_eos_tokens(eos);
        let env = bytes
            .into_tok_env(Some(vocab_size))
            .map_err(|e| anyhow!("preparing the tokenizer for constraints: {e}"))?;
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| anyhow!("preparing constraints: {e}"))?;
        factory.quiet();
        Ok(Self { factory: Arc::new(factory), cache: Mutex::new(VecDeque::new()) })
    }

    /// Compiles `spec`, or returns the cached compilation; the error is the compiler's message.
    pub fn compile(&self, spec: &Spec) -> Result<Prepared, String> {
        let key = spec.cache_key();
        {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = cache.iter().position(|(k, _)| *k == key) {
                let entry = cache.remove(i).expect("index in range");
                let prepared = entry.1.clone();
                cache.push_front(entry);
                return Ok(prepared);
            }
        }
        let parser = self.factory.create_parser(spec.grammar()?).map_err(|e| e.to_string())?;
        let mut matcher = Matcher::new(Ok(parser));
        // Building the first mask compiles the lexer: a grammar that cannot even start fails here.
        matcher.compute_mask().map_err(|e| e.to_string())?;
        if let Some(error) = matcher.get_error() {
            return Err(error);
        }
        let prepared = Prepared { matcher: Arc::new(matcher) };
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.push_front((key, prepared.clone()));
        cache.truncate(CACHE_ENTRIES);
        Ok(prepared)
    }
}

/// One sequence's progress through its constraint.
pub struct Constraint {
    matcher: Matcher,
}

/// What the constraint allows next.
pub enum Next {
    /// Sample among the tokens left in the logits (the rest were set to -inf).
    Sample,
    /// The constraint is complete: end the completion here.
    Complete,
}

impl Constraint {
    /// Masks `logits` to the tokens that keep the output valid (end-of-sequence only where the
    /// constraint is complete).
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<Next> {
        if self.matcher.is_stopped() {
            return Ok(Next::Complete);
        }
        let mask = self.matcher.compute_mask_or_eos().map_err(|e| anyhow!("constraint: {e}"))?;
        if mask.is_zero() {
            return Err(anyhow!("the constraint allows no token here"));
        }
        mask.iter_unset_entries(|t| {
            if let Some(l) = logits.get_mut(t) {
                *l = f32::NEG_INFINITY;
            }
        });
        Ok(Next::Sample)
    }

    /// Records a sampled (non end-of-sequence) token.
    pub fn consume(&mut self, token: u32) -> Result<()> {
        self.matcher.consume_token(token).map_err(|e| anyhow!("constraint: {e}"))
    }

    /// Whether nothing more can follow (the completion must end).
    pub fn is_complete(&self) -> bool {
        self.matcher.is_stopped()
    }
}
