//! The onnxruntime-genai layout (`genai_config.json`, `GroupQueryAttention`): one KV buffer per
//! layer shared by all sequences, bound as both `past_key_values.*` and `present.*`, so a step
//! writes only the new token's keys and values and copies nothing. Decode steps of many
//! sequences run as one batch; each row's length comes from its attention-mask row
//! (right-padded). Prompt chunks run one sequence at a time, as `GroupQueryAttention` requires.
//!
//! Runs go through ONNX Runtime's C `Run` directly: the ort crate's safe paths either copy
//! borrowed inputs (IoBinding) or cannot bind one buffer as both input and output.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use ort::AsPointer;
use ort::memory::MemoryInfo;
use ort::session::Session;
use ort::value::{DynValueRefMut, Shape, TensorElementType, TensorRef, TensorRefMut, ValueType};
use serde_json::Value;

use super::config::{GenerationDefaults, MarkerIds, ids_of, read_json};
use super::kv_pool::{KvPool, RowLease};
use super::kv_quant::{self, CacheNames, KvCacheDtype, Scales};
use super::pages::Pages;
use super::runtime::{self, RuntimeOptions};
use super::{DecodeItem, Layout, ModelInfo, logit_positions, proto};

/// What `genai_config.json` says about the decoder.
pub struct GenaiConfig {
    pub file: PathBuf,
    pub info: ModelInfo,
    input_ids: String,
    attention_mask: String,
    position_ids: Option<String>,
    past_key: String,
    past_value: String,
    logits: String,
    present_key: String,
    present_value: String,
    pub intra_op_threads: Option<usize>,
    /// The execution provider the folder was built for (`provider_options` names it: "cuda",
    /// "dml", "webgpu"...); `None` for a CPU build.
    pub built_for: Option<String>,
    /// `sliding_window` of the decoder section: the attention window the model was trained
    /// with, which the graph may or may not apply (see `limit_to_window`).
    pub sliding_window: Option<usize>,
    /// The widest window the graph's attention applies (on some layers: Gemma 2 and 3 alternate
    /// windowed and global ones), or `sliding_window` where the graph was not read. ONNX
    /// Runtime's attention refuses a cache shorter than it, so every row holds at least this
    /// many positions (bounded by the context).
    pub applied_window: Option<usize>,
}

