//! A model ready to answer: ONNX Runtime, tokenizer, model, engine and request frontend set up
//! from one [`Config`]. The daemon serves it over HTTP; the C ABI calls [`Service::call`]
//! directly. Both therefore load, validate and answer in exactly the same way.

use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;

use crate::api::{ApiError, Collector, Ended, Endpoint, Frontend, follow};
use crate::config::Config;
use crate::engine::{Engine, Event};
use crate::model::{LoadedModel, kv_quant, runtime};
use crate::text::{ChatTemplate, Tokenizer};

/// Why a service could not be set up, by class (each is one C status).
#[derive(Debug)]
pub enum LoadError {
    /// A setting is missing or wrong.
    Config(String),
    /// ONNX Runtime could not be found or loaded.
    Runtime(String),
    /// The model folder could not be read or the model not loaded.
    Model(String),
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadError::Config(m) | LoadError::Runtime(m) | LoadError::Model(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for LoadError {}

/// Why a call produced no response.
#[derive(Debug)]
pub enum CallError {
    /// Refused or failed, with the error the HTTP API would answer.
    Api(ApiError),
    /// The caller's text callback asked to stop.
    Cancelled { pieces: usize },
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Api(e) => f.write_str(&e.message),
            CallError::Cancelled { pieces } => {
                write!(f, "the request was cancelled by the callback after {pieces} piece(s) of text")
            }
        }
    }
}

/// The memory the KV pool and the prefix cache may hold.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryBudget {
    pub kv_cache_bytes: usize,
    pub prefix_cache_bytes: usize,
    /// How they were chosen, said at start-up and in `/health`.
    pub reason: String,
}

/// Most the KV pool and the prefix cache get when chatd sizes them: the fixed defaults of
/// earlier versions, so a big box behaves as before.
const KV_CACHE_AUTO_MAX: usize = 1 << 30;
const PREFIX_CACHE_AUTO_MAX: usize = 256 << 20;
/// The least KV pool worth starting with: one sequence of ~300 positions of a 1B model.
const KV_CACHE_AUTO_MIN: usize = 16 << 20;

/// The budgets: those set are kept; the others are sized from `available` (the memory the
/// kernel says is available once the model is loaded): the KV pool 2/5 of it and the prefix
/// cache 1/10, so that together they take at most half and the rest stays for ONNX Runtime's
/// working memory, requests and the box's other programs. A box with 1 GiB free after loading
/// gets 410 and 102 MiB.
pub fn size_budget(available: Option<usize>, kv: Option<usize>, prefix: Option<usize>) -> MemoryBudget {
    let mib = |b: usize| b >> 20;
    if let (Some(kv), Some(prefix)) = (kv, prefix) {
        return MemoryBudget {
            kv_cache_bytes: kv,
            prefix_cache_bytes: prefix,
            reason: format!("memory budgets as set: KV cache {} MiB, prefix cache {} MiB", mib(kv), mib(prefix)),
        };
    }
    let Some(available) = available else {
        let (kv, prefix) = (kv.unwrap_or(KV_CACHE_AUTO_MAX), prefix.unwrap_or(PREFIX_CACHE_AUTO_MAX));
        return MemoryBudget {
            kv_cache_bytes: kv,
            prefix_cache_bytes: prefix,
            reason: format!(
                "memory budgets: KV cache {} MiB, prefix cache {} MiB (the available memory could not be read \
                 from /proc/meminfo; set kv_cache_mb and prefix_cache_mb to choose)",
                mib(kv),
                mib(prefix)
            ),
        };
    };
    let kv_cache_bytes = kv.unwrap_or((available / 5 * 2).clamp(KV_CACHE_AUTO_MIN, KV_CACHE_AUTO_MAX));
    let prefix_cache_bytes = prefix.unwrap_or((available / 10).min(PREFIX_CACHE_AUTO_MAX));
    let how = |set: bool| if set { "as set" } else { "sized" };
    MemoryBudget {
        kv_cache_bytes,
        prefix_cache_bytes,
        reason: format!(
            "memory budgets: KV cache {} MiB ({}), prefix cache {} MiB ({}); {} MiB were available after loading \
             the model, and chatd sizes what is not set to at most half of that (set kv_cache_mb and \
             prefix_cache_mb to choose)",
            mib(kv_cache_bytes),
            how(kv.is_some()),
            mib(prefix_cache_bytes),
            how(prefix.is_some()),
            mib(available)
        ),
    }
}

