use std::path::Path;

use anyhow::{Context, Result, anyhow};

/// The model's tokenizer (`tokenizer.json`) plus what `tokenizer_config.json` says about special
/// tokens and the chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Most bytes of input text one token can stand for (see [`input_bytes_per_token`]); `None`
    /// when the normalizer may shrink text by an unknown factor, so no byte count bounds tokens.
    max_bytes_per_token: Option<usize>,
    /// Jinja source of the chat template, when the model ships one.
    pub chat_template: Option<String>,
    /// The template for requests with tools, when the model ships a separate one (the
    /// `tool_use` entry of a list of named templates, or `additional_chat_templates/tool_use.jinja`).
    pub tool_use_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

impl Tokenizer {
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("reading {}", path.display()))?;
        let config_path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text).with_context(|| format!("parsing {}", config_path.display()))?,
            Err(_) => serde_json::Value::Null,
        };
        Ok(Self {
            max_bytes_per_token: input_bytes_per_token(&inner),
            inner,
            chat_template: chat_template_in(dir, &config)?,
            tool_use_template: tool_use_template_in(dir, &config)?,
            bos_token: special_token(&config, "bos_token"),
            eos_token: special_token(&config, "eos_token"),
        })
    }

    /// Encodes text as the model sees it. Special tokens written in the text (such as
    /// `<|im_start|>` from a rendered chat template) become their ids; nothing is added around it,
    /// as Hugging Face does for a rendered chat prompt.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, false).map_err(|e| anyhow!("tokenizing: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Encodes `text` as [`Tokenizer::encode`] does (with the tokens the tokenizer's
    /// post-processor adds around a text, such as a BOS, when `add_special`), unless it
    /// certainly has more than `budget` tokens: then it stops early and says how many it has at least. A text longer than
    /// `budget` tokens of the longest kind is refused before any tokenizer work; a text of
    /// several chunks is counted chunk by chunk and abandoned once over the budget; only a text
    /// that may fit is tokenized whole. So a refusal costs at most the tokenization of about
    /// `budget` tokens, whatever the text's size.
    pub fn encode_within(&self, text: &str, budget: usize, add_special: bool) -> Result<Encoded> {
        if let Some(at_least) = self.fewest_tokens(text.len()).filter(|&n| n > budget) {
            return Ok(Encoded::TooLong { tokens: at_least, exact: false });
        }
        if text.len() > COUNT_CHUNK_BYTES {
            let (mut counted, mut cuts) = (0usize, 0usize);
            for chunk in chunks(text, COUNT_CHUNK_BYTES) {
                // Counting the cut after this piece too keeps the bound safe for the whole text.
                cuts += 1;
                counted += self.encode(chunk)?.len();
                let at_least = counted.saturating_sub(cuts * SLACK_PER_CUT);
                if at_least > budget {
                    return Ok(Encoded::TooLong { tokens: at_least, exact: false });
                }
            }
        }
        let encoding = self.inner.encode(text, add_special).map_err(|e| anyhow!("tokenizing: {e}"))?;
        let ids = encoding.get_ids().to_vec();
        Ok(if ids.len() > budget { Encoded::TooLong { tokens: ids.len(), exact: true } } else { Encoded::Ids(ids) })
    }

    /// The fewest tokens a text of `bytes` bytes can have, when the tokenizer bounds it (see
    /// [`input_bytes_per_token`]).
    pub fn fewest_tokens(&self, bytes: usize) -> Option<usize> {
        self.max_bytes_per_token.map(|per_token| bytes.div_ceil(per_token))
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| anyhow!("decoding: {e}"))
    }

    /// The text of one token on its own (for logprobs): special tokens included, possibly a
    /// replacement character when the token is part of a multi-byte character.
    pub fn token_text(&self, id: u32) -> String {
        self.inner.decode(&[id], false).unwrap_or_default()
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub(crate) fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// What [`Tokenizer::encode_within`] found.
#[derive(Debug, PartialEq)]
pub enum Encoded {
    /// The whole text's tokens, at most the budget.
    Ids(Vec<u32>),
    /// More than the budget: the text has at least `tokens` tokens; exactly that many when
    /// `exact` (it was tokenized whole), else it is a bound.
    TooLong { tokens: usize, exact: bool },
}

/// Texts longer than this are counted in pieces of about this size before being tokenized whole.
const COUNT_CHUNK_BYTES: usize = 16 << 10;

/// Tokens by which a text cut into two pieces may count more than when tokenized whole: a
/// word, a run of spaces or an added token split at the cut becomes a few tokens on each side.
/// Cuts fall before whitespace where there is any, so this is generous.
const SLACK_PER_CUT: usize = 16;

/// Consecutive pieces of `text` of about `size` bytes, each cut before a whitespace character
/// that follows a non-whitespace one (where a pre-tokenizer splits anyway), else at a character
/// boundary.
fn chunks(text: &str, size: usize) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        if rest.len() <= size {
            return Some(std::mem::take(&mut rest));
        }
        let bytes = rest.as_bytes();
        let whitespace_cut =
            (size / 2..size).rev().find(|&i| bytes[i].is_ascii_whitespace() && !bytes[i - 1].is_ascii_whitespace());
        let cut =
            whitespace_cut.unwrap_or_else(|| (1..=size).rev().find(|&i| rest.is_char_boundary(i)).unwrap_or(size));
        let (piece, tail) = rest.split_at(cut);
        rest = tail;
        Some(piece)
    })
}

