//! The Hugging Face Optimum / transformers.js decoder-with-past layout: `input_ids`,
//! `attention_mask`, optional `position_ids` and `use_cache_branch`, and one
//! `past_key_values.{i}.key/value` input per layer whose `present.{i}.key/value` output is fed
//! back on the next call. ONNX Runtime allocates each step's presents; the cache keeps those
//! values and passes them straight back as inputs, so nothing is copied on our side.

use anyhow::{Context, Result, bail, ensure};
use ort::memory::Allocator;
use ort::session::{Session, SessionInputValue};
use ort::value::{DynTensor, DynTensorValueType, TensorElementType, TensorRef, ValueType};

use super::pages::Pages;
use super::{Layout, ModelInfo};

/// What each model input is fed with, in the session's input order.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Input {
    Ids,
    AttentionMask,
    PositionIds,
    UseCacheBranch,
    /// Index into the cache's values (layer * 2 + 0 for key, + 1 for value).
    Past(usize),
}

pub struct OptimumModel {
    session: Session,
    inputs: Vec<Input>,
    /// Output names of the presents, in cache order.
    present_names: Vec<String>,
    logits_name: String,
    kv_type: TensorElementType,
    num_kv_heads: usize,
    head_dim: usize,
    vocab_size: usize,
    ids: Vec<i64>,
    mask: Vec<i64>,
    positions: Vec<i64>,
}

pub struct OptimumKv {
    values: Vec<DynTensor>,
}

impl OptimumKv {
    /// The keys and values as `[kv_heads, len, head_dim]` per layer input (float32 caches only).
    fn read(&self) -> Result<Vec<Pages>> {
        self.values
            .iter()
            .map(|v| {
                let (_, data) = v.try_extract_tensor::<f32>().context("only float32 caches can be snapshot")?;
                Ok(Pages::from(data))
            })
            .collect()
    }

    /// A cache of the first `len` of `data_len` positions of `data` (as `read` gives).
    fn from_data(data: &[Pages], data_len: usize, len: usize, heads: usize, dim: usize) -> Result<Self> {
        let values = data
            .iter()
            .map(|src| {
                let mut out = Vec::with_capacity(heads * len * dim);
                for head in 0..heads {
                    let from = head * data_len * dim;
                    out.extend_from_slice(&src[from..from + len * dim]);
                }
                Ok(ort::value::Tensor::from_array(([1usize, heads, len, dim], out))?.upcast())
            })
            .collect::<Result<_>>()?;
        Ok(Self { values })
    }

    fn deep_copy(&self) -> Result<Self> {
        let values = self
            .values
            .iter()
            .map(|v| {
                let mut copy = DynTensor::new(&Allocator::default(), *v.data_type(), v.shape().clone())?;
                let bytes = v.size().context("tensor size")?;
                if bytes > 0 {
                    // SAFETY: both tensors are CPU tensors of the same type and shape.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            v.data_ptr().cast::<u8>(),
                            copy.data_ptr_mut().cast::<u8>(),
                            bytes,
                        )
                    };
                }
                Ok(copy)
            })
            .collect::<Result<_>>()?;
        Ok(Self { values })
    }
}

/// Parses `past_key_values.{i}.key` / `present.{i}.value` style names into (layer, is_value).
fn layer_of(name: &str, prefix: &str) -> Option<(usize, bool)> {
    let rest = name.strip_prefix(prefix)?;
    let (layer, kind) = rest.split_once('.')?;
    let layer = layer.parse().ok()?;
    match kind {
        "key" => Some((layer, false)),
        "value" => Some((layer, true)),
        _ => None,
    }
}

