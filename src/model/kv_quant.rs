//! Keys and values kept as 8- or 4-bit integers (`kv_cache_dtype`), for the genai layout.
//!
//! ONNX Runtime's CPU `GroupQueryAttention` can store its cache as int8, or as int4 packed two
//! to a byte, with a fixed scale per channel (`k_quant_type`/`v_quant_type` "PER_CHANNEL",
//! `kv_cache_bit_width`, and the `k_scale`/`v_scale` inputs): it quantizes each new token's keys
//! and values as it writes them and dequantizes the past as it reads it. Folders are built with
//! float32 caches, so at load the graph is edited (as `logit_positions` does, on the protobuf
//! bytes): the cache inputs and outputs change type, and every attention node gets the
//! attributes and two scale initializers.
//!
//! The scales are not in the folder: they come from the model itself. Before the edit, the
//! float model is run once over a short calibration chat, and each channel's largest magnitude
//! (with headroom) becomes its scale; values beyond it saturate. This module must not know the
//! tokenizer or the scheduler: the caller tokenizes [`CALIBRATION_CHAT`].

use std::fmt;

use anyhow::{Context, Result, bail, ensure};

use super::proto::*;

/// How the genai layout's KV pool stores keys and values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvCacheDtype {
    /// As the folder was built: 4 bytes per value.
    #[default]
    Float32,
    /// One byte per value.
    Int8,
    /// Half a byte per value.
    Int4,
}

impl std::str::FromStr for KvCacheDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "float32" | "fp32" | "f32" => Ok(Self::Float32),
            "int8" => Ok(Self::Int8),
            "int4" => Ok(Self::Int4),
            other => Err(format!("{other:?} is not one of float32, int8, int4")),
        }
    }
}

impl fmt::Display for KvCacheDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Float32 => "float32",
            Self::Int8 => "int8",
            Self::Int4 => "int4",
        })
    }
}

impl KvCacheDtype {
    /// The cache tensors' last dimension for a head of `head_dim` values (int4 packs two per byte).
    pub fn stored_dim(self, head_dim: usize) -> usize {
        match self {
            Self::Float32 | Self::Int8 => head_dim,
            Self::Int4 => head_dim.div_ceil(2),
        }
    }

    /// Bytes one position of one head takes.
    pub fn head_bytes(self, head_dim: usize) -> usize {
        match self {
            Self::Float32 => head_dim * 4,
            Self::Int8 | Self::Int4 => self.stored_dim(head_dim),
        }
    }

    /// ONNX's element type of the cache tensors.
    fn onnx_type(self) -> u64 {
        match self {
            Self::Float32 => ELEM_FLOAT,
            Self::Int8 => ELEM_INT8,
            Self::Int4 => ELEM_UINT8,
        }
    }

    /// The largest stored magnitude: a channel's scale maps its largest value onto it.
    fn levels(self) -> f32 {
        match self {
            Self::Float32 => 1.0,
            Self::Int8 => 127.0,
            Self::Int4 => 7.0,
        }
    }

    fn bits(self) -> u64 {
        match self {
            Self::Float32 => 32,
            Self::Int8 => 8,
            Self::Int4 => 4,
        }
    }
}

/// The chat the scales are measured on (rendered with the model's template when it has one):
/// prose, code, numbers and a second turn, so the keys and values of the usual kinds of text,
/// of the template's special tokens and of the first positions are all seen.
pub const CALIBRATION_CHAT: &[(&str, &str)] = &[
    ("system", "You are a helpful assistant running on a small device. Answer briefly and precisely."),
    (
        "user",
        "Summarise why the sky is blue in two sentences, then list three prime numbers above 100, and write a \
         Python function that returns the median of a list.",
    ),
    (
        "assistant",
        "Sunlight is scattered by the molecules of the air, and blue light, with its shorter wavelength, is \
         scattered far more than red (Rayleigh scattering). So blue reaches our eyes from every part of the sky.\n\
         Primes: 101, 103, 107.\n```python\ndef median(xs):\n    s = sorted(xs)\n    n = len(s)\n    mid = n // 2\n    \
         return s[mid] if n % 2 else (s[mid - 1] + s[mid]) / 2\n```",
    ),
    (
        "user",
        "Thanks! Now translate 'the meeting moves to Tuesday at 15:30' into French and German, and give the JSON \
         {\"day\": ..., \"time\": ...} for it.",
    ),
];

