use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;

use super::request::{Event, FinishReason, GenerateRequest, Matched, ThinkingBudget, Timings};
use super::speculation::Drafter;
use crate::constraint::{Constraint, Next};
use crate::model::{KvCache, Layout};
use crate::sampling::{self, Sampler, TokenLogprobs};
use crate::text::{IncrementalDecoder, StopMatcher, StopOutcome, Tokenizer};

/// One choice being generated: its cache, its sampler and its text state.
pub(super) struct Sequence<L: Layout> {
    pub choice: usize,
    pub cache: KvCache<L>,
    /// Logits for the next token, filled by the model.
    pub logits: Vec<f32>,
    /// The last sampled token, not yet in the cache.
    pub last_token: u32,
    pub finished: Option<FinishReason>,
    pub generated: usize,
    /// The tokens sampled so far (the last one is not in the cache yet).
    pub tokens: Vec<u32>,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    stop: StopMatcher,
    /// Log-probabilities of tokens whose text has not been sent yet.
    pending_logprobs: Vec<TokenLogprobs>,
    scratch: Vec<(f32, u32)>,
    /// The raw logits, kept for logprobs while sampling modifies `logits` (reused every step).
    raw: Vec<f32>,
    /// The request's constraint, followed by this sequence.
    constraint: Option<Constraint>,
    /// Guesses its next tokens; made on its first speculative round.
    pub drafter: Option<Drafter>,
    /// Whether the output is inside a thinking model's reasoning, and how many tokens it may
    /// still spend there (with a `thinking_budget`).
    thinking: Option<Thinking>,
}

struct Thinking {
    budget: ThinkingBudget,
    open: bool,
    left: usize,
}

impl Thinking {
    /// Whether the budget is spent while the reasoning is still open: the end token must come.
    fn must_end(&self) -> bool {
        self.open && self.left == 0
    }

    fn saw(&mut self, token: u32) {
        if token == self.budget.start {
            self.open = true;
        } else if token == self.budget.end {
            self.open = false;
        } else if self.open {
            self.left = self.left.saturating_sub(1);
        }
    }
}

/// What ends a sequence, shared by all choices of a request.
pub(super) struct Rules<'a> {
    pub request: &'a GenerateRequest,
    pub eos: &'a [u32],
    pub context_length: usize,
    pub tokenizer: &'a Arc<Tokenizer>,
}

impl<L: Layout> Sequence<L> {
    /// Bytes of this sequence's own buffers (logits, sampling, tokens), for `/health`.
    pub fn buffer_bytes(&self) -> usize {
        use std::mem::size_of;
        (self.logits.capacity() + self.raw.capacity()) * size_of::<f32>()
            + self.scratch.capacity() * size_of::<(f32, u32)>()
            + self.tokens.capacity() * size_of::<u32>()
    }

    pub fn new(
        choice: usize,
        cache: KvCache<L>,
        logits: Vec<f32>,
        sampler: Sampler,
        request: &GenerateRequest,
    ) -> Self {
        Self {
            choice,
            cache,
            logits,
            last_token: 0,
            finished: None,
            generated: 0,
            tokens: Vec::new(),
            sampler,
            decoder: IncrementalDecoder::default(),
            stop: StopMatcher::new(request.stop.clone()),
            pending_logprobs: Vec::new(),
            scratch: Vec::new(),
            raw: Vec::new(),
            constraint: request.constraint.as_ref().map(|c| c.start()),
            drafter: None,
            thinking: request.thinking_budget.map(|budget| Thinking {
                budget,
                open: budget.opened,
                left: budget.tokens,
            }),
        }
    }

    /// Whether draft tokens may be checked for this sequence. A constraint's state advances
    /// token by token and would have to be rolled back on a rejected guess, so not with one.
    /// So is a thinking budget's count.
    pub fn can_speculate(&self) -> bool {
        self.constraint.is_none() && self.thinking.is_none() && self.finished.is_none()
    }