impl OptimumModel {
    pub fn new(session: Session, info: &ModelInfo) -> Result<Self> {
        let layers = info.num_layers;
        let mut inputs = Vec::new();
        let mut kv_type = None;
        for outlet in session.inputs() {
            let name = outlet.name();
            let role = match name {
                "input_ids" => Input::Ids,
                "attention_mask" => Input::AttentionMask,
                "position_ids" => Input::PositionIds,
                "use_cache_branch" => Input::UseCacheBranch,
                _ => match layer_of(name, "past_key_values.") {
                    Some((layer, is_value)) if layer < layers => {
                        if let ValueType::Tensor { ty, shape, .. } = outlet.dtype() {
                            kv_type = Some(*ty);
                            check_kv_shape(name, shape, info)?;
                        }
                        Input::Past(layer * 2 + usize::from(is_value))
                    }
                    _ => bail!("unexpected model input `{name}` (layout: Hugging Face Optimum decoder with past)"),
                },
            };
            inputs.push(role);
        }
        ensure!(inputs.contains(&Input::Ids), "the model has no `input_ids` input");
        let pasts = inputs.iter().filter(|i| matches!(i, Input::Past(_))).count();
        ensure!(
            pasts == 2 * layers,
            "config.json says {layers} layers, but the model has {pasts} past_key_values inputs (expected {})",
            2 * layers
        );
        let mut present_names = vec![String::new(); 2 * layers];
        let mut logits_name = None;
        for outlet in session.outputs() {
            let name = outlet.name();
            if name == "logits" {
                logits_name = Some(name.to_owned());
            } else if let Some((layer, is_value)) = layer_of(name, "present.") {
                if layer < layers {
                    present_names[layer * 2 + usize::from(is_value)] = name.to_owned();
                }
            }
        }
        if let Some(missing) = present_names.iter().position(String::is_empty) {
            bail!("the model has no present.{}.{} output", missing / 2, if missing % 2 == 0 { "key" } else { "value" });
        }
        Ok(Self {
            session,
            inputs,
            present_names,
            logits_name: logits_name.context("the model has no `logits` output")?,
            kv_type: kv_type.unwrap_or(TensorElementType::Float32),
            num_kv_heads: info.num_kv_heads,
            head_dim: info.head_dim,
            vocab_size: info.vocab_size,
            ids: Vec::new(),
            mask: Vec::new(),
            positions: Vec::new(),
        })
    }

    fn empty_cache(&self) -> Result<OptimumKv> {
        let shape = [1i64, self.num_kv_heads as i64, 0, self.head_dim as i64];
        let values = (0..self.present_names.len())
            .map(|_| DynTensor::new(&Allocator::default(), self.kv_type, shape.to_vec()))
            .collect::<Result<_, _>>()?;
        Ok(OptimumKv { values })
    }

    fn run(&mut self, tokens: &[u32], past: usize, kv: &mut OptimumKv, logits: &mut [f32]) -> Result<()> {
        let n = tokens.len();
        self.ids.clear();
        self.ids.extend(tokens.iter().map(|&t| i64::from(t)));
        self.mask.clear();
        self.mask.resize(past + n, 1);
        self.positions.clear();
        self.positions.extend((past..past + n).map(|p| p as i64));
        let use_cache = [past > 0];
        let mut outputs = {
            let mut values: Vec<SessionInputValue<'_>> = Vec::with_capacity(self.inputs.len());
            for input in &self.inputs {
                values.push(match *input {
                    Input::Ids => TensorRef::from_array_view(([1usize, n], &self.ids[..]))?.into(),
                    Input::AttentionMask => TensorRef::from_array_view(([1usize, past + n], &self.mask[..]))?.into(),
                    Input::PositionIds => TensorRef::from_array_view(([1usize, n], &self.positions[..]))?.into(),
                    Input::UseCacheBranch => TensorRef::from_array_view(([1usize], &use_cache[..]))?.into(),
                    Input::Past(i) => (&kv.values[i]).into(),
                });
            }
            self.session.run(&values[..]).context("running the model")?
        };
        let logits_value = outputs.get(&self.logits_name).context("no logits in the model's outputs")?;
        copy_last_row(logits_value, self.vocab_size, logits)?;
        for (slot, name) in kv.values.iter_mut().zip(&self.present_names) {
            let present = outputs.remove(name).with_context(|| format!("no {name} in the model's outputs"))?;
            *slot = present.downcast::<DynTensorValueType>()?;
        }
        Ok(())
    }
}