/// Each channel's scale for one cache tensor: its largest magnitude seen in calibration, with
/// headroom for prompts that go a little further, over the largest stored value.
const HEADROOM: f32 = 1.25;

/// Per layer, the key and the value scales (`kv_heads * head_dim` each, head-major) that the
/// edited graph quantizes with.
pub struct Scales {
    dtype: KvCacheDtype,
    /// `[layer][0 = keys, 1 = values]`.
    per_layer: Vec<[Vec<f32>; 2]>,
}

impl Scales {
    /// Scales from each cache tensor's per-channel largest magnitudes (in the pool's buffer
    /// order: layer * 2 for keys, layer * 2 + 1 for values).
    pub fn from_magnitudes(dtype: KvCacheDtype, magnitudes: &[Vec<f32>]) -> Self {
        let scale = |m: &Vec<f32>| -> Vec<f32> {
            // A channel that stayed at zero still needs a usable (non-zero) scale.
            let floor = m.iter().copied().fold(0.0f32, f32::max) * 1e-3 + f32::MIN_POSITIVE;
            m.iter().map(|&x| x.max(floor) * HEADROOM / dtype.levels()).collect()
        };
        let per_layer = magnitudes.chunks(2).map(|kv| [scale(&kv[0]), scale(&kv[1])]).collect();
        Self { dtype, per_layer }
    }
}

/// Per channel (head-major), the largest magnitude in `data`, laid out `[kv_heads, len, head_dim]`.
pub fn channel_magnitudes(data: &[f32], kv_heads: usize, len: usize, head_dim: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; kv_heads * head_dim];
    for head in 0..kv_heads {
        for position in data[head * len * head_dim..(head + 1) * len * head_dim].chunks(head_dim) {
            for (m, &x) in out[head * head_dim..(head + 1) * head_dim].iter_mut().zip(position) {
                *m = m.max(x.abs());
            }
        }
    }
    out
}

/// The names the edit needs: per layer, its cache inputs and outputs.
pub struct CacheNames {
    /// `[layer][past key, past value]`.
    pub past: Vec<[String; 2]>,
    /// `[layer][present key, present value]`.
    pub present: Vec<[String; 2]>,
}

// GroupQueryAttention's input slots.
const GQA_PAST_KEY: usize = 3;
const GQA_K_SCALE: usize = 12;
const GQA_V_SCALE: usize = 13;

/// `model` (a serialized ModelProto) with its caches stored as `scales.dtype`.
pub fn quantize_caches(model: &[u8], names: &CacheNames, head_dim: usize, scales: &Scales) -> Result<Vec<u8>> {
    ensure!(scales.per_layer.len() == names.past.len(), "scales for {} layers", scales.per_layer.len());
    let mut done = vec![false; names.past.len()];
    let mut graph_edit = |graph: &[u8]| -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(graph.len() + 4096);
        for field in fields(graph) {
            let field = field?;
            let rewritten = match (field.number, field.wire) {
                (GRAPH_NODE, LEN) => quantize_node(field.value, names, scales, &mut done)?,
                (GRAPH_INPUT | GRAPH_OUTPUT | GRAPH_VALUE_INFO, LEN) => {
                    retype_cache_value(field.value, names, head_dim, scales.dtype)?
                }
                _ => None,
            };
            match rewritten {
                Some(bytes) => put_bytes(&mut out, field.number, &bytes),
                None => out.extend_from_slice(field.raw),
            }
        }
        for (layer, [k, v]) in scales.per_layer.iter().enumerate() {
            put_bytes(&mut out, GRAPH_INITIALIZER, &float_tensor(&scale_name('k', layer), k));
            put_bytes(&mut out, GRAPH_INITIALIZER, &float_tensor(&scale_name('v', layer), v));
        }
        Ok(out)
    };
    let mut out = Vec::with_capacity(model.len() + 4096);
    let mut found_graph = false;
    for field in fields(model) {
        let field = field.context("reading the model")?;
        if field.number == MODEL_GRAPH && field.wire == LEN {
            found_graph = true;
            put_bytes(&mut out, MODEL_GRAPH, &graph_edit(field.value)?);
        } else {
            out.extend_from_slice(field.raw);
        }
    }
    ensure!(found_graph, "the model has no graph");
    if let Some(layer) = done.iter().position(|d| !d) {
        bail!(
            "no GroupQueryAttention node reads {}: a quantized KV cache needs the attention of every layer to be \
             GroupQueryAttention",
            names.past[layer][0]
        );
    }
    Ok(out)
}