impl GenaiConfig {
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("genai_config.json");
        let root = read_json(&path)?;
        let model = &root["model"];
        let decoder = &model["decoder"];
        let search = &root["search"];
        let get_usize = |v: &Value, key: &str| -> Result<usize> {
            v.get(key)
                .and_then(Value::as_u64)
                .map(|n| n as usize)
                .with_context(|| format!("{} has no {key}", path.display()))
        };
        let name = |section: &str, key: &str, default: &str| -> String {
            decoder[section].get(key).and_then(Value::as_str).unwrap_or(default).to_owned()
        };
        if search.get("past_present_share_buffer").and_then(Value::as_bool) == Some(false) {
            bail!("{}: past_present_share_buffer false is not supported (use the Optimum layout)", path.display());
        }
        let num_heads = get_usize(decoder, "num_attention_heads")?;
        let head_dim = match get_usize(decoder, "head_size") {
            Ok(d) => d,
            Err(_) => get_usize(decoder, "hidden_size")? / num_heads,
        };
        // The builder keeps only some of generation_config.json's keys in `search` (it drops
        // Qwen2.5's repetition_penalty): the model's own file, when beside, has the last word,
        // as in the Optimum layout.
        let generation = match dir.join("generation_config.json") {
            p if p.exists() => read_json(&p)?,
            _ => Value::Null,
        };
        let mut sampling = search.clone();
        if let (Value::Object(into), Value::Object(from)) = (&mut sampling, &generation) {
            into.extend(from.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        let mut eos_token_ids = ids_of(model.get("eos_token_id"));
        for id in ids_of(generation.get("eos_token_id")) {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
        let info = ModelInfo {
            name: super::config::folder_name(dir),
            vocab_size: get_usize(model, "vocab_size")?,
            context_length: get_usize(model, "context_length")?,
            num_layers: get_usize(decoder, "num_hidden_layers")?,
            num_kv_heads: get_usize(decoder, "num_key_value_heads").unwrap_or(num_heads),
            head_dim,
            eos_token_ids,
            bos_token_id: ids_of(model.get("bos_token_id")).first().copied(),
            defaults: GenerationDefaults::from_json(&sampling),
            markers: MarkerIds::from_json(model),
        };
        let threads =
            decoder["session_options"].get("intra_op_num_threads").and_then(Value::as_u64).map(|n| n as usize);
        let sliding_window = match &decoder["sliding_window"] {
            Value::Number(n) => n.as_u64().map(|w| w as usize),
            section => section.get("window_size").and_then(Value::as_u64).map(|w| w as usize),
        };
        Ok(Self {
            file: dir.join(decoder.get("filename").and_then(Value::as_str).unwrap_or("model.onnx")),
            info,
            input_ids: name("inputs", "input_ids", "input_ids"),
            attention_mask: name("inputs", "attention_mask", "attention_mask"),
            position_ids: decoder["inputs"].get("position_ids").and_then(Value::as_str).map(str::to_owned),
            past_key: name("inputs", "past_key_names", "past_key_values.%d.key"),
            past_value: name("inputs", "past_value_names", "past_key_values.%d.value"),
            logits: name("outputs", "logits", "logits"),
            present_key: name("outputs", "present_key_names", "present.%d.key"),
            present_value: name("outputs", "present_value_names", "present.%d.value"),
            intra_op_threads: threads,
            built_for: built_for(&decoder["session_options"]),
            sliding_window,
            applied_window: sliding_window,
        })
    }

    /// Every layer's cache inputs and outputs, by name.
    pub fn cache_names(&self) -> CacheNames {
        let layer = |pattern: &str, l: usize| pattern.replace("%d", &l.to_string());
        let layers = 0..self.info.num_layers;
        CacheNames {
            past: layers.clone().map(|l| [layer(&self.past_key, l), layer(&self.past_value, l)]).collect(),
            present: layers.map(|l| [layer(&self.present_key, l), layer(&self.present_value, l)]).collect(),
        }
    }
}

/// What each input is fed with, in the order we pass them.
#[derive(Clone, Copy, PartialEq)]
enum Input {
    Ids,
    Mask,
    Positions,
    /// Which positions' logits a run returns (the input `logit_positions` adds at load).
    LogitPositions,
    /// Buffer index in the pool: layer * 2 (+1 for values).
    Kv(usize),
}

pub struct GenaiModel {
    session: Session,
    input_names: Vec<CString>,
    inputs: Vec<Input>,
    /// Logits first, then the presents in pool buffer order.
    output_names: Vec<CString>,
    pool: KvPool,
    vocab: usize,
    ids: Vec<i64>,
    mask: Vec<i64>,
    positions: Vec<i64>,
    /// Fed to `Input::LogitPositions`, when the model has it.
    logit_positions: Vec<i64>,
    /// Whether runs can return some positions' logits only (else every position's).
    picks_positions: bool,
    logits: AlignedBuf,
    /// How the pool stores keys and values, and the cache tensors' last dimension for it.
    dtype: KvCacheDtype,
    stored_dim: usize,
    /// The KV tensors of the last run and what they were made for (first row, rows,
    /// capacity, pool generation).
    kv_views: Vec<DynValueRefMut<'static>>,
    kv_views_key: Option<(usize, usize, usize, u64)>,
}

/// One sequence in a batched decode step.
struct DecodeRow<'a> {
    lease: &'a mut RowLease,
    len: usize,
    token: u32,
    logits: &'a mut [f32],
}

impl GenaiModel {
    /// A model over `session`, whose caches hold `dtype` (as the folder has them, or as
    /// `kv_quant` edited them).
    pub fn new(session: Session, config: &GenaiConfig, kv_budget_bytes: usize, dtype: KvCacheDtype) -> Result<Self> {
        let info = &config.info;
        let layers = info.num_layers;
        let mut input_names = Vec::new();
        let mut inputs = Vec::new();
        let model_inputs: Vec<String> = session.inputs().iter().map(|o| o.name().to_owned()).collect();
        let mut want = |name: &str, role: Input| -> Result<()> {
            ensure!(
                model_inputs.iter().any(|n| n == name),
                "the model has no input `{name}` (named in genai_config.json)"
            );
            input_names.push(CString::new(name)?);
            inputs.push(role);
            Ok(())
        };
        want(&config.input_ids, Input::Ids)?;
        want(&config.attention_mask, Input::Mask)?;
        if let Some(p) = &config.position_ids {
            want(p, Input::Positions)?;
        }
        let picks_positions = model_inputs.iter().any(|n| n == logit_positions::INPUT);
        if picks_positions {
            want(logit_positions::INPUT, Input::LogitPositions)?;
        }
        for layer in 0..layers {
            want(&config.past_key.replace("%d", &layer.to_string()), Input::Kv(layer * 2))?;
            want(&config.past_value.replace("%d", &layer.to_string()), Input::Kv(layer * 2 + 1))?;
        }
        ensure!(
            inputs.len() == model_inputs.len(),
            "the model has inputs genai_config.json does not describe: {:?}",
            model_inputs
                .iter()
                .filter(|n| !input_names.iter().any(|c| c.to_str() == Ok(n.as_str())))
                .collect::<Vec<_>>()
        );
        for outlet in session.inputs() {
            if let ValueType::Tensor { ty, shape, .. } = outlet.dtype() {
                if outlet.name().contains("past") {
                    ensure!(
                        *ty == element_type(dtype),
                        "{}",
                        kv_type_refusal(outlet.name(), &format!("{ty:?}"), config.built_for.as_deref())
                    );
                    let dims: &[i64] = shape;
                    if dims.len() == 4 && dims[1] > 0 && dims[1] as usize != info.num_kv_heads {
                        bail!(
                            "{} has {} KV heads, genai_config.json says {}",
                            outlet.name(),
                            dims[1],
                            info.num_kv_heads
                        );
                    }
                }
            }
        }
        let mut output_names = vec![CString::new(config.logits.as_str())?];
        for layer in 0..layers {
            output_names.push(CString::new(config.present_key.replace("%d", &layer.to_string()))?);
            output_names.push(CString::new(config.present_value.replace("%d", &layer.to_string()))?);
        }
        let model_outputs: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        for name in &output_names {
            let name = name.to_str()?;
            ensure!(model_outputs.contains(&name), "the model has no output `{name}` (named in genai_config.json)");
        }
        let head_bytes = dtype.head_bytes(info.head_dim);
        ensure!(head_bytes % 4 == 0, "a head of {} values cannot be stored as {dtype}", info.head_dim);
        let pool = KvPool::new(layers, info.num_kv_heads, head_bytes / 4, info.context_length, kv_budget_bytes)
            .with_min_capacity(config.applied_window.unwrap_or(0));
        Ok(Self {
            session,
            input_names,
            inputs,
            output_names,
            pool,
            vocab: info.vocab_size,
            ids: Vec::new(),
            mask: Vec::new(),
            positions: Vec::new(),
            logit_positions: Vec::new(),
            picks_positions,
            logits: AlignedBuf::default(),
            dtype,
            stored_dim: dtype.stored_dim(info.head_dim),
            kv_views: Vec::new(),
            kv_views_key: None,
        })
    }

