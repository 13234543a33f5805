use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// What the engine needs to know about a model, read from its config files, never assumed.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    /// The folder's name; the default name the daemon serves the model under.
    pub name: String,
    pub vocab_size: usize,
    /// Longest sequence (prompt plus completion) the model was trained for.
    pub context_length: usize,
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Tokens that end a completion (from `generation_config.json` and `config.json`).
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    /// Sampling defaults for requests that don't say.
    pub defaults: GenerationDefaults,
    /// The tokens the model's files name as its markers (only `genai_config.json` does).
    pub markers: MarkerIds,
}

/// Token ids of a model's markers, as onnxruntime-genai's builder (0.15 and later) records them
/// in `genai_config.json`: a tool call's (`bot_token_id`, `eot_token_id`) and reasoning's
/// (`bor_token_id`, `eor_token_id`), each pair only when both are given.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MarkerIds {
    pub tool_call: Option<(u32, u32)>,
    pub reasoning: Option<(u32, u32)>,
}

impl MarkerIds {
    pub(super) fn from_json(model: &Value) -> Self {
        let pair = |start: &str, end: &str| Some((id_of(model.get(start))?, id_of(model.get(end))?));
        Self { tool_call: pair("bot_token_id", "eot_token_id"), reasoning: pair("bor_token_id", "eor_token_id") }
    }
}

fn id_of(value: Option<&Value>) -> Option<u32> {
    value?.as_u64().and_then(|id| u32::try_from(id).ok())
}

/// The sampling settings a model ships (`generation_config.json`, or the `search` section of
/// `genai_config.json`, which use the same keys).
#[derive(Clone, Debug)]
pub struct GenerationDefaults {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub repetition_penalty: f32,
}

impl GenerationDefaults {
    pub(super) fn from_json(section: &Value) -> Self {
        // Hugging Face's generate() is greedy unless the model asks for sampling.
        let do_sample = section.get("do_sample").and_then(Value::as_bool).unwrap_or(false);
        let number = |key: &str, default: f32| section.get(key).and_then(Value::as_f64).map_or(default, |v| v as f32);
        Self {
            temperature: if do_sample { number("temperature", 1.0) } else { 0.0 },
            top_p: if do_sample { number("top_p", 1.0) } else { 1.0 },
            top_k: if do_sample { section.get("top_k").and_then(Value::as_u64).unwrap_or(0) as usize } else { 0 },
            repetition_penalty: number("repetition_penalty", 1.0),
        }
    }
}

impl ModelInfo {
    pub fn read(dir: &Path) -> Result<Self> {
        let config = read_json(&dir.join("config.json"))?;
        let generation = match dir.join("generation_config.json") {
            p if p.exists() => read_json(&p)?,
            _ => Value::Null,
        };
        let usize_of = |key: &str| config.get(key).and_then(Value::as_u64).map(|v| v as usize);
        let num_layers = usize_of("num_hidden_layers").context("config.json has no num_hidden_layers")?;
        let num_heads = usize_of("num_attention_heads").context("config.json has no num_attention_heads")?;
        let num_kv_heads = usize_of("num_key_value_heads").unwrap_or(num_heads);
        let head_dim = match usize_of("head_dim") {
            Some(d) => d,
            None => usize_of("hidden_size").context("config.json has neither head_dim nor hidden_size")? / num_heads,
        };
        let mut eos_token_ids = ids_of(generation.get("eos_token_id"));
        for id in ids_of(config.get("eos_token_id")) {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
        Ok(Self {
            name: folder_name(dir),
            vocab_size: usize_of("vocab_size").context("config.json has no vocab_size")?,
            context_length: usize_of("max_position_embeddings").or_else(|| usize_of("n_positions")).unwrap_or(2048),
            num_layers,
            num_kv_heads,
            head_dim,
            eos_token_ids,
            bos_token_id: ids_of(config.get("bos_token_id")).first().copied(),
            defaults: GenerationDefaults::from_json(&generation),
            markers: MarkerIds::default(),
        })
    }
}

pub(super) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// A token id or a list of them, as configs write `eos_token_id`.
pub(super) fn ids_of(value: Option<&Value>) -> Vec<u32> {
    match value {
        Some(Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
        Some(Value::Array(list)) => list.iter().filter_map(Value::as_u64).map(|v| v as u32).collect(),
        _ => Vec::new(),
    }
}

pub(super) fn folder_name(dir: &Path) -> String {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
}

/// The ONNX file of a model folder, by the names the hubs use: in the folder itself, then in its
/// `onnx/` subfolder, the first of `model.onnx`, `decoder_model_merged.onnx`, or else the only
/// `model_*.onnx` (a quantised variant such as `model_q4.onnx`).
pub fn find_model_file(dir: &Path) -> Result<PathBuf> {
    let mut variants = Vec::new();
    for folder in [dir.to_path_buf(), dir.join("onnx")] {
        for name in ["model.onnx", "decoder_model_merged.onnx"] {
            let path = folder.join(name);
            if path.is_file() {
                return Ok(path);
            }
        }
        if let Ok(entries) = std::fs::read_dir(&folder) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with("model_") && name.ends_with(".onnx") {
                    variants.push(entry.path());
                }
            }
        }
        if !variants.is_empty() {
            break;
        }
    }
    match variants.len() {
        1 => Ok(variants.remove(0)),
        0 => bail!("no model.onnx, decoder_model_merged.onnx or model_*.onnx in {} or its onnx/ folder", dir.display()),
        _ => {
            variants.sort();
            bail!(
                "{} holds several model variants ({}); keep one, or name it model.onnx",
                dir.display(),
                variants.iter().map(|p| p.file_name().unwrap().to_string_lossy()).collect::<Vec<_>>().join(", ")
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_ids_are_read_in_pairs_as_the_builder_writes_them() {
        let model = serde_json::json!({"bot_token_id": 151657, "eot_token_id": 151658, "bor_token_id": 151667});
        let ids = MarkerIds::from_json(&model);
        assert_eq!(ids, MarkerIds { tool_call: Some((151657, 151658)), reasoning: None });
        assert_eq!(MarkerIds::from_json(&serde_json::json!({})), MarkerIds::default());
    }
}