fn scale_name(kind: char, layer: usize) -> String {
    format!("chatd_{kind}_scale.{layer}")
}

/// A GroupQueryAttention node reading a layer's past keys, with the quantization attributes
/// and that layer's scale inputs; `None` for any other node.
fn quantize_node(node: &[u8], names: &CacheNames, scales: &Scales, done: &mut [bool]) -> Result<Option<Vec<u8>>> {
    let mut op = &b""[..];
    let mut inputs = Vec::new();
    for field in fields(node) {
        let field = field?;
        match (field.number, field.wire) {
            (NODE_OP_TYPE, LEN) => op = field.value,
            (NODE_INPUT, LEN) => inputs.push(String::from_utf8_lossy(field.value).into_owned()),
            _ => {}
        }
    }
    if op != b"GroupQueryAttention" {
        return Ok(None);
    }
    let past_key = inputs.get(GQA_PAST_KEY).map(String::as_str).unwrap_or_default();
    let Some(layer) = names.past.iter().position(|[k, _]| k == past_key) else {
        bail!("a GroupQueryAttention node reads {past_key:?}, which is no layer's past keys");
    };
    ensure!(
        inputs.iter().skip(GQA_K_SCALE).all(String::is_empty),
        "the attention of layer {layer} already has scale inputs"
    );
    inputs.resize(inputs.len().max(GQA_V_SCALE + 1), String::new());
    inputs[GQA_K_SCALE] = scale_name('k', layer);
    inputs[GQA_V_SCALE] = scale_name('v', layer);
    let mut out = Vec::with_capacity(node.len() + 256);
    for field in fields(node) {
        let field = field?;
        if field.number == NODE_INPUT && field.wire == LEN {
            continue;
        }
        out.extend_from_slice(field.raw);
    }
    for input in &inputs {
        put_bytes(&mut out, NODE_INPUT, input.as_bytes());
    }
    for name in ["k_quant_type", "v_quant_type"] {
        put_bytes(&mut out, NODE_ATTRIBUTE, &string_attribute(name, b"PER_CHANNEL"));
    }
    put_bytes(&mut out, NODE_ATTRIBUTE, &int_attribute("kv_cache_bit_width", scales.dtype.bits()));
    done[layer] = true;
    Ok(Some(out))
}

/// A graph input, output or value-info of a cache tensor, with the stored element type (and for
/// int4 the packed last dimension); `None` for other values.
fn retype_cache_value(
    info: &[u8],
    names: &CacheNames,
    head_dim: usize,
    dtype: KvCacheDtype,
) -> Result<Option<Vec<u8>>> {
    let mut name = &b""[..];
    for field in fields(info) {
        let field = field?;
        if field.number == VALUE_INFO_NAME && field.wire == LEN {
            name = field.value;
        }
    }
    let is_cache = names.past.iter().chain(&names.present).flatten().any(|n| n.as_bytes() == name);
    if !is_cache {
        return Ok(None);
    }
    let stored_dim = dtype.stored_dim(head_dim) as u64;
    let mut tensor = |t: &[u8]| -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(t.len());
        for field in fields(t) {
            let field = field?;
            match (field.number, field.wire) {
                (TENSOR_ELEM_TYPE, VARINT) => put_varint_field(&mut out, TENSOR_ELEM_TYPE, dtype.onnx_type()),
                (TENSOR_SHAPE, LEN) => put_bytes(&mut out, TENSOR_SHAPE, &with_last_dim(field.value, stored_dim)?),
                _ => out.extend_from_slice(field.raw),
            }
        }
        Ok(out)
    };
    let mut ty = |t: &[u8]| edit_fields(t, TYPE_TENSOR, &mut tensor);
    Ok(Some(edit_fields(info, VALUE_INFO_TYPE, &mut ty)?))
}

/// A TensorShapeProto with its last dimension set to `value`.
fn with_last_dim(shape: &[u8], value: u64) -> Result<Vec<u8>> {
    let dims = fields(shape).filter(|f| f.as_ref().is_ok_and(|f| f.number == SHAPE_DIM)).count();
    let mut out = Vec::with_capacity(shape.len());
    let mut seen = 0;
    for field in fields(shape) {
        let field = field?;
        if field.number == SHAPE_DIM {
            seen += 1;
            if seen == dims {
                let mut dim = Vec::new();
                put_varint_field(&mut dim, DIM_VALUE, value);
                put_bytes(&mut out, SHAPE_DIM, &dim);
                continue;
            }
        }
        out.extend_from_slice(field.raw);
    }
    Ok(out)
}

