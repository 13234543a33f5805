//! Faces ONNX Runtime: finding the runtime library, reading a model folder, and running the
//! decoder one chunk of tokens at a time with its KV cache. Nothing here knows about requests,
//! sampling or HTTP.

mod config;
mod genai;
mod kv_pool;
pub mod kv_quant;
mod layout;
mod logit_positions;
mod optimum;
mod pages;
mod proto;
pub mod runtime;

use std::path::Path;

use anyhow::{Context, Result};

pub use config::{GenerationDefaults, MarkerIds, ModelInfo};
use kv_pool::KvPool;
pub use kv_quant::KvCacheDtype;
pub use layout::Layout;
pub use runtime::{Provider, RuntimeError, RuntimeOptions};

/// A loaded decoder model of layout `L`. `forward` takes `&mut self` because an ONNX Runtime
/// session runs one call at a time; the engine's scheduler thread owns the model.
pub struct Model<L: Layout> {
    info: ModelInfo,
    layout: L,
    provider: Provider,
}

/// A model as `load` found it, in whichever layout its folder has. The only place that lists
/// the layouts: everything past loading is generic over [`Layout`] (see [`UseModel`]).
// Made once and moved once into the engine: a box would buy nothing for the variants' sizes.
#[allow(clippy::large_enum_variant)]
pub enum LoadedModel {
    /// Hugging Face Optimum: each sequence's presents come back as new tensors, run one
    /// sequence at a time (its graph makes every row of a batch pay for the longest).
    Optimum(Model<optimum::OptimumModel>),
    /// onnxruntime-genai: a shared in-place KV pool, decode steps batched across sequences.
    Genai(Model<genai::GenaiModel>),
}

/// What takes a loaded model over, whatever its layout (the engine's start).
pub trait UseModel {
    type Output;
    fn with<L: Layout>(self, model: Model<L>) -> Self::Output;
}

/// `$body` with `$model` bound to the model of each layout.
macro_rules! each_layout {
    ($loaded:expr, $model:ident => $body:expr) => {
        match $loaded {
            LoadedModel::Optimum($model) => $body,
            LoadedModel::Genai($model) => $body,
        }
    };
}

/// One sequence's attention keys and values, as layout `L` keeps them.
pub struct KvCache<L: Layout> {
    /// Tokens whose keys and values the cache holds.
    len: usize,
    inner: L::Kv,
}

/// A copy of a cache's keys and values, kept outside the model's working memory (the prefix
/// cache): `[kv_heads, len, head_dim]` per layer input, keys and values alternating.
pub struct KvSnapshot {
    len: usize,
    /// In mapped memory of their own (`pages`): an evicted snapshot is given back at once.
    data: Vec<pages::Pages>,
}

impl KvSnapshot {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn bytes(&self) -> usize {
        self.data.iter().map(|d| d.len() * std::mem::size_of::<f32>()).sum()
    }

    /// A snapshot of made-up values, for tests of what stores snapshots.
    #[cfg(test)]
    pub(crate) fn synthetic(len: usize, floats_per_position: usize) -> Self {
        Self { len, data: vec![pages::Pages::zeroed(len * floats_per_position)] }
    }
}

/// One sequence's next token in a batched decode step.
pub struct DecodeItem<'a, L: Layout> {
    pub cache: &'a mut KvCache<L>,
    pub token: u32,
    pub logits: &'a mut [f32],
}

impl<L: Layout> KvCache<L> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl LoadedModel {
    /// Loads a model folder: the onnxruntime-genai layout when it has `genai_config.json`, else
    /// the Hugging Face Optimum layout (see the README's "Model folders"). `calibration` gives
    /// the tokens of [`kv_quant::CALIBRATION_CHAT`] as the model sees them; it is called only
    /// for a quantized KV cache.
    pub fn load(dir: &Path, options: &RuntimeOptions, calibration: &dyn Fn() -> Result<Vec<u32>>) -> Result<Self> {
        if dir.join("genai_config.json").exists() {
            if options.provider != Provider::Cpu {
                anyhow::bail!(
                    "the onnxruntime-genai layout runs on the CPU provider only (its shared KV pool lives in host \
                     memory); use a Hugging Face Optimum layout folder with --provider {}",
                    options.provider
                );
            }
            let mut config = genai::GenaiConfig::read(dir)?;
            let mut options = options.clone();
            if let (false, Some(threads)) = (options.intra_threads_set, config.intra_op_threads) {
                options.intra_threads = threads;
            }
            let model = load_genai(&mut config, &options, calibration)
                .with_context(|| format!("loading {}", config.file.display()))?;
            return Ok(Self::Genai(Model { info: config.info, layout: model, provider: options.provider }));
        }
        anyhow::ensure!(
            options.kv_cache_dtype == KvCacheDtype::Float32,
            "kv_cache_dtype {} needs the onnxruntime-genai layout (GroupQueryAttention stores the cache quantized); \
             this folder is in the Optimum layout",
            options.kv_cache_dtype
        );
        let info = ModelInfo::read(dir)?;
        let file = config::find_model_file(dir)?;
        let session = runtime::open_session(&file, options).with_context(|| format!("loading {}", file.display()))?;
        let optimum = optimum::OptimumModel::new(session, &info)
            .with_context(|| format!("reading the inputs and outputs of {}", file.display()))?;
        Ok(Self::Optimum(Model { info, layout: optimum, provider: options.provider }))
    }

