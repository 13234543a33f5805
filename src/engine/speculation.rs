//! Prompt-lookup speculation ("n-gram" drafts, as in vLLM and llama.cpp's lookup decoding).
//!
//! A decode step of a small model on a small CPU costs about the same for one token as for a
//! few: the weights are read once either way. So when one sequence generates alone, the tokens
//! that followed the latest earlier occurrence of its last few tokens (in its prompt or its own
//! output) are guessed as its continuation, and the token and its guesses go through the model
//! in one run. The sampler then draws each position from its logits as usual, and the run's
//! tokens are kept while the draws agree with the guesses: what comes out is drawn exactly as
//! without speculation, only more tokens per model run when the text repeats what came before
//! (quoting, summarizing, editing, structured output, a small model's loops).
//!
//! A run of several tokens takes another path through ONNX Runtime's attention kernel than a
//! one-token step, and their logits differ slightly (by up to ~0.7 on SmolLM2, where a run of
//! several tokens matched a whole-prompt run exactly): where two tokens are nearly tied a
//! greedy answer can differ from the one without speculation. That is why it is off unless
//! configured (`speculative_tokens`), and why it only runs for a sequence alone: batched
//! answers stay independent of load.

/// Longest and shortest suffix looked up, longest first. A single token matches too often to
/// predict anything (every "the"), so at least two must match.
const NGRAM_MAX: usize = 4;
const NGRAM_MIN: usize = 2;

/// One sequence's draft length, adapted to how many of its drafts were accepted: a rejected
/// draft costs a longer run for nothing, so drafts shrink when they fail and grow back when
/// they are accepted whole.
pub(super) struct Drafter {
    max: usize,
    len: usize,
    context: Vec<u32>,
}

impl Drafter {
    pub fn new(max: usize) -> Self {
        Self { max, len: max, context: Vec::new() }
    }

    /// Up to `limit` (and the current draft length) tokens guessed to follow `prompt` and
    /// `generated`; empty when the last tokens occurred nowhere before.
    pub fn draft(&mut self, prompt: &[u32], generated: &[u32], limit: usize) -> Vec<u32> {
        let want = self.len.min(limit);
        if want == 0 {
            return Vec::new();
        }
        self.context.clear();
        self.context.extend_from_slice(prompt);
        self.context.extend_from_slice(generated);
        lookup(&self.context, want)
    }

    /// Records that `accepted` of `drafted` guesses were right.
    pub fn update(&mut self, drafted: usize, accepted: usize) {
        self.len = if accepted == drafted {
            (self.len + 2).min(self.max)
        } else if accepted > 0 {
            accepted + 1
        } else {
            (self.len / 2).max(1)
        };
    }
}

/// The up to `want` tokens after the latest earlier occurrence of the longest suffix of
/// `context` (NGRAM_MAX down to NGRAM_MIN tokens) that occurred before.
fn lookup(context: &[u32], want: usize) -> Vec<u32> {
    for n in (NGRAM_MIN..=NGRAM_MAX).rev() {
        if context.len() <= n {
            continue;
        }
        let suffix = &context[context.len() - n..];
        if let Some(start) = (0..context.len() - n).rev().find(|&s| &context[s..s + n] == suffix) {
            let from = start + n;
            return context[from..(from + want).min(context.len())].to_vec();
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continues_the_latest_match_of_the_longest_suffix() {
        // "7 8" occurs twice before the end; the later occurrence wins.
        let context = [1, 7, 8, 2, 3, 7, 8, 4, 5, 6, 7, 8];
        assert_eq!(lookup(&context, 3), vec![4, 5, 6]);
        // A longer suffix match beats a later shorter one.
        let context = [9, 7, 8, 1, 2, 7, 8, 3, 9, 7, 8];
        assert_eq!(lookup(&context, 2), vec![1, 2]);
    }

    #[test]
    fn a_loop_predicts_itself_and_single_tokens_predict_nothing() {
        assert_eq!(lookup(&[5, 6, 5, 6], 4), vec![5, 6]);
        assert_eq!(lookup(&[1, 2, 3, 1], 4), Vec::<u32>::new());
        assert_eq!(lookup(&[1], 4), Vec::<u32>::new());
    }

    #[test]
    fn draft_length_shrinks_on_failure_and_grows_on_success() {
        let mut d = Drafter::new(8);
        d.update(8, 0);
        assert_eq!(d.len, 4);
        d.update(4, 2);
        assert_eq!(d.len, 3);
        d.update(3, 3);
        assert_eq!(d.len, 5);
        for _ in 0..4 {
            d.update(d.len, d.len);
        }
        assert_eq!(d.len, 8);
        for _ in 0..10 {
            d.update(d.len, 0);
        }
        assert_eq!(d.len, 1);
        let prompt = [1, 2, 3, 4, 1, 2];
        assert_eq!(d.draft(&prompt, &[3], 5), vec![4]);
        assert_eq!(d.draft(&prompt, &[3], 0), Vec::<u32>::new());
    }
}
