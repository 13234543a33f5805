//! The vocabulary as llguidance sees it: every token's bytes in a trie, and a tokenizer for the
//! text a grammar forces.
//!
//! llguidance's own environment keeps a second, adjusted copy of the Hugging Face tokenizer
//! (it drops a "prepend ▁" normalizer and Metaspace's prepended space). For a tokenizer that
//! prepends nothing (Qwen's, Llama 3's, Gemma's...) those adjustments change nothing, and a
//! second copy of a 150k-token vocabulary is tens of MiB held for nothing; then this shares
//! chatd's tokenizer.

use std::sync::Arc;

use anyhow::{Result, anyhow};
use llguidance::toktrie::{TokEnv, TokTrie, TokenId, TokenizerEnv};
use toktrie_hf_tokenizers::{ByteTokenizer, ByteTokenizerEnv};

use crate::text::Tokenizer;

pub(super) struct Vocabulary {
    trie: TokTrie,
    tokenizer: Encoder,
}

/// Which tokenizer encodes forced text.
enum Encoder {
    /// chatd's own: llguidance's adjustments left it as it was.
    Shared(Arc<Tokenizer>),
    /// llguidance's adjusted copy (a SentencePiece-style tokenizer that prepends `▁`).
    Adjusted(Box<tokenizers::Tokenizer>),
}

impl Vocabulary {
    /// `eos` are the model's end-of-sequence ids; `vocab_size` is the width of its logits.
    pub(super) fn env(tokenizer: &Arc<Tokenizer>, eos: &[u32], vocab_size: usize) -> Result<TokEnv> {
        let preparing = |e: anyhow::Error| anyhow!("preparing the tokenizer for constraints: {e}");
        let mut bytes = ByteTokenizer::from_tokenizer(tokenizer.inner().clone()).map_err(preparing)?;
        bytes.set_eos_tokens(eos);
        let ByteTokenizerEnv { tokenizer: bytes, tok_trie } =
            ByteTokenizerEnv::new(bytes, Some(vocab_size)).map_err(preparing)?;
        let adjusted = bytes.hf_tokenizer;
        let tokenizer = if same_text_handling(tokenizer.inner(), &adjusted) {
            Encoder::Shared(tokenizer.clone())
        } else {
            Encoder::Adjusted(Box::new(adjusted))
        };
        Ok(Arc::new(Self { trie: tok_trie, tokenizer }))
    }

    fn encode(&self, text: &str) -> Vec<TokenId> {
        let tokenizer = match &self.tokenizer {
            Encoder::Shared(chatds) => chatds.inner(),
            Encoder::Adjusted(adjusted) => adjusted,
        };
        // What a tokenizer that loaded cannot encode is a bug in it; llguidance's own
        // environment panics too, and a compilation's panic is caught (see `Compiler`).
        tokenizer.encode(text, false).expect("the tokenizer failed to encode text").get_ids().to_vec()
    }
}

/// Whether two tokenizers split and normalize text alike (llguidance adjusts only these two);
/// not when either cannot be compared.
fn same_text_handling(a: &tokenizers::Tokenizer, b: &tokenizers::Tokenizer) -> bool {
    let same =
        |x: serde_json::Result<String>, y: serde_json::Result<String>| matches!((x, y), (Ok(x), Ok(y)) if x == y);
    same(serde_json::to_string(&a.get_normalizer()), serde_json::to_string(&b.get_normalizer()))
        && same(serde_json::to_string(&a.get_pre_tokenizer()), serde_json::to_string(&b.get_pre_tokenizer()))
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| self.encode(text))
    }

    fn tokenize_bytes_special(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie
            .tokenize_with_greedy_fallback(s, |text| self.trie.tokenize_with_special(text, |plain| self.encode(plain)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::{smollm_tokenizer, smollm_tokenizer_edited};

    #[test]
    fn a_byte_level_tokenizer_is_shared_and_encodes_as_chatds_does() {
        let tokenizer = Arc::new(smollm_tokenizer());
        let vocabulary = Vocabulary::env(&tokenizer, &[2], tokenizer.vocab_size()).unwrap();
        let text = " {\"name\": \"Zoë\", \"n\": 42}";
        let chatds = tokenizer.inner().encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(vocabulary.tokenize_bytes(text.as_bytes()), chatds);
        assert_eq!(Arc::strong_count(&tokenizer), 2, "the vocabulary holds chatd's tokenizer, not a copy");
    }

    #[test]
    fn a_tokenizer_llguidance_adjusts_is_used_as_adjusted() {
        // A SentencePiece-style normalizer that prepends "▁" to every text, as Llama 2's and
        // Phi-3's do: forced text in the middle of an output must not gain it.
        let prepending = smollm_tokenizer_edited(|inner| {
            inner.with_normalizer(Some(tokenizers::normalizers::Prepend::new("Ġ".into())));
        });
        let tokenizer = Arc::new(prepending);
        let vocabulary = Vocabulary::env(&tokenizer, &[2], tokenizer.vocab_size()).unwrap();
        let plain = smollm_tokenizer().inner().encode("name", false).unwrap().get_ids().to_vec();
        assert_ne!(tokenizer.inner().encode("name", false).unwrap().get_ids(), plain.as_slice());
        assert_eq!(vocabulary.tokenize_bytes(b"name"), plain);
        assert_eq!(Arc::strong_count(&tokenizer), 1, "the vocabulary holds its own adjusted copy");
    }
}
