use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Result;
use crossbeam_channel::{Receiver, Sender, TryRecvError};

use super::prefix_cache::PrefixCache;
use super::request::{Event, FinishReason, GenerateRequest, Timings, Usage};
use super::sequence::{Rules, Sequence};
use super::{EngineConfig, EngineStats};
use crate::model::{DecodeItem, KvCache, Model};
use crate::sampling::{Rng, Sampler};
use crate::text::Tokenizer;

/// A request as it travels from `Engine::submit` to the scheduler.
pub(crate) struct Job {
    pub request: GenerateRequest,
    pub events: Sender<Event>,
    pub cancel: Arc<AtomicBool>,
    pub queued_at: Instant,
}

/// An admitted request: its prompt is being fed, or its choices are being generated.
struct Group {
    job: Job,
    state: State,
    timings: Timings,
    first_token: bool,
    /// Prompt tokens restored from the prefix cache.
    cached: usize,
    /// Events of the current round, sent once the round is done.
    events: Vec<Event>,
}

enum State {
    Prefill { cache: KvCache, fed: usize },
    Decode { seqs: Vec<Sequence> },
    Done,
}

/// The step loop. Each round: queued requests are admitted while there is room, every request
/// still reading its prompt feeds one chunk, and every generating sequence of every request
/// advances one token in one batched decode step. Requests join and leave between rounds.
pub(crate) struct Scheduler {
    model: Model,
    tokenizer: Arc<Tokenizer>,
    config: EngineConfig,
    jobs: Receiver<Job>,
    stats: Arc<EngineStats>,
    groups: Vec<Group>,
    /// The oldest queued job, taken off the channel but waiting for room (first come, first served).
    waiting: Option<Job>,
    running: usize,
    prefix: PrefixCache,
}

impl Scheduler {
    pub fn new(
        model: Model,
        tokenizer: Arc<Tokenizer>,
        config: EngineConfig,
        jobs: Receiver<Job>,
        stats: Arc<EngineStats>,
    ) -> Self {
        let prefix = PrefixCache::new(config.prefix_cache_bytes);
        Self { model, tokenizer, config, jobs, stats, groups: Vec::new(), waiting: None, running: 0, prefix }
    }

    /// Runs until the engine is dropped and every admitted request has finished.
    pub fn run(mut self) {
        while self.admit() {
            for group in &mut self.groups {
                if group.job.cancel.load(Ordering::Relaxed) {
                    cancel(group);
                }
            }
            self.prefill_round();
            self.decode_round();
            self.deliver();
            self.groups.retain(|g| !matches!(g.state, State::Done));
            self.running = self.groups.iter().map(|g| g.job.request.n).sum();
            self.stats.running.store(self.running, Ordering::Relaxed);
            self.stats.kv_pool_bytes.store(self.model.kv_pool_bytes(), Ordering::Relaxed);
        }
    }

    /// Moves queued jobs in while there is room. Blocks only when nothing is running.
    /// Returns false when the queue is closed and nothing is left to do.
    fn admit(&mut self) -> bool {
        loop {
            let job = match self.waiting.take() {
                Some(job) => job,
                None if self.groups.is_empty() => match self.jobs.recv() {
                    Ok(job) => job,
                    Err(_) => return false,
                },
                None => match self.jobs.try_recv() {
                    Ok(job) => job,
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => return true,
                },
            };
            if job.cancel.load(Ordering::Relaxed) {
                self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                continue;
            }
            let n = job.request.n;
            let fits =
                self.running + n <= self.config.max_running && self.model.has_room_for(job.request.prompt.len() + 1, n);
            if !fits {
                if self.groups.is_empty() {
                    // Nothing will free room: the request can never run.
                    self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                    let _ = job.events.send(Event::Error("the request does not fit the KV cache budget".into()));
                    continue;
                }
                self.waiting = Some(job);
                return true;
            }
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            let timings = Timings { queued: job.queued_at.elapsed(), ..Timings::default() };
            let (cache, cached) = match self.start_cache(&job.request.prompt) {
                Ok(c) => c,
                Err(e) => {
                    let _ = job.events.send(Event::Error(format!("cannot allocate the KV cache: {e:#}")));
                    continue;
                }
            };
            let state = State::Prefill { cache, fed: cached };
            self.running += n;
            self.groups.push(Group { job, state, timings, first_token: false, cached, events: Vec::new() });
        }
    }