    /// Per cache tensor (pool buffer order), each channel's largest magnitude over `tokens`
    /// (float32 caches only): what `kv_quant` makes its scales from.
    pub fn channel_magnitudes(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        ensure!(self.dtype == KvCacheDtype::Float32, "calibrating needs float32 caches");
        let lease = self.pool.lease()?;
        self.prefill(&lease, 0, tokens, false)?;
        let (heads, dim) = (self.pool.kv_heads(), self.stored_dim);
        let rows = self.pool.read_row(lease.row(), tokens.len());
        Ok(rows.iter().map(|data| kv_quant::channel_magnitudes(data, heads, tokens.len(), dim)).collect())
    }

    /// Sets the pool's budget (calibration runs unbounded).
    pub fn set_kv_budget(&mut self, bytes: usize) {
        self.pool.set_budget(bytes);
    }

    /// Feeds `tokens` (a prompt chunk, or a token and its draft continuation) to one sequence
    /// at batch size 1; returns the logits after each of them (`all`, `tokens.len()` rows) or
    /// at least after the last (the last row).
    fn prefill(&mut self, lease: &RowLease, len: usize, tokens: &[u32], all: bool) -> Result<&[f32]> {
        let n = tokens.len();
        self.pool.ensure_capacity(len + n)?;
        self.ids.clear();
        self.ids.extend(tokens.iter().map(|&t| i64::from(t)));
        self.mask.clear();
        self.mask.resize(len + n, 1);
        self.positions.clear();
        self.positions.extend((len..len + n).map(|p| p as i64));
        self.logit_positions.clear();
        if all || !self.picks_positions {
            self.logit_positions.extend(0..n as i64);
        } else {
            self.logit_positions.push(n as i64 - 1);
        }
        let rows = self.logit_positions.len();
        self.logits.resize(rows * self.vocab);
        self.run(lease.row(), 1, n, len + n)?;
        self.pool.set_row_len(lease.row(), len + n);
        Ok(&self.logits[..rows * self.vocab])
    }

