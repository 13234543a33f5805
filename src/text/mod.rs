//! Tokens and text: the tokenizer, the model's chat template, incremental UTF-8-safe decoding and
//! stop strings. Nothing here knows about ONNX Runtime or HTTP.

mod detokenizer;
mod stop;
mod template;
mod tokenizer;

pub use detokenizer::IncrementalDecoder;
pub use stop::{StopMatcher, StopOutcome};
pub use template::ChatTemplate;
pub use tokenizer::{Encoded, Tokenizer};

#[cfg(test)]
pub(crate) use tokenizer::tests::{smollm_tokenizer, smollm_tokenizer_edited, smollm_tokenizer_with};