const NO_MODEL: &str = "no model folder: set `model` (--model DIR, CHATD_MODEL) to a folder in the onnxruntime-genai \
     layout (genai_config.json) or the Hugging Face Optimum layout (model.onnx, config.json, tokenizer.json, \
     tokenizer_config.json), for example one made by `huggingface-cli download HuggingFaceTB/SmolLM2-135M-Instruct \
     --include 'onnx/model.onnx' '*.json' --local-dir smollm2`";

/// The calibration chat of a quantized KV cache, as requests reach the model: rendered with the
/// model's chat template (its special tokens included), or as plain lines without one.
fn calibration_tokens(tokenizer: &Tokenizer) -> anyhow::Result<Vec<u32>> {
    let chat = kv_quant::CALIBRATION_CHAT;
    let messages: Vec<Value> =
        chat.iter().map(|(role, content)| serde_json::json!({"role": role, "content": content})).collect();
    let text = match &tokenizer.chat_template {
        Some(source) => {
            let template = ChatTemplate::new(source, tokenizer.bos_token.as_deref(), tokenizer.eos_token.as_deref())?;
            template.render(&Value::from(messages), None, true, None)?
        }
        None => chat.iter().map(|(_, content)| *content).collect::<Vec<_>>().join("\n\n"),
    };
    tokenizer.encode(&text)
}

pub struct Service {
    pub engine: Arc<Engine>,
    pub frontend: Arc<Frontend>,
    /// The KV pool's and prefix cache's budgets, as set or as sized at load.
    pub budget: MemoryBudget,
    /// What loading took of the process's resident size: the weights, the tokenizer (and its
    /// token trie for constraints), ONNX Runtime's session and the engine's threads.
    pub model_bytes: usize,
}

impl Service {
    /// The cheap checks of `load`: the model folder exists and ONNX Runtime loads (once per
    /// process). Returns the model folder.
    pub fn check(config: &Config) -> Result<&std::path::Path, LoadError> {
        let dir = config.model.as_deref().ok_or_else(|| LoadError::Config(NO_MODEL.into()))?;
        if !dir.is_dir() {
            return Err(LoadError::Model(format!("model folder {} does not exist; {NO_MODEL}", dir.display())));
        }
        runtime::init(&config.runtime).map_err(|e| LoadError::Runtime(e.message))?;
        Ok(dir)
    }

    /// Loads ONNX Runtime (once per process), the tokenizer and the model, and starts the engine.
    pub fn load(config: &Config) -> Result<Self, LoadError> {
        let dir = Self::check(config)?;
        let model_error = |e: anyhow::Error| LoadError::Model(format!("{e:#}"));
        let started = Instant::now();
        let resident_before = crate::memory::resident_bytes();
        let tokenizer = Arc::new(Tokenizer::load(dir).map_err(model_error)?);
        let mut model =
            LoadedModel::load(dir, &config.runtime, &|| calibration_tokens(&tokenizer)).map_err(model_error)?;
        // Sized once the model is loaded: what is available then is what requests can have.
        let budget = size_budget(
            crate::memory::available_bytes(),
            config.kv_cache_set.then_some(config.runtime.kv_cache_bytes),
            config.prefix_cache_set.then_some(config.engine.prefix_cache_bytes),
        );
        log::info!("{}", budget.reason);
        model.set_kv_budget(budget.kv_cache_bytes);
        let mut engine_config = config.engine.clone();
        engine_config.prefix_cache_bytes = budget.prefix_cache_bytes;
        log::info!(
            "loaded {} ({} layout) in {:.2}s: {} layers, {} KV heads x {}, context {}, eos {:?}",
            dir.display(),
            model.layout_name(),
            started.elapsed().as_secs_f64(),
            model.info().num_layers,
            model.info().num_kv_heads,
            model.info().head_dim,
            model.info().context_length,
            model.info().eos_token_ids
        );
        let engine = Arc::new(Engine::start(model, tokenizer, engine_config).map_err(model_error)?);
        let frontend =
            Frontend::new(&engine, config.served_model_name.clone(), config.limits.clone()).map_err(model_error)?;
        // Loading frees what it parsed and copied on the way (the tokenizer's JSON, the copy
        // llguidance adjusts); hand those pages back rather than keep them in malloc's heap.
        crate::memory::give_back_freed();
        let model_bytes = crate::memory::resident_bytes().saturating_sub(resident_before);
        Ok(Self { engine, frontend: Arc::new(frontend), budget, model_bytes })
    }