    /// A cache for `prompt`: restored from the longest cached prefix, or empty.
    fn start_cache(&mut self, prompt: &[u32]) -> Result<(KvCache, usize)> {
        if let Some((snapshot, len)) = self.prefix.lookup(prompt) {
            match self.model.restore(snapshot, len) {
                Ok(cache) => {
                    self.stats.prefix_hits.fetch_add(1, Ordering::Relaxed);
                    self.stats.prefix_cached_tokens.fetch_add(len, Ordering::Relaxed);
                    return Ok((cache, len));
                }
                Err(e) => log::warn!("prefix cache restore failed, computing the prompt: {e:#}"),
            }
        }
        Ok((self.model.new_cache()?, 0))
    }

    /// Feeds one prompt chunk of every request still reading its prompt (batch size 1 each).
    fn prefill_round(&mut self) {
        for group in &mut self.groups {
            if matches!(group.state, State::Prefill { .. }) {
                if let Err(e) = prefill_step(&mut self.model, &self.tokenizer, &self.config, group) {
                    fail(group, e);
                }
            }
        }
    }

    /// Advances every generating sequence by one token: one model step for all of them.
    fn decode_round(&mut self) {
        let mut items = Vec::new();
        for group in &mut self.groups {
            if let State::Decode { seqs } = &mut group.state {
                for seq in seqs.iter_mut().filter(|s| s.finished.is_none()) {
                    items.push(DecodeItem { cache: &mut seq.cache, token: seq.last_token, logits: &mut seq.logits });
                }
            }
        }
        if items.is_empty() {
            return;
        }
        self.stats.decode_steps.fetch_add(1, Ordering::Relaxed);
        self.stats.decode_tokens.fetch_add(items.len(), Ordering::Relaxed);
        let started = Instant::now();
        let result = self.model.decode(&mut items);
        drop(items);
        let elapsed = started.elapsed();
        for group in &mut self.groups {
            let State::Decode { seqs } = &mut group.state else { continue };
            if let Err(e) = &result {
                let message = format!("{e:#}");
                fail(group, anyhow::anyhow!(message));
                continue;
            }
            group.timings.model += elapsed;
            let rules = rules(&self.model, &self.tokenizer, &group.job.request);
            let mut outcome = Ok(());
            for seq in seqs.iter_mut().filter(|s| s.finished.is_none()) {
                outcome = seq.advance(&rules, &mut group.timings, &mut group.events);
                if outcome.is_err() {
                    break;
                }
            }
            if let Err(e) = outcome {
                fail(group, e);
            }
        }
    }

    /// Sends each request the events of this round; a request whose caller is gone is dropped
    /// here, which frees its sequences' KV memory.
    fn deliver(&mut self) {
        for group in &mut self.groups {
            if !group.first_token
                && group.events.iter().any(|e| matches!(e, Event::Text { .. } | Event::Finished { .. }))
            {
                group.first_token = true;
                group.timings.time_to_first_token = group.job.queued_at.elapsed();
            }
            for event in group.events.drain(..) {
                if group.job.events.send(event).is_err() {
                    group.state = State::Done;
                    break;
                }
            }
            let State::Decode { seqs } = &group.state else { continue };
            if seqs.iter().any(|s| s.finished.is_none()) {
                continue;
            }
            let usage = Usage {
                prompt_tokens: group.job.request.prompt.len(),
                completion_tokens: seqs.iter().map(|s| s.generated).sum(),
                cached_tokens: group.cached,
            };
            group.timings.total = group.job.queued_at.elapsed();
            let _ = group.job.events.send(Event::Done { usage, timings: group.timings });
            let State::Decode { seqs } = std::mem::replace(&mut group.state, State::Done) else { unreachable!() };
            if self.config.prefix_cache_bytes > 0 {
                remember(&self.model, &mut self.prefix, &group.job.request, &seqs[0]);
                self.stats.prefix_cache_bytes.store(self.prefix.bytes(), Ordering::Relaxed);
            }
        }
    }
}

