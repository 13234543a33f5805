use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Result;
use crossbeam_channel::{Receiver, Sender, TryRecvError};

use super::request::{Event, FinishReason, GenerateRequest, Timings, Usage};
use super::sequence::{Rules, Sequence};
use super::{EngineConfig, EngineStats};
use crate::model::{KvCache, Model};
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
}

enum State {
    Prefill { cache: KvCache, fed: usize },
    Decode { seqs: Vec<Sequence> },
    Done,
}

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
    events: Vec<Event>,
}

impl Scheduler {
    pub fn new(
        model: Model,
        tokenizer: Arc<Tokenizer>,
        config: EngineConfig,
        jobs: Receiver<Job>,
        stats: Arc<EngineStats>,
    ) -> Self {
        Self {
            model,
            tokenizer,
            config,
            jobs,
            stats,
            groups: Vec::new(),
            waiting: None,
            running: 0,
            events: Vec::new(),
        }
    }

    /// Runs until the engine is dropped and every admitted request has finished.
    pub fn run(mut self) {
        while self.admit() {
            // One round: every admitted request advances by one model run per sequence.
            for index in 0..self.groups.len() {
                self.step_group(index);
            }
            self.groups.retain(|g| !matches!(g.state, State::Done));
            self.running = self.groups.iter().map(|g| g.job.request.n).sum();
            self.stats.running.store(self.running, Ordering::Relaxed);
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
            if self.running + job.request.n > self.config.max_running {
                self.waiting = Some(job);
                return true;
            }
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            let mut timings = Timings {
                queued: job.queued_at.elapsed(),
                ..Timings::default()
            };
            let state = match self.model.new_cache() {
                Ok(cache) => State::Prefill { cache, fed: 0 },
                Err(e) => {
                    let _ = job
                        .events
                        .send(Event::Error(format!("cannot allocate the KV cache: {e:#}")));
                    continue;
                }
            };
            timings.total = timings.queued;
            self.running += job.request.n;
            self.groups.push(Group {
                job,
                state,
                timings,
                first_token: false,
            });
        }
    }

    fn step_group(&mut self, index: usize) {
        let group = &mut self.groups[index];
        if group.job.cancel.load(Ordering::Relaxed) {
            cancel(group);
            return;
        }
        self.events.clear();
        let result = match &mut group.state {
            State::Prefill { .. } => prefill_step(
                &mut self.model,
                &self.tokenizer,
                &self.config,
                group,
                &mut self.events,
            ),
            State::Decode { .. } => {
                decode_step(&mut self.model, &self.tokenizer, group, &mut self.events)
            }
            State::Done => Ok(()),
        };
        if let Err(e) = result {
            log::error!("request failed in the engine: {e:#}");
            let _ = group.job.events.send(Event::Error(format!("{e:#}")));
            group.state = State::Done;
            return;
        }
        if !group.first_token
            && self
                .events
                .iter()
                .any(|e| matches!(e, Event::Text { .. } | Event::Finished { .. }))
        {
            group.first_token = true;
            group.timings.time_to_first_token = group.job.queued_at.elapsed();
        }
        for event in self.events.drain(..) {
            if group.job.events.send(event).is_err() {
                // The caller is gone: free the sequences now.
                group.state = State::Done;
                return;
            }
        }
        if let State::Decode { seqs } = &group.state {
            if seqs.iter().all(|s| s.finished.is_some()) {
                let usage = Usage {
                    prompt_tokens: group.job.request.prompt.len(),
                    completion_tokens: seqs.iter().map(|s| s.generated).sum(),
                    cached_tokens: 0,
                };
                group.timings.total = group.job.queued_at.elapsed();
                let _ = group.job.events.send(Event::Done {
                    usage,
                    timings: group.timings,
                });
                group.state = State::Done;
            }
        }
    }
}

fn rules<'a>(
    model: &'a Model,
    tokenizer: &'a Arc<Tokenizer>,
    request: &'a GenerateRequest,
) -> Rules<'a> {
    Rules {
        request,
        eos: &model.info().eos_token_ids,
        context_length: model.info().context_length,
        tokenizer,
    }
}

/// Feeds the next chunk of the prompt; after the last one, forks the cache into `n` choices and
/// samples each choice's first token.
fn prefill_step(
    model: &mut Model,
    tokenizer: &Arc<Tokenizer>,
    config: &EngineConfig,
    group: &mut Group,
    events: &mut Vec<Event>,
) -> Result<()> {
    let State::Prefill { cache, fed } = &mut group.state else {
        return Ok(());
    };
    let prompt = &group.job.request.prompt;
    let end = (*fed + config.prefill_chunk.max(1)).min(prompt.len());
    let mut logits = vec![0.0; model.info().vocab_size];
    let started = Instant::now();
    model.forward(&prompt[*fed..end], cache, &mut logits)?;
    group.timings.model += started.elapsed();
    *fed = end;
    if end < prompt.len() {
        return Ok(());
    }
    let request = &group.job.request;
    let State::Prefill { cache, .. } = std::mem::replace(&mut group.state, State::Done) else {
        unreachable!()
    };
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
        seqs.push(Sequence::new(
            choice,
            cache,
            logits.clone(),
            sampler,
            request.stop.clone(),
        ));
    }
    let rules = rules(model, tokenizer, request);
    for seq in &mut seqs {
        seq.advance(&rules, &mut group.timings, events)?;
    }
    group.state = State::Decode { seqs };
    Ok(())
}

/// Runs every unfinished choice one token further.
fn decode_step(
    model: &mut Model,
    tokenizer: &Arc<Tokenizer>,
    group: &mut Group,
    events: &mut Vec<Event>,
) -> Result<()> {
    let State::Decode { seqs } = &mut group.state else {
        return Ok(());
    };
    for seq in seqs.iter_mut().filter(|s| s.finished.is_none()) {
        let started = Instant::now();
        model.forward(&[seq.last_token], &mut seq.cache, &mut seq.logits)?;
        group.timings.model += started.elapsed();
        let rules = rules(model, tokenizer, &group.job.request);
        seq.advance(&rules, &mut group.timings, events)?;
    }
    Ok(())
}

/// Ends a cancelled request: each unfinished choice reports `Cancelled`, then `Done`.
fn cancel(group: &mut Group) {
    let mut completion_tokens = 0;
    if let State::Decode { seqs } = &group.state {
        for seq in seqs {
            completion_tokens += seq.generated;
            if seq.finished.is_none() {
                let _ = group.job.events.send(Event::Finished {
                    choice: seq.choice,
                    reason: FinishReason::Cancelled,
                });
            }
        }
    }
    let usage = Usage {
        prompt_tokens: group.job.request.prompt.len(),
        completion_tokens,
        cached_tokens: 0,
    };
    group.timings.total = group.job.queued_at.elapsed();
    let _ = group.job.events.send(Event::Done {
        usage,
        timings: group.timings,
    });
    group.state = State::Done;
}
