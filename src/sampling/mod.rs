//! Logits to a token: biases and penalties, temperature, top-k / top-p / min-p, a seeded RNG,
//! and log-probabilities. One `Sampler` per sequence; its buffers are reused every step so the
//! per-token path does not allocate.

mod rng;

use std::collections::HashMap;

pub use rng::Rng;

/// How one sequence picks its tokens. Values are validated by the API layer.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 means no limit.
    pub top_k: usize,
    pub min_p: f32,
    /// OpenAI penalties over the tokens generated so far.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Hugging Face / llama.cpp penalty over prompt and generated tokens (1 = off).
    pub repetition_penalty: f32,
    /// Added to a token's logit before anything else.
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            seed: None,
        }
    }
}

impl SamplingParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == 1
    }
}

/// Log-probability of the chosen token and of the most likely alternatives, from the model's
/// raw distribution (before penalties and temperature, as vLLM reports them by default).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    /// How often each token was generated (presence/frequency penalties).
    generated: HashMap<u32, u32>,
    /// Tokens of the prompt and the output (repetition penalty).
    seen: HashMap<u32, ()>,
    candidates: Vec<(f32, u32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams, prompt: &[u32], rng: Rng) -> Self {
        let seen =
            if params.repetition_penalty != 1.0 { prompt.iter().map(|&t| (t, ())).collect() } else { HashMap::new() };
        Self { params, rng, generated: HashMap::new(), seen, candidates: Vec::new() }
    }

    /// Picks the next token from `logits` (modified in place). `banned` tokens can't be picked
    /// (end-of-sequence before `min_tokens`); the caller guarantees at least one token remains.
    pub fn sample(&mut self, logits: &mut [f32], banned: &[u32]) -> u32 {
        self.apply_biases_and_penalties(logits);
        for &t in banned {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        let token = if self.params.is_greedy() { argmax(logits) } else { self.sample_from(logits) };
        self.accept(token);
        token
    }

    fn accept(&mut self, token: u32) {
        *self.generated.entry(token).or_insert(0) += 1;
        if self.params.repetition_penalty != 1.0 {
            self.seen.insert(token, ());
        }
    }

    fn apply_biases_and_penalties(&self, logits: &mut [f32]) {
        let p = &self.params;
        for &(token, bias) in &p.logit_bias {
            if let Some(l) = logits.get_mut(token as usize) {
                *l += bias;
            }
        }
        if p.repetition_penalty != 1.0 {
            for &token in self.seen.keys() {
                if let Some(l) = logits.get_mut(token as usize) {
                    *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&token, &count) in &self.generated {
                if let Some(l) = logits.get_mut(token as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * count as f32;
                }
            }
        }
    }

    fn sample_from(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // Candidates in descending probability, pruned as early as each filter allows so the
        // common case sorts a few hundred entries, not the whole vocabulary.
        let cands = &mut self.candidates;
        cands.clear();
        // min-p keeps tokens with p >= min_p * p_max, i.e. logit >= max + T*ln(min_p).
        let floor = if p.min_p > 0.0 { max + p.temperature * p.min_p.ln() } else { f32::NEG_INFINITY };
        cands.extend(
            logits
                .iter()
                .enumerate()
                .filter(|&(_, &l)| l >= floor && l > f32::NEG_INFINITY)
                .map(|(i, &l)| (l, i as u32)),
        );
        if cands.is_empty() {
            return argmax(logits);
        }
        if p.top_k > 0 && p.top_k < cands.len() {
            cands.select_nth_unstable_by(p.top_k - 1, |a, b| b.0.total_cmp(&a.0));
            cands.truncate(p.top_k);
        }
        // Turn logits into unnormalised probabilities exp((l - max) / T).
        let mut total = 0.0f32;
        for c in cands.iter_mut() {
            c.0 = ((c.0 - max) * inv_t).exp();
            total += c.0;
        }
        if p.top_p < 1.0 {
            nucleus(cands, total, p.top_p);
            total = cands.iter().map(|c| c.0).sum();
        }
        let mut x = self.rng.next_f32() * total;
        for &(w, token) in cands.iter() {
            if x < w {
                return token;
            }
            x -= w;
        }
        cands.last().map(|c| c.1).unwrap_or(0)
    }
}

/// Keeps the smallest set of most likely candidates whose probability mass reaches `top_p`.
/// Only candidates above a falling threshold are moved to the front and sorted, which is exact
/// because every candidate left behind is less likely than every one moved; in the common case
/// a few hundred entries are sorted instead of the whole vocabulary.
fn nucleus(cands: &mut Vec<(f32, u32)>, total: f32, top_p: f32) {
    let target = top_p * total;
    let mut threshold = total * 1e-3;
    let (mut head, mut mass) = (0, 0.0f32);
    loop {
        // Scans what is left behind `head`; `head` itself advances as candidates move up.
        let behind = head;
        for i in behind..cands.len() {
            if cands[i].0 >= threshold {
                cands.swap(head, i);
                mass += cands[head].0;
                head += 1;
            }
        }
        if mass >= target || head == cands.len() {
            break;
        }
        threshold = if threshold < total * 1e-12 { 0.0 } else { threshold * 1e-2 };
    }
    cands.truncate(head);
    cands.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
    let mut acc = 0.0;
    for i in 0..cands.len() {
        acc += cands[i].0;
        if acc >= target {
            cands.truncate(i + 1);
            break;
        }
    }
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_value = f32::NEG_INFINITY;
    for (i, &l) in logits.iter().enumerate() {
        if l > best_value {
            best_value = l;
            best = i;
        }
    }
    best as u32
}

/// Log-softmax of the raw logits for the chosen token and the `top` most likely tokens.
pub fn logprobs(logits: &[f32], chosen: u32, top: usize, scratch: &mut Vec<(f32, u32)>) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_total = max + logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
    let mut top_list = Vec::new();
    if top > 0 {
        scratch.clear();
        scratch.extend(logits.iter().enumerate().map(|(i, &l)| (l, i as u32)));
        let k = top.min(scratch.len());
        scratch.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
        scratch.truncate(k);
        scratch.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
        top_list = scratch.iter().map(|&(l, t)| (t, l - log_total)).collect();
    }
    TokenLogprobs { token: chosen, logprob: logits[chosen as usize] - log_total, top: top_list }
}

#[cfg(test)]
mod tests;