/// Keeps the first choice's keys and values for later requests that share its tokens.
fn remember(model: &Model, prefix: &mut PrefixCache, request: &GenerateRequest, seq: &Sequence) {
    let fed = seq.cache.len() - request.prompt.len();
    let mut tokens = Vec::with_capacity(seq.cache.len());
    tokens.extend_from_slice(&request.prompt);
    tokens.extend_from_slice(&seq.tokens[..fed]);
    match model.snapshot(&seq.cache) {
        Ok(snapshot) => prefix.insert(tokens, snapshot),
        Err(e) => log::debug!("not caching this prefix: {e:#}"),
    }
}

fn rules<'a>(model: &'a Model, tokenizer: &'a Arc<Tokenizer>, request: &'a GenerateRequest) -> Rules<'a> {
    Rules { request, eos: &model.info().eos_token_ids, context_length: model.info().context_length, tokenizer }
}

/// Feeds the next chunk of the prompt; after the last one, forks the cache into `n` choices and
/// samples each choice's first token.
fn prefill_step(model: &mut Model, tokenizer: &Arc<Tokenizer>, config: &EngineConfig, group: &mut Group) -> Result<()> {
    let State::Prefill { cache, fed } = &mut group.state else { return Ok(()) };
    let prompt = &group.job.request.prompt;
    let mut end = (*fed + config.prefill_chunk.max(1)).min(prompt.len());
    if prompt.len() - end == 1 && end - *fed > 1 {
        // Never leave a last chunk of one token: see PrefixCache::lookup on single-token runs.
        end -= 1;
    }
    let mut logits = vec![0.0; model.info().vocab_size];
    let started = Instant::now();
    model.forward(&prompt[*fed..end], cache, &mut logits)?;
    group.timings.model += started.elapsed();
    *fed = end;
    if end < prompt.len() {
        return Ok(());
    }
    let request = &group.job.request;
    let State::Prefill { cache, .. } = std::mem::replace(&mut group.state, State::Done) else { unreachable!() };
    let mut caches = Vec::with_capacity(request.n);
    for _ in 1..request.n {
        caches.push(model.fork_cache(&cache)?);
    }
    caches.insert(0, cache);
    let mut seqs = Vec::with_capacity(request.n);
    for (choice, cache) in caches.into_iter().enumerate() {
        let rng = match request.sampling.seed {
            Some(seed) => Rng::seeded(seed.wrapping_add(choice as u64)),
            None => Rng::from_entropy(),
        };
        let sampler = Sampler::new(request.sampling.clone(), prompt, rng);
        seqs.push(Sequence::new(choice, cache, logits.clone(), sampler, request.stop.clone()));
    }
    let rules = rules(model, tokenizer, request);
    for seq in &mut seqs {
        seq.advance(&rules, &mut group.timings, &mut group.events)?;
    }
    group.state = State::Decode { seqs };
    Ok(())
}

fn fail(group: &mut Group, error: anyhow::Error) {
    log::error!("request failed in the engine: {error:#}");
    group.events.clear();
    let _ = group.job.events.send(Event::Error(format!("{error:#}")));
    group.state = State::Done;
}

/// Ends a cancelled request: each unfinished choice reports `Cancelled`, then `Done`.
fn cancel(group: &mut Group) {
    let mut completion_tokens = 0;
    if let State::Decode { seqs } = &group.state {
        for seq in seqs {
            completion_tokens += seq.generated;
            if seq.finished.is_none() {
                let _ = group.job.events.send(Event::Finished { choice: seq.choice, reason: FinishReason::Cancelled });
            }
        }
    }
    let usage = Usage { prompt_tokens: group.job.request.prompt.len(), completion_tokens, cached_tokens: group.cached };
    group.timings.total = group.job.queued_at.elapsed();
    let _ = group.job.events.send(Event::Done { usage, timings: group.timings });
    group.state = State::Done;
}