    pub fn info(&self) -> &ModelInfo {
        each_layout!(self, m => m.info())
    }

    pub fn layout_name(&self) -> &'static str {
        each_layout!(self, m => m.layout_name())
    }

    /// Sets the shared KV pool's budget (layouts without a pool have none).
    pub fn set_kv_budget(&mut self, bytes: usize) {
        each_layout!(self, m => m.set_kv_budget(bytes))
    }

    /// Hands the model, in its own layout's type, to `user`.
    pub fn with<U: UseModel>(self, user: U) -> U::Output {
        each_layout!(self, m => user.with(m))
    }
}

impl<L: Layout> Model<L> {
    /// How the shared KV pool stores keys and values (float32 where there is none).
    pub fn kv_cache_dtype(&self) -> KvCacheDtype {
        self.layout.kv_cache_dtype()
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The execution provider the model runs on.
    pub fn provider(&self) -> Provider {
        self.provider
    }

    /// "optimum" or "genai".
    pub fn layout_name(&self) -> &'static str {
        L::NAME
    }

    /// Whether `count` new sequences of `positions` tokens fit the KV budget now.
    pub fn has_room_for(&self, positions: usize, count: usize) -> bool {
        self.layout.pool().is_none_or(|p| p.has_room_for(positions, count))
    }

    /// The longest a sequence can grow now (the pool's budget; unbounded without a pool).
    pub fn kv_position_limit(&self) -> usize {
        self.layout.pool().map_or(usize::MAX, KvPool::position_limit)
    }

    /// Bytes held for keys and values by the shared pool (caches a layout keeps per sequence
    /// are not counted here: see `private_cache_bytes`).
    pub fn kv_pool_bytes(&self) -> usize {
        self.layout.pool().map_or(0, KvPool::allocated_bytes)
    }

    /// Bytes of the shared pool resident in memory (positions never written take none).
    pub fn kv_pool_resident_bytes(&self) -> usize {
        self.layout.pool().map_or(0, KvPool::resident_bytes)
    }

    /// Bytes of the shared pool held by live sequences now.
    pub fn kv_pool_used_bytes(&self) -> usize {
        self.layout.pool().map_or(0, KvPool::used_bytes)
    }

    /// Bytes of keys and values `cache` holds outside the shared pool (an Optimum-layout
    /// cache's own tensors; a genai-layout cache is a row of the pool, counted there).
    pub fn private_cache_bytes(&self, cache: &KvCache<L>) -> usize {
        self.layout.private_kv_bytes(&self.info, cache.len)
    }

    /// Bytes one sequence's row takes in the shared pool now (0 without a pool).
    pub fn kv_row_bytes(&self) -> usize {
        self.layout.pool().map_or(0, |p| p.capacity() * p.bytes_per_position())
    }

    /// Sets the shared KV pool's budget.
    pub fn set_kv_budget(&mut self, bytes: usize) {
        if let Some(pool) = self.layout.pool_mut() {
            pool.set_budget(bytes);
        }
    }

    /// Gives back the memory of the pool's rows no sequence holds.
    pub fn discard_free_kv_rows(&mut self) {
        if let Some(pool) = self.layout.pool_mut() {
            pool.discard_free_rows();
        }
    }

    /// Gives back working memory no sequence uses (the pool, when no row is leased).
    pub fn release_idle_memory(&mut self) {
        if let Some(pool) = self.layout.pool_mut() {
            pool.release_if_idle();
        }
    }

    pub fn new_cache(&mut self) -> Result<KvCache<L>> {
        Ok(KvCache { len: 0, inner: self.layout.new_kv()? })
    }

    /// A second cache with the same contents, for another choice of the same prompt (`n > 1`).
    pub fn fork_cache(&mut self, cache: &KvCache<L>) -> Result<KvCache<L>> {
        Ok(KvCache { len: cache.len, inner: self.layout.fork_kv(&cache.inner, cache.len)? })
    }

    /// Copies the keys and values of `cache` out of the model's working memory.
    pub fn snapshot(&self, cache: &KvCache<L>) -> Result<KvSnapshot> {
        Ok(KvSnapshot { len: cache.len, data: self.layout.read_kv(&cache.inner, cache.len)? })
    }