    /// One token for each of `rows` in a single run. Leased rows that are not in the step ride
    /// along with a padding token written past their valid length, where it is overwritten later.
    fn decode_rows(&mut self, rows: &mut [DecodeRow<'_>]) -> Result<()> {
        for row in rows.iter_mut() {
            self.pool.move_down(row.lease, row.len);
        }
        // Rows 0..span go into the run; generating rows are packed at the bottom by now, so
        // rarely does a row not in this step ride along (with a padding token past its length).
        let span = rows.iter().map(|r| r.lease.row() + 1).max().unwrap_or(0);
        let mut lens: Vec<usize> = (0..span).map(|r| self.pool.row_len(r)).collect();
        let mut tokens = vec![0u32; span];
        for row in rows.iter() {
            lens[row.lease.row()] = row.len;
            tokens[row.lease.row()] = row.token;
        }
        let width = lens.iter().map(|l| l + 1).max().unwrap_or(1);
        self.pool.ensure_capacity(width)?;
        self.ids.clear();
        self.ids.extend(tokens.iter().map(|&t| i64::from(t)));
        self.mask.clear();
        self.positions.clear();
        for &len in &lens {
            self.mask.extend((0..width).map(|p| i64::from(p <= len)));
            self.positions.push(len as i64);
        }
        self.logit_positions.clear();
        self.logit_positions.push(0);
        self.logits.resize(span * self.vocab);
        self.run(0, span, 1, width)?;
        for row in rows.iter_mut() {
            let r = row.lease.row();
            row.logits.copy_from_slice(&self.logits[r * self.vocab..(r + 1) * self.vocab]);
            self.pool.set_row_len(r, row.len + 1);
        }
        Ok(())
    }

    /// Runs rows `first..first + batch` with `seq` new tokens each and an attention mask of
    /// `width` positions; the inputs are in `self.ids` / `self.mask` / `self.positions`.
    fn run(&mut self, first: usize, batch: usize, seq: usize, width: usize) -> Result<()> {
        let (heads, dim, capacity) = (self.pool.kv_heads(), self.stored_dim, self.pool.capacity());
        let kv_shape = Shape::new([batch as i64, heads as i64, capacity as i64, dim as i64]);
        let ids = TensorRef::from_array_view(([batch, seq], &self.ids[..]))?;
        let mask = TensorRef::from_array_view(([batch, width], &self.mask[..]))?;
        let positions = TensorRef::from_array_view(([batch, seq], &self.positions[..]))?;
        let picked = self.logit_positions.len();
        let logit_positions = TensorRef::from_array_view(([picked], &self.logit_positions[..]))?;
        let rows = if self.picks_positions { picked } else { seq };
        let kv_count = self.output_names.len() - 1;
        let key = (first, batch, capacity, self.pool.generation());
        if self.kv_views_key != Some(key) {
            // Wrapping 60 buffers costs a few microseconds each: done again only when the
            // rows in the run, the capacity or the buffers themselves change.
            self.kv_views.clear();
            for index in 0..kv_count {
                let ptr = self.pool.rows_ptr(index, first, batch).cast();
                // SAFETY: `rows_ptr` checked that rows first..first+batch of buffer `index` hold
                // batch*heads*capacity*dim values of the dtype (the pool's words are sized from
                // it); the views are rebuilt (the key changes) whenever the buffers move, and ONNX
                // Runtime never frees memory it did not allocate.
                self.kv_views.push(unsafe { kv_view(self.dtype, ptr, kv_shape.clone())? });
            }
            self.kv_views_key = Some(key);
        }
        let kv = &self.kv_views;
        let logits = {
            let ptr = self.logits.as_mut_ptr();
            // SAFETY: self.logits holds at least `len` floats and outlives the run.
            unsafe {
                TensorRefMut::<f32>::from_raw(
                    MemoryInfo::default(),
                    ptr.cast(),
                    Shape::new([batch as i64, rows as i64, self.vocab as i64]),
                )?
            }
        };
        debug_assert!(self.logits.len() >= batch * rows * self.vocab);
        let input_ptrs: Vec<*const ort::sys::OrtValue> = self
            .inputs
            .iter()
            .map(|input| match *input {
                Input::Ids => ids.ptr(),
                Input::Mask => mask.ptr(),
                Input::Positions => positions.ptr(),
                Input::LogitPositions => logit_positions.ptr(),
                Input::Kv(i) => kv[i].ptr(),
            })
            .collect();
        // The presents are the very same values as the pasts: the buffers are shared.
        let mut output_ptrs: Vec<*mut ort::sys::OrtValue> = Vec::with_capacity(kv_count + 1);
        output_ptrs.push(logits.ptr().cast_mut());
        output_ptrs.extend(kv.iter().map(|v| v.ptr().cast_mut()));
        let input_names: Vec<*const std::ffi::c_char> = self.input_names.iter().map(|n| n.as_ptr()).collect();
        let output_names: Vec<*const std::ffi::c_char> = self.output_names.iter().map(|n| n.as_ptr()).collect();
        let api = ort::api();
        // SAFETY: every pointer is valid for the call; outputs are preallocated values that ONNX
        // Runtime writes into and does not take ownership of.
        let status = unsafe {
            (api.Run)(
                self.session.ptr().cast_mut(),
                std::ptr::null(),
                input_names.as_ptr(),
                input_ptrs.as_ptr(),
                input_ptrs.len(),
                output_names.as_ptr(),
                output_names.len(),
                output_ptrs.as_mut_ptr(),
            )
        };
        check(status).context("running the model")
    }
}

/// A tensor of `dtype` values over `data`, which ONNX Runtime reads and writes in place.
///
/// # Safety
/// `data` must hold `shape`'s element count of `dtype` values and outlive the view.
unsafe fn kv_view(dtype: KvCacheDtype, data: *mut std::ffi::c_void, shape: Shape) -> Result<DynValueRefMut<'static>> {
    let memory = MemoryInfo::default();
    // SAFETY: as the caller promised.
    Ok(unsafe {
        match dtype {
            KvCacheDtype::Float32 => TensorRefMut::<f32>::from_raw(memory, data, shape)?.into_dyn(),
            KvCacheDtype::Int8 => TensorRefMut::<i8>::from_raw(memory, data, shape)?.into_dyn(),
            KvCacheDtype::Int4 => TensorRefMut::<u8>::from_raw(memory, data, shape)?.into_dyn(),
        }
    })
}

/// ONNX Runtime's element type of caches stored as `dtype`.
fn element_type(dtype: KvCacheDtype) -> TensorElementType {
    match dtype {
        KvCacheDtype::Float32 => TensorElementType::Float32,
        KvCacheDtype::Int8 => TensorElementType::Int8,
        KvCacheDtype::Int4 => TensorElementType::Uint8,
    }
}

/// The provider a builder wrote into `session_options.provider_options` (e.g.
/// `[{"cuda": {...}}]`), if any.
fn built_for(session_options: &Value) -> Option<String> {
    let first = session_options.get("provider_options")?.as_array()?.first()?.as_object()?;
    first.keys().next().cloned()
}

/// Why a folder whose KV cache is not float32 cannot run here, and what to build instead.
fn kv_type_refusal(input: &str, ty: &str, built_for: Option<&str>) -> String {
    let built = match built_for {
        Some(provider) => format!("this folder was built for {provider} (genai_config.json's provider_options)"),
        None => "this folder's KV cache is not float32".to_owned(),
    };
    format!(
        "{built}: {input} is {ty}, and chatd runs the genai layout with float32 keys and values on the CPU. Build a \
         CPU folder from the Hugging Face model: python -m onnxruntime_genai.models.builder -i HF_DIR -o OUT -p int4 \
         -e cpu (or use the Optimum layout)"
    )
}

impl Layout for GenaiModel {
    /// A row of the shared pool.
    type Kv = RowLease;
    const NAME: &'static str = "genai";
    const CAN_VERIFY: bool = true;

