use anyhow::{Result, anyhow};

use super::Tokenizer;

/// Turns a stream of token ids into text pieces that are always complete UTF-8.
///
/// Byte-level BPE splits one character over several tokens; decoding token by token would emit
/// replacement characters. This keeps a short window of ids and releases text only once the
/// window decodes to more than it did before and does not end in a partial character (the
/// algorithm of Hugging Face's `DecodeStream`, whose state we own so a sequence can carry it).
#[derive(Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix: String,
    prefix_index: usize,
}

impl IncrementalDecoder {
    /// Feeds one token; returns the new text it completes, if any.
    pub fn step(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<Option<String>> {
        tokenizers::tokenizer::step_decode_stream(
            tokenizer.inner(),
            id,
            true,
            &mut self.ids,
            &mut self.prefix,
            &mut self.prefix_index,
        )
        .map_err(|e| anyhow!("decoding token {id}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::tokenizer::tests::smollm_tokenizer;

    #[test]
    fn multibyte_characters_are_never_split() {
        let tok = smollm_tokenizer();
        let text = "Größe: 日本語 🙂 naïve café — “quotes”";
        let ids = tok.encode(text).unwrap();
        let mut decoder = IncrementalDecoder::default();
        let mut out = String::new();
        let mut pieces = 0;
        for &id in &ids {
            if let Some(piece) = decoder.step(&tok, id).unwrap() {
                assert!(!piece.contains('\u{FFFD}'), "piece {piece:?} has a replacement character");
                out.push_str(&piece);
                pieces += 1;
            }
        }
        assert_eq!(out, text);
        assert!(pieces < ids.len(), "some tokens must have been held back for multi-byte characters");
    }
}