    /// A new cache holding the first `len` positions of `snapshot`.
    pub fn restore(&mut self, snapshot: &KvSnapshot, len: usize) -> Result<KvCache<L>> {
        anyhow::ensure!(len <= snapshot.len, "restoring {len} of {} positions", snapshot.len);
        Ok(KvCache { len, inner: self.layout.restore_kv(&snapshot.data, snapshot.len, len)? })
    }

    /// Runs `tokens` after what `cache` holds, appends them to the cache, and writes the logits
    /// for the token after the last one into `logits` (vocabulary-sized).
    pub fn forward(&mut self, tokens: &[u32], cache: &mut KvCache<L>, logits: &mut [f32]) -> Result<()> {
        anyhow::ensure!(!tokens.is_empty(), "forward needs at least one token");
        self.layout.forward(tokens, &mut cache.inner, cache.len, logits)?;
        cache.len += tokens.len();
        Ok(())
    }

    /// Whether `verify` and `truncate` work: a layout whose KV cache can be cut back cheaply.
    pub fn can_verify(&self) -> bool {
        L::CAN_VERIFY
    }

    /// Whether feeding `tokens` in one run gives bit for bit what feeding them in runs of
    /// `piece` tokens gives, on this machine's kernels: the last logits of both are compared.
    /// ONNX Runtime's CPU kernels pass for runs of two tokens or more (they treat each row
    /// alone), though a one-token run rounds differently (see the scheduler's `Cut`); a GPU's
    /// matrix kernels may pick their algorithm by the number of rows.
    pub fn runs_agree(&mut self, tokens: &[u32], piece: usize) -> Result<bool> {
        let vocab = self.info.vocab_size;
        let mut whole = vec![0.0f32; vocab];
        let mut cache = self.new_cache()?;
        self.forward(tokens, &mut cache, &mut whole)?;
        drop(cache);
        let mut pieces = vec![0.0f32; vocab];
        let mut cache = self.new_cache()?;
        for part in tokens.chunks(piece.max(1)) {
            self.forward(part, &mut cache, &mut pieces)?;
        }
        drop(cache);
        self.release_idle_memory();
        Ok(whole.iter().zip(&pieces).all(|(a, b)| a.to_bits() == b.to_bits()))
    }

    /// Like `forward`, but writes the logits after every one of `tokens` into `logits`
    /// (`tokens.len()` vocabulary-sized rows): checking draft tokens takes one run.
    pub fn verify(&mut self, tokens: &[u32], cache: &mut KvCache<L>, logits: &mut Vec<f32>) -> Result<()> {
        anyhow::ensure!(!tokens.is_empty(), "verify needs at least one token");
        let rows = self.layout.verify(tokens, &mut cache.inner, cache.len)?;
        logits.clear();
        logits.extend_from_slice(rows);
        cache.len += tokens.len();
        Ok(())
    }

    /// Cuts `cache` back to its first `len` positions (rejected draft tokens).
    pub fn truncate(&mut self, cache: &mut KvCache<L>, len: usize) -> Result<()> {
        anyhow::ensure!(len <= cache.len, "cannot truncate a cache of {} positions to {len}", cache.len);
        self.layout.truncate(&mut cache.inner, len)?;
        cache.len = len;
        Ok(())
    }

    /// Feeds one token to each item's sequence (one batched run where the layout batches).
    pub fn decode(&mut self, items: &mut [DecodeItem<'_, L>]) -> Result<()> {
        self.layout.decode(items)?;
        for item in items.iter_mut() {
            item.cache.len += 1;
        }
        Ok(())
    }
}

/// The genai layout's model, its caches stored as `options.kv_cache_dtype`: for a quantized
/// cache, the float model is run once over the calibration chat first, and dropped before the
/// quantized one is opened (see `kv_quant`).
fn load_genai(
    config: &mut genai::GenaiConfig,
    options: &RuntimeOptions,
    calibration: &dyn Fn() -> Result<Vec<u32>>,
) -> Result<genai::GenaiModel> {
    let session = genai::open(config, options, None)?;
    let dtype = options.kv_cache_dtype;
    let float = genai::GenaiModel::new(session, config, options.kv_cache_bytes, KvCacheDtype::Float32)?;
    if dtype == KvCacheDtype::Float32 {
        return Ok(float);
    }
    let started = std::time::Instant::now();
    let tokens = calibration()?;
    let mut float = float;
    float.set_kv_budget(usize::MAX);
    let magnitudes = float.channel_magnitudes(&tokens).context("running the calibration chat")?;
    drop(float);
    let scales = kv_quant::Scales::from_magnitudes(dtype, &magnitudes);
    let session = genai::open(config, options, Some(&scales))?;
    let model = genai::GenaiModel::new(session, config, options.kv_cache_bytes, dtype)?;
    log::info!(
        "KV cache stored as {dtype}, scaled per channel from a {}-token calibration chat ({:.2}s)",
        tokens.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(model)
}