fn string_attribute(name: &str, value: &[u8]) -> Vec<u8> {
    let mut a = Vec::new();
    put_bytes(&mut a, ATTRIBUTE_NAME, name.as_bytes());
    put_bytes(&mut a, ATTRIBUTE_S, value);
    put_varint_field(&mut a, ATTRIBUTE_TYPE, ATTRIBUTE_TYPE_STRING);
    a
}

fn int_attribute(name: &str, value: u64) -> Vec<u8> {
    let mut a = Vec::new();
    put_bytes(&mut a, ATTRIBUTE_NAME, name.as_bytes());
    put_varint_field(&mut a, ATTRIBUTE_I, value);
    put_varint_field(&mut a, ATTRIBUTE_TYPE, ATTRIBUTE_TYPE_INT);
    a
}

/// A float32 TensorProto `[values.len()]` named `name`.
fn float_tensor(name: &str, values: &[f32]) -> Vec<u8> {
    let mut t = Vec::new();
    put_varint_field(&mut t, TENSOR_PROTO_DIMS, values.len() as u64);
    put_varint_field(&mut t, TENSOR_PROTO_DATA_TYPE, ELEM_FLOAT);
    put_bytes(&mut t, TENSOR_PROTO_NAME, name.as_bytes());
    let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    put_bytes(&mut t, TENSOR_PROTO_RAW_DATA, &raw);
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(layers: usize) -> CacheNames {
        CacheNames {
            past: (0..layers).map(|l| [format!("past.{l}.key"), format!("past.{l}.value")]).collect(),
            present: (0..layers).map(|l| [format!("present.{l}.key"), format!("present.{l}.value")]).collect(),
        }
    }

    fn cache_value(name: &str, head_dim: u64) -> Vec<u8> {
        let mut shape = Vec::new();
        for d in [None, Some(2), None, Some(head_dim)] {
            let mut dim = Vec::new();
            match d {
                Some(v) => put_varint_field(&mut dim, DIM_VALUE, v),
                None => put_bytes(&mut dim, DIM_PARAM, b"n"),
            }
            put_bytes(&mut shape, SHAPE_DIM, &dim);
        }
        let mut tensor = Vec::new();
        put_varint_field(&mut tensor, TENSOR_ELEM_TYPE, ELEM_FLOAT);
        put_bytes(&mut tensor, TENSOR_SHAPE, &shape);
        let mut ty = Vec::new();
        put_bytes(&mut ty, TYPE_TENSOR, &tensor);
        let mut info = Vec::new();
        put_bytes(&mut info, VALUE_INFO_NAME, name.as_bytes());
        put_bytes(&mut info, VALUE_INFO_TYPE, &ty);
        info
    }

    fn elem_type_and_last_dim(info: &[u8]) -> (u64, u64) {
        let ty = fields(info).map(Result::unwrap).find(|f| f.number == VALUE_INFO_TYPE).unwrap();
        let tensor = fields(ty.value).map(Result::unwrap).next().unwrap();
        let mut elem = 0;
        let mut last = 0;
        for f in fields(tensor.value).map(Result::unwrap) {
            match f.number {
                TENSOR_ELEM_TYPE => elem = read_varint(f.value, &mut 0).unwrap(),
                TENSOR_SHAPE => {
                    let dim = fields(f.value).map(Result::unwrap).last().unwrap();
                    let v = fields(dim.value).map(Result::unwrap).next().unwrap();
                    last = read_varint(v.value, &mut 0).unwrap();
                }
                _ => {}
            }
        }
        (elem, last)
    }

    fn gqa(layer: usize, inputs: usize) -> Vec<u8> {
        let mut node = Vec::new();
        for i in 0..inputs {
            let name = if i == GQA_PAST_KEY { format!("past.{layer}.key") } else { format!("in{i}") };
            put_bytes(&mut node, NODE_INPUT, name.as_bytes());
        }
        put_bytes(&mut node, NODE_OUTPUT, b"out");
        put_bytes(&mut node, NODE_OP_TYPE, b"GroupQueryAttention");
        node
    }

    #[test]
    fn every_layer_gets_its_scales_attributes_and_retyped_caches() {
        let mut graph = Vec::new();
        put_bytes(&mut graph, GRAPH_NODE, &gqa(0, 9));
        put_bytes(&mut graph, GRAPH_NODE, &gqa(1, 12));
        for l in 0..2 {
            put_bytes(&mut graph, GRAPH_INPUT, &cache_value(&format!("past.{l}.key"), 64));
            put_bytes(&mut graph, GRAPH_OUTPUT, &cache_value(&format!("present.{l}.value"), 64));
        }
        put_bytes(&mut graph, GRAPH_INPUT, &cache_value("input_ids", 64));
        let mut model = Vec::new();
        put_bytes(&mut model, MODEL_GRAPH, &graph);
        let magnitudes = vec![vec![2.0; 128]; 4];
        let scales = Scales::from_magnitudes(KvCacheDtype::Int4, &magnitudes);

        let edited = quantize_caches(&model, &names(2), 64, &scales).unwrap();
        let graph = fields(&edited).map(Result::unwrap).next().unwrap();
        let parts: Vec<_> = fields(graph.value).map(Result::unwrap).collect();
        let nodes: Vec<_> = parts.iter().filter(|f| f.number == GRAPH_NODE).collect();
        for (layer, node) in nodes.iter().enumerate() {
            let inputs: Vec<_> = fields(node.value)
                .map(Result::unwrap)
                .filter(|f| f.number == NODE_INPUT)
                .map(|f| String::from_utf8_lossy(f.value).into_owned())
                .collect();
            assert_eq!(inputs.len(), 14);
            assert_eq!(inputs[GQA_K_SCALE], scale_name('k', layer));
            assert_eq!(inputs[GQA_V_SCALE], scale_name('v', layer));
            let attributes = fields(node.value).map(Result::unwrap).filter(|f| f.number == NODE_ATTRIBUTE).count();
            assert_eq!(attributes, 3);
        }
        assert!(inputs_of(nodes[0].value)[9..12].iter().all(String::is_empty), "skipped slots stay empty");
        let values: Vec<_> = parts.iter().filter(|f| f.number == GRAPH_INPUT || f.number == GRAPH_OUTPUT).collect();
        for v in &values[..4] {
            assert_eq!(elem_type_and_last_dim(v.value), (ELEM_UINT8, 32), "int4 packs two per byte");
        }
        assert_eq!(elem_type_and_last_dim(values[4].value), (ELEM_FLOAT, 64), "other inputs stay");
        let initializers = parts.iter().filter(|f| f.number == GRAPH_INITIALIZER).count();
        assert_eq!(initializers, 4);

        let one_layer_missing = quantize_caches(
            &model,
            &names(3),
            64,
            &Scales::from_magnitudes(KvCacheDtype::Int8, &[magnitudes.clone(), vec![vec![1.0; 128]; 2]].concat()),
        );
        assert!(one_layer_missing.unwrap_err().to_string().contains("past.2.key"));
    }

    fn inputs_of(node: &[u8]) -> Vec<String> {
        fields(node)
            .map(Result::unwrap)
            .filter(|f| f.number == NODE_INPUT)
            .map(|f| String::from_utf8_lossy(f.value).into_owned())
            .collect()
    }

    #[test]
    fn scales_map_each_channels_largest_value_onto_the_largest_level() {
        // Two heads of two channels, three positions: [heads, len, dim].
        let data = [1.0, -4.0, 2.0, 0.5, -3.0, 1.0, /* head 1 */ 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let m = channel_magnitudes(&data, 2, 3, 2);
        assert_eq!(m, vec![3.0, 4.0, 0.0, 0.0]);
        let scales = Scales::from_magnitudes(KvCacheDtype::Int8, &[m.clone(), m]);
        let k = &scales.per_layer[0][0];
        assert!((k[1] - 4.0 * HEADROOM / 127.0).abs() < 1e-6);
        assert!(k[2] > 0.0, "a silent channel still gets a usable scale");
        assert_eq!("int4".parse::<KvCacheDtype>().unwrap().head_bytes(64), 32);
        assert_eq!(KvCacheDtype::Float32.head_bytes(64), 256);
        assert!("int3".parse::<KvCacheDtype>().is_err());
    }
}
