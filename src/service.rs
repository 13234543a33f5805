//! A model ready to answer: ONNX Runtime, tokenizer, model, engine and request frontend set up
//! from one [`Config`]. The daemon serves it over HTTP; the C ABI calls [`Service::call`]
//! directly. Both therefore load, validate and answer in exactly the same way.

use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;

use crate::api::{ApiError, Collector, Endpoint, Frontend};
use crate::config::Config;
use crate::engine::{Engine, Event};
use crate::model::{Model, runtime};
use crate::text::Tokenizer;

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

const NO_MODEL: &str = "no model folder: set `model` (--model DIR, CHATD_MODEL) to a folder in the onnxruntime-genai \
     layout (genai_config.json) or the Hugging Face Optimum layout (model.onnx, config.json, tokenizer.json, \
     tokenizer_config.json), for example one made by `huggingface-cli download HuggingFaceTB/SmolLM2-135M-Instruct \
     --include 'onnx/model.onnx' '*.json' --local-dir smollm2`";

pub struct Service {
    pub engine: Arc<Engine>,
    pub frontend: Arc<Frontend>,
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
        let model = Model::load(dir, &config.runtime).map_err(model_error)?;
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
        let engine = Arc::new(Engine::start(model, tokenizer, config.engine.clone()).map_err(model_error)?);
        let frontend =
            Frontend::new(&engine, config.served_model_name.clone(), config.limits.clone()).map_err(model_error)?;
        let model_bytes = crate::memory::resident_bytes().saturating_sub(resident_before);
        Ok(Self { engine, frontend: Arc::new(frontend), model_bytes })
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
        let parsed = self.frontend.parse(endpoint, body).map_err(CallError::Api)?;
        if on_text.is_some() && parsed.generate.n > 1 {
            return Err(CallError::Api(ApiError::invalid(
                "n",
                "streaming hands over one choice's text; ask for n > 1 without streaming",
            )));
        }
        let handle = self.frontend.submit(&self.engine, &parsed).map_err(CallError::Api)?;
        let mut collector = Collector::new(&parsed);
        let mut pieces = 0;
        loop {
            match handle.recv() {
                Some(Event::Done { usage, .. }) => return Ok(collector.finish(&usage, self.frontend.tokenizer())),
                Some(Event::Error(e)) => return Err(CallError::Api(Frontend::engine_error(&e))),
                Some(event) => {
                    if let (Event::Text { text, .. }, Some(on_text)) = (&event, on_text.as_mut())
                        && !text.is_empty()
                    {
                        pieces += 1;
                        if !on_text(text) {
                            // Dropping the handle cancels the request; the engine frees it next step.
                            return Err(CallError::Cancelled { pieces });
                        }
                    }
                    collector.add(event);
                }
                None => return Err(CallError::Api(ApiError::internal("the engine dropped the request"))),
            }
        }
    }
}