fn check_kv_shape(name: &str, shape: &ort::value::Shape, info: &ModelInfo) -> Result<()> {
    let dims: &[i64] = shape;
    if dims.len() != 4 {
        bail!("input {name} has {} dimensions, expected 4 (batch, kv heads, past, head dim)", dims.len());
    }
    for (dim, expected, what) in
        [(dims[1], info.num_kv_heads, "num_key_value_heads"), (dims[3], info.head_dim, "head_dim")]
    {
        if dim > 0 && dim as usize != expected {
            bail!("input {name} has {dim} where config.json's {what} says {expected}");
        }
    }
    Ok(())
}

/// Copies the logits of the last position (the model returns one row per input token).
fn copy_last_row(value: &ort::value::DynValue, vocab: usize, out: &mut [f32]) -> Result<()> {
    ensure!(out.len() == vocab, "logits buffer has {} entries, vocabulary {vocab}", out.len());
    if let Ok((_, data)) = value.try_extract_tensor::<f32>() {
        ensure!(
            data.len() >= vocab && data.len() % vocab == 0,
            "logits of {} values for a vocabulary of {vocab}",
            data.len()
        );
        out.copy_from_slice(&data[data.len() - vocab..]);
        return Ok(());
    }
    let tensor = value.view().downcast::<DynTensorValueType>().map_err(|e| anyhow::anyhow!("logits: {e}"))?;
    ensure!(
        *tensor.data_type() == TensorElementType::Float16,
        "logits must be float32 or float16, not {:?}",
        tensor.data_type()
    );
    let count = tensor.shape().num_elements();
    ensure!(count >= vocab && count % vocab == 0, "logits of {count} values for a vocabulary of {vocab}");
    // SAFETY: a CPU float16 tensor of `count` elements.
    let halves = unsafe { std::slice::from_raw_parts(tensor.data_ptr().cast::<u16>(), count) };
    for (o, &h) in out.iter_mut().zip(&halves[count - vocab..]) {
        *o = f16_to_f32(h);
    }
    Ok(())
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let frac = u32::from(h & 0x3ff);
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: renormalise.
            let shift = frac.leading_zeros() - 21;
            sign | ((113 - shift) << 23) | ((frac << (shift + 1)) & 0x3ff) << 13
        }
        (0x1f, _) => sign | 0x7f80_0000 | (frac << 13),
        _ => sign | ((exp + 112) << 23) | (frac << 13),
    };
    f32::from_bits(bits)
}

impl Layout for OptimumModel {
    type Kv = OptimumKv;
    const NAME: &'static str = "optimum";

    fn new_kv(&mut self) -> Result<OptimumKv> {
        self.empty_cache()
    }

    fn fork_kv(&mut self, kv: &OptimumKv, _len: usize) -> Result<OptimumKv> {
        kv.deep_copy()
    }

    fn read_kv(&self, kv: &OptimumKv, _len: usize) -> Result<Vec<Pages>> {
        kv.read()
    }

    fn restore_kv(&mut self, data: &[Pages], data_len: usize, len: usize) -> Result<OptimumKv> {
        OptimumKv::from_data(data, data_len, len, self.num_kv_heads, self.head_dim)
    }

    fn forward(&mut self, tokens: &[u32], kv: &mut OptimumKv, len: usize, logits: &mut [f32]) -> Result<()> {
        self.run(tokens, len, kv, logits)
    }

    /// The presents ONNX Runtime allocated for this cache, owned by its sequence.
    fn private_kv_bytes(&self, info: &ModelInfo, len: usize) -> usize {
        len * 2 * info.num_layers * self.num_kv_heads * self.head_dim * std::mem::size_of::<f32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_floats_convert_exactly() {
        for (h, f) in [
            (0x3c00u16, 1.0f32),
            (0xc000, -2.0),
            (0x3555, 0.333_251_95),
            (0x0001, 5.960_464_5e-8),
            (0x7bff, 65504.0),
            (0, 0.0),
        ] {
            assert_eq!(f16_to_f32(h), f, "{h:#06x}");
        }
        assert!(f16_to_f32(0x7c00).is_infinite());
    }

    #[test]
    fn io_names_parse_by_layer() {
        assert_eq!(layer_of("past_key_values.12.value", "past_key_values."), Some((12, true)));
        assert_eq!(layer_of("present.0.key", "present."), Some((0, false)));
        assert_eq!(layer_of("present.x.key", "present."), None);
    }
}
