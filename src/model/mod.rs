//! Faces ONNX Runtime: finding the runtime library, reading a model folder, and running the
//! decoder one chunk of tokens at a time with its KV cache. Nothing here knows about requests,
//! sampling or HTTP.

mod config;
mod optimum;
pub mod runtime;

use std::path::Path;

use anyhow::{Context, Result};

pub use config::ModelInfo;
pub use runtime::{RuntimeError, RuntimeOptions};

/// A loaded decoder model. `forward` takes `&mut self` because an ONNX Runtime session runs one
/// call at a time; the engine's scheduler thread owns the model.
pub struct Model {
    info: ModelInfo,
    layout: Layout,
}

/// The on-disk layouts chatd understands. The onnxruntime-genai layout slots in here as a
/// second variant with its own KV handling.
enum Layout {
    Optimum(optimum::OptimumModel),
}

/// One sequence's attention keys and values, as the model's layout keeps them.
pub struct KvCache {
    /// Tokens whose keys and values the cache holds.
    len: usize,
    inner: KvInner,
}

enum KvInner {
    Optimum(optimum::OptimumKv),
}

impl KvCache {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Model {
    /// Loads a model folder (see the README's "Model folders" for the files it reads).
    pub fn load(dir: &Path, options: &RuntimeOptions) -> Result<Self> {
        let info = ModelInfo::read(dir)?;
        let file = config::find_model_file(dir)?;
        let session = runtime::open_session(&file, options)
            .with_context(|| format!("loading {}", file.display()))?;
        let optimum = optimum::OptimumModel::new(session, &info)
            .with_context(|| format!("reading the inputs and outputs of {}", file.display()))?;
        Ok(Self {
            info,
            layout: Layout::Optimum(optimum),
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn new_cache(&self) -> Result<KvCache> {
        match &self.layout {
            Layout::Optimum(m) => Ok(KvCache {
                len: 0,
                inner: KvInner::Optimum(m.empty_cache()?),
            }),
        }
    }

    /// A second cache with the same contents, for another choice of the same prompt (`n > 1`).
    pub fn fork_cache(&self, cache: &KvCache) -> Result<KvCache> {
        match &cache.inner {
            KvInner::Optimum(kv) => Ok(KvCache {
                len: cache.len,
                inner: KvInner::Optimum(kv.deep_copy()?),
            }),
        }
    }

    /// Runs `tokens` after what `cache` holds, appends them to the cache, and writes the logits
    /// for the token after the last one into `logits` (vocabulary-sized).
    pub fn forward(
        &mut self,
        tokens: &[u32],
        cache: &mut KvCache,
        logits: &mut [f32],
    ) -> Result<()> {
        anyhow::ensure!(!tokens.is_empty(), "forward needs at least one token");
        match (&mut self.layout, &mut cache.inner) {
            (Layout::Optimum(m), KvInner::Optimum(kv)) => {
                m.forward(tokens, cache.len, kv, logits)?
            }
        }
        cache.len += tokens.len();
        Ok(())
    }
}