    /// Answers one request body for `endpoint` and blocks until it is complete; the response is
    /// the endpoint's non-streaming JSON object whatever the body's `stream` says. With
    /// `on_text`, each new piece of text is handed over as it is generated (one choice only);
    /// returning false cancels the request.
    pub fn call(
        &self,
        endpoint: Endpoint,
        body: &[u8],
        mut on_text: Option<&mut dyn FnMut(&str) -> bool>,
    ) -> Result<Value, CallError> {
        let mut parsed = self.frontend.parse(endpoint, body).map_err(CallError::Api)?;
        parsed.generate.incremental = on_text.is_some();
        if on_text.is_some() && parsed.generate.n > 1 {
            return Err(CallError::Api(ApiError::invalid(
                "n",
                "streaming hands over one choice's text; ask for n > 1 without streaming",
            )));
        }
        let handle = self.frontend.submit(&self.engine, &parsed).map_err(CallError::Api)?;
        let mut collector = Collector::new(&parsed);
        let mut pieces = 0;
        if let (Some(echo), Some(on_text)) = (&parsed.echo, on_text.as_mut())
            && !on_text(echo)
        {
            return Err(CallError::Cancelled { pieces });
        }
        let ended = follow(
            || Ok(handle.recv()),
            |event| {
                if let (Event::Text { text, .. }, Some(on_text)) = (&event, on_text.as_mut())
                    && !text.is_empty()
                {
                    pieces += 1;
                    if !on_text(text) {
                        return Err(CallError::Cancelled { pieces });
                    }
                }
                collector.add(event);
                Ok(())
            },
        );
        match ended {
            Ended::Done { usage, .. } => Ok(collector.finish(&usage, self.frontend.tokenizer())),
            Ended::Failed(e) => Err(CallError::Api(e)),
            // Dropping the handle (on return) cancels the request; the engine frees it next step.
            Ended::Stopped(stop) => Err(stop),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_not_set_take_at_most_half_of_what_is_available() {
        let gib = 1usize << 30;
        let b = size_budget(Some(gib), None, None);
        assert_eq!((b.kv_cache_bytes >> 20, b.prefix_cache_bytes >> 20), (409, 102));
        assert!(b.kv_cache_bytes + b.prefix_cache_bytes <= gib / 2);
        assert!(b.reason.contains("1024 MiB were available"), "{}", b.reason);
        // A big box: the caps of the old fixed defaults.
        let b = size_budget(Some(16 * gib), None, None);
        assert_eq!((b.kv_cache_bytes, b.prefix_cache_bytes), (1 << 30, 256 << 20));
        // A tiny one still gets a usable pool.
        assert_eq!(size_budget(Some(20 << 20), None, None).kv_cache_bytes, 16 << 20);
        // What is set is kept.
        let b = size_budget(Some(gib), Some(64 << 20), None);
        assert_eq!((b.kv_cache_bytes, b.prefix_cache_bytes >> 20), (64 << 20, 102));
        assert!(b.reason.contains("64 MiB (as set)"), "{}", b.reason);
        let b = size_budget(None, Some(64 << 20), Some(0));
        assert_eq!((b.kv_cache_bytes, b.prefix_cache_bytes), (64 << 20, 0));
        assert_eq!(size_budget(None, None, None).kv_cache_bytes, 1 << 30);
    }
}