/// The most bytes of input text one token can cover: the longest token, measured in the
/// bytes it stands for (a byte-level vocabulary writes each byte as one character; other
/// vocabularies write text as it is, `▁` for a space, which overstates it safely), times how
/// much the normalizer can shrink text before the vocabulary sees it. `None` when a
/// normalizer can shrink text by an unknown factor (stripping, replacing by shorter text).
fn input_bytes_per_token(tokenizer: &tokenizers::Tokenizer) -> Option<usize> {
    let shrink = match tokenizer.get_normalizer() {
        None => 1,
        Some(n) => normalizer_shrink(&serde_json::to_value(n).ok()?)?,
    };
    let byte_level = [
        tokenizer.get_pre_tokenizer().and_then(|p| serde_json::to_value(p).ok()),
        tokenizer.get_decoder().and_then(|d| serde_json::to_value(d).ok()),
    ]
    .iter()
    .flatten()
    .any(|v| v.to_string().contains("\"ByteLevel\""));
    let added: std::collections::HashSet<u32> = tokenizer.get_added_tokens_decoder().into_keys().collect();
    let longest = (0..tokenizer.get_vocab_size(true) as u32)
        .filter_map(|id| Some((id, tokenizer.id_to_token(id)?)))
        .map(|(id, token)| if byte_level && !added.contains(&id) { token.chars().count() } else { token.len() })
        .max()?;
    Some(longest.max(1) * shrink)
}

/// How many times shorter, at most, a normalizer can make a text: 1 for those that only add
/// (prepending, replacing by something as long, decomposing), 3 for composition and lowercasing
/// (three Hangul jamo become one syllable; the Kelvin sign becomes `k`), 4 for compatibility
/// forms (a 4-byte mathematical letter becomes ASCII). `None` when unknown.
fn normalizer_shrink(normalizer: &serde_json::Value) -> Option<usize> {
    let kind = normalizer.get("type")?.as_str()?;
    Some(match kind {
        "Sequence" => normalizer
            .get("normalizers")?
            .as_array()?
            .iter()
            .map(normalizer_shrink)
            .try_fold(1, |acc, s| s.map(|s| acc * s))?,
        "Prepend" | "NFD" | "ByteLevel" => 1,
        "Replace" => {
            let pattern = normalizer.get("pattern")?.get("String")?.as_str()?;
            let content = normalizer.get("content")?.as_str()?;
            if content.len() >= pattern.len() { 1 } else { return None }
        }
        "NFC" | "Lowercase" => 3,
        "NFKC" | "NFKD" => 4,
        _ => return None,
    })
}