    fn new_kv(&mut self) -> Result<RowLease> {
        self.pool.lease()
    }

    fn fork_kv(&mut self, lease: &RowLease, len: usize) -> Result<RowLease> {
        let copy = self.pool.lease()?;
        self.pool.copy_row(lease.row(), copy.row(), len);
        self.pool.set_row_len(copy.row(), len);
        Ok(copy)
    }

    fn read_kv(&self, lease: &RowLease, len: usize) -> Result<Vec<Pages>> {
        Ok(self.pool.read_row(lease.row(), len))
    }

    fn restore_kv(&mut self, data: &[Pages], data_len: usize, len: usize) -> Result<RowLease> {
        let lease = self.pool.lease()?;
        self.pool.ensure_capacity(len + 1)?;
        self.pool.write_row(lease.row(), data, data_len, len);
        Ok(lease)
    }

    fn forward(&mut self, tokens: &[u32], lease: &mut RowLease, len: usize, logits: &mut [f32]) -> Result<()> {
        let rows = self.prefill(lease, len, tokens, false)?;
        logits.copy_from_slice(&rows[rows.len() - logits.len()..]);
        Ok(())
    }

    fn decode(&mut self, items: &mut [DecodeItem<'_, Self>]) -> Result<()> {
        let mut rows: Vec<DecodeRow<'_>> = items
            .iter_mut()
            .map(|item| DecodeRow {
                lease: &mut item.cache.inner,
                len: item.cache.len,
                token: item.token,
                logits: &mut *item.logits,
            })
            .collect();
        self.decode_rows(&mut rows)
    }

    fn verify(&mut self, tokens: &[u32], lease: &mut RowLease, len: usize) -> Result<&[f32]> {
        self.prefill(lease, len, tokens, true)
    }

    /// Forgets every position of the row from `len` on; they are overwritten by later runs.
    fn truncate(&mut self, lease: &mut RowLease, len: usize) -> Result<()> {
        self.pool.set_row_len(lease.row(), len);
        Ok(())
    }

    fn pool(&self) -> Option<&KvPool> {
        Some(&self.pool)
    }

    fn pool_mut(&mut self) -> Option<&mut KvPool> {
        Some(&mut self.pool)
    }

    fn kv_cache_dtype(&self) -> KvCacheDtype {
        self.dtype
    }
}

/// Opens the decoder with the `logit_positions` input added (see that module), or as it is
/// when the edit does not apply: very large single-file models (the edit holds a copy of the
/// file in memory while loading) and graphs without a node making the logits. With `scales`,
/// the caches are stored quantized (see `kv_quant`), whatever the file's size.
pub fn open(config: &mut GenaiConfig, options: &RuntimeOptions, scales: Option<&Scales>) -> Result<Session> {
    const EDIT_LIMIT: u64 = 256 << 20;
    let size = std::fs::metadata(&config.file).with_context(|| format!("reading {}", config.file.display()))?.len();
    if size > EDIT_LIMIT && scales.is_none() {
        return runtime::open_session(&config.file, options);
    }
    let mut bytes = std::fs::read(&config.file).with_context(|| format!("reading {}", config.file.display()))?;
    limit_to_window(config, &proto::attention_windows(&bytes)?);
    if size <= EDIT_LIMIT {
        match logit_positions::add_input(&bytes, &config.logits) {
            Ok(edited) => bytes = edited,
            Err(e) => log::warn!("computing the logits of every prompt position: {e:#}"),
        }
    }
    if let Some(scales) = scales {
        bytes = kv_quant::quantize_caches(&bytes, &config.cache_names(), config.info.head_dim, scales)
            .context("storing the KV cache quantized")?;
    }
    let dir = config.file.parent().unwrap_or(Path::new("."));
    runtime::open_session_from_memory(&bytes, dir, options)
}

/// Records the window the graph's attention applies (`applied_window`). A folder whose config
/// names a sliding window that the graph applies on no layer (the builder writes Mistral's into
/// genai_config.json, not into the graph): past the window the output would silently differ from
/// the model's, so the context is cut to the window and longer requests get
/// `context_length_exceeded`.
fn limit_to_window(config: &mut GenaiConfig, graph_windows: &[i64]) {
    config.applied_window = graph_windows.iter().filter(|&&w| w > 0).max().map(|&w| w as usize);
    let Some(window) = config.sliding_window else { return };
    if config.applied_window.is_some() || window >= config.info.context_length {
        return;
    }
    log::warn!(
        "genai_config.json names a sliding window of {window} tokens, but the graph's attention has none: past \
         {window} tokens the output would differ from the model's, so prompts and completions are limited to \
         {window} tokens (not {})",
        config.info.context_length
    );
    config.info.context_length = window;
}

fn check(status: ort::sys::OrtStatusPtr) -> Result<()> {
    if status.0.is_null() {
        return Ok(());
    }
    let api = ort::api();
    // SAFETY: a non-null status from the API; released after its message is copied.
    let message = unsafe {
        let text = std::ffi::CStr::from_ptr((api.GetErrorMessage)(status.0)).to_string_lossy().into_owned();
        (api.ReleaseStatus)(status.0);
        text
    };
    bail!("{message}")
}

/// A float buffer aligned to 64 bytes, as ONNX Runtime's own allocator aligns the tensors its
/// kernels expect (a plain `Vec<f32>` is only 16-byte aligned).
#[derive(Clone, Default)]
struct AlignedBuf {
    blocks: Vec<Block>,
    len: usize,
}

#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Block([f32; 16]);

const ZERO_BLOCK: Block = Block([0.0; 16]);

impl AlignedBuf {
    /// Grows or shrinks to `len` floats; new ones are zero.
    pub fn resize(&mut self, len: usize) {
        self.blocks.resize(len.div_ceil(16), ZERO_BLOCK);
        self.len = len;
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        // SAFETY: blocks hold at least `len` contiguous, initialised f32s.
        unsafe { std::slice::from_raw_parts(self.blocks.as_ptr().cast(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [f32] {
        // SAFETY: as in `deref`, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.blocks.as_mut_ptr().cast(), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_built_for_a_gpu_is_named_with_how_to_build_one_for_the_cpu() {
        let cuda = serde_json::json!({"log_id": "onnxruntime-genai", "provider_options": [{"cuda": {"enable_cuda_graph": "0"}}]});
        assert_eq!(built_for(&cuda).as_deref(), Some("cuda"));
        let cpu = serde_json::json!({"log_id": "onnxruntime-genai", "provider_options": []});
        assert_eq!(built_for(&cpu), None);
        let m = kv_type_refusal("past_key_values.0.key", "Float16", Some("cuda"));
        assert!(m.contains("built for cuda") && m.contains("Float16") && m.contains("-e cpu"), "{m}");
        let m = kv_type_refusal("past_key_values.0.key", "Float16", None);
        assert!(m.contains("not float32") && m.contains("-e cpu"), "{m}");
    }

    #[test]
    fn generation_config_beside_genai_config_has_the_last_word_on_sampling() {
        let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/models/smollm2-135m-instruct-genai");
        let dir = std::env::temp_dir().join(format!("chatd-genai-gen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(shared.join("genai_config.json"), dir.join("genai_config.json")).unwrap();
        let alone = GenaiConfig::read(&dir).unwrap().info;
        let generation =
            r#"{"do_sample": true, "temperature": 0.7, "repetition_penalty": 1.05, "eos_token_id": [2, 7]}"#;
        std::fs::write(dir.join("generation_config.json"), generation).unwrap();
        let both = GenaiConfig::read(&dir).unwrap().info;
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(alone.defaults.repetition_penalty, 1.0);
        assert_eq!((both.defaults.temperature, both.defaults.repetition_penalty), (0.7, 1.05));
        assert!(both.eos_token_ids.contains(&7) && both.eos_token_ids.starts_with(&alone.eos_token_ids));
    }

    #[test]
    fn a_window_the_graph_does_not_apply_limits_the_context() {
        let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/models/smollm2-135m-instruct-genai");
        let mut config = GenaiConfig::read(&shared).unwrap();
        let context = config.info.context_length;
        assert_eq!(config.sliding_window, None);
        config.sliding_window = Some(64);
        limit_to_window(&mut config, &[64, 64]);
        assert_eq!((config.info.context_length, config.applied_window), (context, Some(64)));
        // Gemma's graphs window every other layer (or five of six): the window is applied.
        limit_to_window(&mut config, &[64, -1]);
        assert_eq!((config.info.context_length, config.applied_window), (context, Some(64)));
        limit_to_window(&mut config, &[-1, -1]);
        assert_eq!((config.info.context_length, config.applied_window), (64, None));
        // The shared model's graph has GroupQueryAttention nodes without a window.
        let windows = proto::attention_windows(&std::fs::read(&config.file).unwrap()).unwrap();
        assert!(!windows.is_empty() && windows.iter().all(|&w| w == -1), "{windows:?}");
    }
}