    /// Samples the next token from `self.logits` and turns it into events: new text, and a
    /// finish when an end-of-sequence token, stop string or limit is reached.
    pub fn advance(&mut self, rules: &Rules<'_>, timings: &mut Timings, events: &mut Vec<Event>) -> Result<()> {
        let request = rules.request;
        let started = Instant::now();
        let mut may_end = !request.ignore_eos && self.generated >= request.min_tokens;
        let logprob_request = request.logprobs;
        if logprob_request.is_some() {
            self.raw.clear();
            self.raw.extend_from_slice(&self.logits);
        }
        if let Some(constraint) = &mut self.constraint {
            // The constraint alone decides where the output may end: its mask allows an
            // end-of-sequence token exactly where the output is complete.
            may_end = true;
            if let Next::Complete = constraint.mask(&mut self.logits)? {
                timings.sampling += started.elapsed();
                self.end(FinishReason::Stop, None, events);
                return Ok(());
            }
        }
        if let Some(thinking) = self.thinking.as_ref().filter(|t| t.must_end()) {
            only_allow(&mut self.logits, thinking.budget.end);
        }
        let banned: &[u32] = if may_end { &[] } else { rules.eos };
        let token = self.sampler.sample(&mut self.logits, banned);
        if let Some(thinking) = &mut self.thinking {
            thinking.saw(token);
        }
        if let Some(top) = logprob_request {
            self.pending_logprobs.push(sampling::logprobs(&self.raw, token, top, &mut self.scratch));
        }
        timings.sampling += started.elapsed();
        self.generated += 1;
        self.last_token = token;
        self.tokens.push(token);

        let is_eos = rules.eos.contains(&token) && may_end;
        let is_stop_token = request.stop_token_ids.contains(&token) && self.generated > request.min_tokens;
        if !is_eos && let Some(constraint) = &mut self.constraint {
            constraint.consume(token)?;
        }
        if is_eos || is_stop_token {
            // The end token itself has no text; what the stop matcher held back is real text.
            self.pending_logprobs.retain(|lp| lp.token != token);
            let matched = if is_eos { Matched::Eos(token) } else { Matched::Token(token) };
            self.end(FinishReason::Stop, Some(matched), events);
            return Ok(());
        }
        let started = Instant::now();
        let piece = self.decoder.step(rules.tokenizer, token)?;
        timings.detokenize += started.elapsed();
        if let Some(piece) = piece {
            match self.stop.push(&piece) {
                StopOutcome::Continue(text) => self.emit(text, events),
                StopOutcome::Stopped(mut text, stop) => {
                    if request.keep_stop {
                        text.push_str(&stop);
                    }
                    self.finish(FinishReason::Stop, Some(Matched::Text(stop)), text, events);
                    return Ok(());
                }
            }
        }
        if self.constraint.as_ref().is_some_and(Constraint::is_complete) {
            self.end(FinishReason::Stop, None, events);
            return Ok(());
        }
        // The next step would feed `token` into the cache, after the prompt and every earlier
        // token (counted from the tokens: during a speculative run the cache already holds
        // the draft).
        if self.generated >= request.max_tokens || request.prompt.len() + self.generated >= rules.context_length {
            self.end(FinishReason::Length, None, events);
        }
        Ok(())
    }

    /// Ends the sequence (from outside too: cancel, deadline), releasing any held-back text.
    pub fn end(&mut self, reason: FinishReason, matched: Option<Matched>, events: &mut Vec<Event>) {
        let rest = self.stop.finish();
        self.finish(reason, matched, rest, events);
    }

    fn emit(&mut self, text: String, events: &mut Vec<Event>) {
        if text.is_empty() && self.pending_logprobs.is_empty() {
            return;
        }
        let logprobs = std::mem::take(&mut self.pending_logprobs);
        if text.is_empty() {
            // Keep the log-probabilities for the next piece of text.
            self.pending_logprobs = logprobs;
            return;
        }
        events.push(Event::Text { choice: self.choice, text, logprobs });
    }

    fn finish(&mut self, reason: FinishReason, matched: Option<Matched>, text: String, events: &mut Vec<Event>) {
        if !text.is_empty() || !self.pending_logprobs.is_empty() {
            let logprobs = std::mem::take(&mut self.pending_logprobs);
            events.push(Event::Text { choice: self.choice, text, logprobs });
        }
        self.finished = Some(reason);
        events.push(Event::Finished { choice: self.choice, reason, matched });
    }
}

/// Leaves `token` the only one that can be sampled.
fn only_allow(logits: &mut [f32], token: u32) {
    for (id, logit) in logits.iter_mut().enumerate() {
        if id != token as usize {
            *logit = f32::NEG_INFINITY;
        }
    }
    if let Some(l) = logits.get_mut(token as usize) {
        // Penalties and biases cannot push it below the others: they are all gone.
        *l = l.max(0.0);
    }
}
