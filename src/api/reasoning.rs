//! Thinking models: the reasoning a model writes before its answer, split out of `content`
//! into `reasoning_content` (SGLang's and llama.cpp's name) and `reasoning` (vLLM's), whole and
//! streamed.
//!
//! Which markers a model uses comes from its files: the pair `genai_config.json` names, else a
//! pair of [`PAIRS`] that are both single tokens of its vocabulary (Qwen3, QwQ, DeepSeek-R1 distills, SmolLM3, Phi-4-mini-reasoning:
//! `<think>`; Magistral: `[THINK]`). A model without such a pair is not a thinking model and its
//! text is never split. Where the output starts comes from the rendered prompt: a template
//! that ends the generation prompt with the start marker (DeepSeek-R1, Qwen3 thinking-only)
//! has the output begin inside the reasoning; otherwise the model opens it itself, or not (a
//! Qwen3 prompt with `enable_thinking: false` closes an empty block first).
//!
//! This module must not know HTTP or the engine's scheduling: it sees text and token ids.

use crate::text::Tokenizer;

/// Spellings of start and end markers that thinking models use, as single tokens.
pub const PAIRS: &[(&str, &str)] = &[("<think>", "</think>"), ("[THINK]", "[/THINK]")];

/// A thinking model's markers.
#[derive(Clone, Debug, PartialEq)]
pub struct Markers {
    pub start: String,
    pub end: String,
    pub start_id: u32,
    pub end_id: u32,
}

impl Markers {
    /// The pair the model's files name (`named`, from `genai_config.json`), else the first of
    /// [`PAIRS`] whose markers are both tokens of `tokenizer`.
    pub fn of(tokenizer: &Tokenizer, named: Option<(u32, u32)>) -> Option<Self> {
        if let Some((start_id, end_id)) = named {
            let (start, end) = (tokenizer.token_text(start_id), tokenizer.token_text(end_id));
            if !start.is_empty() && !end.is_empty() {
                return Some(Self { start, end, start_id, end_id });
            }
        }
        PAIRS.iter().find_map(|&(start, end)| {
            Some(Self {
                start: start.to_owned(),
                end: end.to_owned(),
                start_id: tokenizer.token_id(start)?,
                end_id: tokenizer.token_id(end)?,
            })
        })
    }

    /// Whether output after `prompt` begins inside the reasoning: the prompt ends with an
    /// opened block.
    pub fn opened_by(&self, prompt: &str) -> bool {
        prompt.trim_end().ends_with(&self.start)
    }
}

/// How a request's choices are split: the model's markers, and whether its prompt opened the
/// reasoning.
#[derive(Clone, Debug)]
pub struct Reasoning {
    pub markers: Markers,
    pub opened: bool,
}

impl Reasoning {
    pub fn splitter(&self) -> Splitter {
        let state = if self.opened { State::Inside { trim: true } } else { State::Opening };
        Splitter { start: self.markers.start.clone(), end: self.markers.end.clone(), state, held: String::new() }
    }

    /// A whole text, split as streaming it would.
    pub fn split(&self, text: &str) -> Split {
        let mut splitter = self.splitter();
        let mut split = splitter.push(text);
        let rest = splitter.finish();
        split.reasoning.push_str(&rest.reasoning);
        split.content.push_str(&rest.content);
        split
    }
}

/// A choice's text, split.
#[derive(Debug, Default, PartialEq)]
pub struct Split {
    pub reasoning: String,
    pub content: String,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum State {
    /// At the start of the output, where the model may open its reasoning.
    Opening,
    /// In the reasoning; `trim` while the whitespace after the start marker is dropped.
    Inside { trim: bool },
    /// In the answer; `trim` while the whitespace after the end marker is dropped.
    After { trim: bool },
}

/// Splits one choice's text as it arrives, holding back only what may be part of a marker.
pub struct Splitter {
    start: String,
    end: String,
    state: State,
    held: String,
}

impl Splitter {
    /// What `text` adds to the reasoning and to the answer.
    pub fn push(&mut self, text: &str) -> Split {
        self.held.push_str(text);
        let mut out = Split::default();
        loop {
            match self.state {
                State::Opening => {
                    let rest = self.held.trim_start();
                    if let Some(after) = rest.strip_prefix(self.start.as_str()) {
                        self.held = after.to_owned();
                        self.state = State::Inside { trim: true };
                    } else if self.start.starts_with(rest) {
                        return out;
                    } else {
                        self.state = State::After { trim: false };
                    }
                }
                State::Inside { trim } => {
                    if trim && !self.drop_leading_whitespace() {
                        return out;
                    }
                    self.state = State::Inside { trim: false };
                    match self.held.find(self.end.as_str()) {
                        Some(at) => {
                            out.reasoning.push_str(&self.held[..at]);
                            self.held.drain(..at + self.end.len());
                            self.state = State::After { trim: true };
                        }
                        None => {
                            let keep = partial_suffix(&self.held, &self.end);
                            out.reasoning.extend(self.held.drain(..self.held.len() - keep));
                            return out;
                        }
                    }
                }
                State::After { trim } => {
                    if trim && !self.drop_leading_whitespace() {
                        return out;
                    }
                    self.state = State::After { trim: false };
                    out.content.push_str(&self.held);
                    self.held.clear();
                    return out;
                }
            }
        }
    }