/// The chat template as transformers finds it: `chat_template.jinja` first (what
/// `save_pretrained` writes since transformers 4.47, and so what today's exporters leave), else
/// `chat_template` in `tokenizer_config.json`.
fn chat_template_in(dir: &Path, config: &serde_json::Value) -> Result<Option<String>> {
    let path = dir.join("chat_template.jinja");
    match std::fs::read_to_string(&path) {
        Ok(template) => Ok(Some(template)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(chat_template_of(config)),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The tool-use template, as transformers looks for it: a file beside, else the list entry.
fn tool_use_template_in(dir: &Path, config: &serde_json::Value) -> Result<Option<String>> {
    let path = dir.join("additional_chat_templates").join("tool_use.jinja");
    match std::fs::read_to_string(&path) {
        Ok(template) => Ok(Some(template)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(named_template(config, "tool_use")),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// `chat_template` is a string, or a list of named templates of which "default" is the chat one.
fn chat_template_of(config: &serde_json::Value) -> Option<String> {
    match config.get("chat_template")? {
        serde_json::Value::String(s) => Some(s.clone()),
        _ => named_template(config, "default"),
    }
}

/// The entry `name` of a `chat_template` given as a list of `{"name", "template"}`.
fn named_template(config: &serde_json::Value, name: &str) -> Option<String> {
    let list = config.get("chat_template")?.as_array()?;
    let entry = list.iter().find(|t| t.get("name").and_then(|n| n.as_str()) == Some(name))?;
    entry.get("template")?.as_str().map(str::to_owned)
}

/// A special token is written either as a string or as an AddedToken object with `content`.
fn special_token(config: &serde_json::Value, key: &str) -> Option<String> {
    match config.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        obj => obj.get("content")?.as_str().map(str::to_owned),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The shared SmolLM2 tokenizer; `../shared/models` sits beside every checkout, CI's too.
    pub(crate) fn smollm_tokenizer() -> Tokenizer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/models/smollm2-135m-instruct");
        Tokenizer::load(&dir).unwrap_or_else(|e| panic!("the test model is needed at {}: {e:#}", dir.display()))
    }

    /// SmolLM2's tokenizer with more added tokens: `(text, special)`, as another family's
    /// vocabulary has them.
    pub(crate) fn smollm_tokenizer_with(added: &[(&str, bool)]) -> Tokenizer {
        smollm_tokenizer_edited(|inner| {
            for &(text, special) in added {
                let token = tokenizers::AddedToken::from(text.to_owned(), special);
                match special {
                    true => inner.add_special_tokens(&[token]),
                    false => inner.add_tokens(&[token]),
                };
            }
        })
    }

    /// SmolLM2's tokenizer as `edit` leaves it, to stand for another family's.
    pub(crate) fn smollm_tokenizer_edited(edit: impl FnOnce(&mut tokenizers::Tokenizer)) -> Tokenizer {
        let mut tok = smollm_tokenizer();
        edit(&mut tok.inner);
        tok
    }

    #[test]
    fn add_special_adds_what_the_post_processor_says() {
        // SmolLM2's tokenizer with the post-processor of a Llama-3-style one (BOS first).
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/models/smollm2-135m-instruct");
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap()).unwrap();
        json["post_processor"] = serde_json::json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}},
        });
        let out = std::env::temp_dir().join(format!("chatd-bos-{}", std::process::id()));
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join("tokenizer.json"), json.to_string()).unwrap();
        let tok = Tokenizer::load(&out).unwrap();
        std::fs::remove_dir_all(&out).unwrap();
        let Encoded::Ids(plain) = tok.encode_within("Hello", 10, false).unwrap() else { panic!() };
        let Encoded::Ids(with) = tok.encode_within("Hello", 10, true).unwrap() else { panic!() };
        assert_eq!(with[0], 1);
        assert_eq!(&with[1..], &plain[..]);
    }

    #[test]
    fn special_tokens_and_template_come_from_the_config() {
        let tok = smollm_tokenizer();
        assert_eq!(tok.bos_token.as_deref(), Some("<|im_start|>"));
        assert_eq!(tok.eos_token.as_deref(), Some("<|im_end|>"));
        assert!(tok.chat_template.as_deref().unwrap().contains("im_start"));
        assert_eq!(tok.encode("<|im_start|>user").unwrap()[0], 1);
    }

    #[test]
    fn chat_template_jinja_comes_first_as_in_transformers() {
        let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/models/smollm2-135m-instruct");
        let dir = std::env::temp_dir().join(format!("chatd-template-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(shared.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
        // A folder written by save_pretrained in transformers 4.47+: no template in the config.
        std::fs::write(dir.join("tokenizer_config.json"), r#"{"eos_token": "<|im_end|>"}"#).unwrap();
        assert_eq!(Tokenizer::load(&dir).unwrap().chat_template, None);
        std::fs::write(dir.join("chat_template.jinja"), "{{ messages[0]['content'] }}").unwrap();
        assert_eq!(Tokenizer::load(&dir).unwrap().chat_template.as_deref(), Some("{{ messages[0]['content'] }}"));
        // Both: the file wins, as transformers reads it.
        std::fs::write(dir.join("tokenizer_config.json"), r#"{"chat_template": "old"}"#).unwrap();
        assert_eq!(Tokenizer::load(&dir).unwrap().chat_template.as_deref(), Some("{{ messages[0]['content'] }}"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Texts that stress the cuts: words, one endless word, runs of spaces and newlines (the
    /// vocabulary's longest tokens), digits (split one by one), CJK without spaces, emoji, and
    /// special tokens.
    fn awkward_texts() -> Vec<String> {
        vec![
            "word ".repeat(5000),
            "a".repeat(20_000),
            " ".repeat(20_000),
            "\n                                                                                ".repeat(300),
            "1234567890 ".repeat(2000),
            "東京は日本の首都です。".repeat(1000),
            "🙂🚀 ok ".repeat(2000),
            "<|im_start|>user\nHi there<|im_end|>\n".repeat(600),
            "x\t \n  y".repeat(3000),
        ]
    }

    #[test]
    fn counting_in_pieces_never_overstates_a_whole_text_by_more_than_the_slack() {
        let tok = smollm_tokenizer();
        for text in awkward_texts() {
            let whole = tok.encode(&text).unwrap().len();
            let pieces: Vec<&str> = chunks(&text, 1024).collect();
            assert_eq!(pieces.concat(), text);
            let counted: usize = pieces.iter().map(|p| tok.encode(p).unwrap().len()).sum();
            let over = counted.saturating_sub(whole);
            assert!(
                over <= SLACK_PER_CUT * pieces.len(),
                "{:?}: {counted} counted in {} pieces, {whole} whole",
                &text[..20],
                pieces.len()
            );
        }
    }

    #[test]
    fn encode_within_returns_the_ids_or_a_true_lower_bound() {
        let tok = smollm_tokenizer();
        for text in awkward_texts() {
            let whole = tok.encode(&text).unwrap();
            assert_eq!(tok.encode_within(&text, whole.len(), false).unwrap(), Encoded::Ids(whole.clone()));
            for budget in [whole.len() - 1, whole.len() / 2, 10] {
                match tok.encode_within(&text, budget, false).unwrap() {
                    Encoded::TooLong { tokens, exact } => {
                        assert!(tokens > budget && tokens <= whole.len() && (!exact || tokens == whole.len()))
                    }
                    Encoded::Ids(_) => panic!("{:?} fit a budget of {budget}", &text[..20]),
                }
            }
        }
    }

    #[test]
    fn the_longest_token_bounds_the_bytes_per_token() {
        let tok = smollm_tokenizer();
        // SmolLM2's longest token is a newline and 80 spaces.
        assert_eq!(tok.max_bytes_per_token, Some(81));
        let many_spaces = format!("\n{}", " ".repeat(80)).repeat(100);
        assert_eq!(tok.encode(&many_spaces).unwrap().len(), 100);
        assert_eq!(tok.encode_within(&many_spaces, 99, false).unwrap(), Encoded::TooLong { tokens: 100, exact: false });
    }

    #[test]
    fn normalizers_that_shrink_text_loosen_or_drop_the_bound() {
        use serde_json::json;
        assert_eq!(normalizer_shrink(&json!({"type": "NFC"})), Some(3));
        let llama2 = json!({"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]});
        assert_eq!(normalizer_shrink(&llama2), Some(1));
        assert_eq!(normalizer_shrink(&json!({"type": "Replace", "pattern": {"String": "  "}, "content": " "})), None);
        assert_eq!(
            normalizer_shrink(&json!({"type": "Sequence", "normalizers": [{"type": "NFKC"}, {"type": "Strip"}]})),
            None
        );
    }
}