    /// What was held back, at the end of the choice.
    pub fn finish(&mut self) -> Split {
        let held = std::mem::take(&mut self.held);
        match self.state {
            State::Inside { .. } => Split { reasoning: held, content: String::new() },
            State::After { trim: true } => Split { reasoning: String::new(), content: held.trim_start().to_owned() },
            State::Opening | State::After { .. } => Split { reasoning: String::new(), content: held },
        }
    }

    /// Drops whitespace at the front of what is held; whether anything else is left.
    fn drop_leading_whitespace(&mut self) -> bool {
        let whitespace = self.held.len() - self.held.trim_start().len();
        self.held.drain(..whitespace);
        !self.held.is_empty()
    }
}

/// The length of the longest end of `text` that begins `marker` (and may complete it later).
fn partial_suffix(text: &str, marker: &str) -> usize {
    (1..marker.len().min(text.len() + 1))
        .rev()
        .find(|&n| text.is_char_boundary(text.len() - n) && marker.starts_with(&text[text.len() - n..]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn markers() -> Markers {
        Markers { start: "<think>".into(), end: "</think>".into(), start_id: 1, end_id: 2 }
    }

    /// Streams `pieces` and checks that they join to what the whole text gives.
    fn streamed(opened: bool, pieces: &[&str]) -> Split {
        let reasoning = Reasoning { markers: markers(), opened };
        let mut splitter = reasoning.splitter();
        let mut joined = Split::default();
        let mut parts: Vec<Split> = pieces.iter().map(|p| splitter.push(p)).collect();
        parts.push(splitter.finish());
        for part in parts {
            joined.reasoning.push_str(&part.reasoning);
            joined.content.push_str(&part.content);
        }
        assert_eq!(joined, reasoning.split(&pieces.concat()), "{pieces:?}");
        joined
    }

    fn split(reasoning: &str, content: &str) -> Split {
        Split { reasoning: reasoning.into(), content: content.into() }
    }

    #[test]
    fn markers_come_from_the_ids_the_model_names_then_from_the_vocabulary() {
        let tok =
            crate::text::smollm_tokenizer_with(&[("<think>", true), ("</think>", true), ("<r>", true), ("</r>", true)]);
        let id = |t: &str| tok.token_id(t).unwrap();
        let found = Markers::of(&tok, None).unwrap();
        assert_eq!((found.start.as_str(), found.end_id), ("<think>", id("</think>")));
        let named = Markers::of(&tok, Some((id("<r>"), id("</r>")))).unwrap();
        assert_eq!((named.start.as_str(), named.end.as_str(), named.start_id), ("<r>", "</r>", id("<r>")));
        assert_eq!(Markers::of(&crate::text::smollm_tokenizer(), None), None);
    }

    #[test]
    fn qwen3_style_output_opens_its_own_reasoning() {
        let pieces = ["<th", "ink>\n", "Let me", " think.</", "think>", "\n\n", "Paris."];
        assert_eq!(streamed(false, &pieces), split("Let me think.", "Paris."));
        // Every cut of the text streams to the same split.
        let text = pieces.concat();
        for cut in (1..text.len()).filter(|&c| text.is_char_boundary(c)) {
            assert_eq!(streamed(false, &[&text[..cut], &text[cut..]]), split("Let me think.", "Paris."));
        }
    }

    #[test]
    fn r1_style_output_starts_inside_and_plain_output_is_all_content() {
        assert_eq!(streamed(true, &["\nHmm", ", 2+2.\n</think>\n\n", "4"]), split("Hmm, 2+2.\n", "4"));
        assert_eq!(streamed(false, &["  The answer", " is 4."]), split("", "  The answer is 4."));
        assert_eq!(streamed(false, &["<", "b>bold</b>"]), split("", "<b>bold</b>"));
        // Cut off while thinking: all of it is reasoning, with no answer.
        assert_eq!(streamed(true, &["still thinking </thi"]), split("still thinking </thi", ""));
        // Only the first block is reasoning; a later marker is the answer's text.
        assert_eq!(streamed(false, &["<think>a</think>b <think>c"]), split("a", "b <think>c"));
        assert!(markers().opened_by("<|im_start|>assistant\n<think>\n"));
        assert!(!markers().opened_by("<|im_start|>assistant\n<think>\n\n</think>\n\n"));
    }
}
