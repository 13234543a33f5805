use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::request::{EngineError, ErrorKind, Event, FinishReason, GenerateRequest, Timings, Usage};
use super::reuse::{Parked, Reuse};
use super::sequence::{Rules, Sequence};
use super::speculation::Drafter;
use super::upkeep::Upkeep;
use super::waiting::{Admission, Waiting};
use super::{EngineConfig, EngineStats, Holdings};
use rayon::prelude::*;

use crate::model::{DecodeItem, KvCache, Layout, Model, ModelInfo};
use crate::sampling::{Rng, Sampler};
use crate::text::Tokenizer;

/// Prompt tokens fed in a round when nothing else is generating.
const ALONE_ROUND_TOKENS: usize = 256;

/// How prompts are cut into model runs. Cuts fall at multiples of `chunk` positions, or at the
/// prompt's end, whatever the load: prefix cache restores stop at them too. A run never leaves
/// a single token for a run of its own (the cut moves to the prompt's end): a one-token run
/// gives other numbers than the same token in a longer run (ONNX Runtime computes single
/// tokens on other code paths), so a prompt whose last run were one token would not get the
/// numbers of the same prompt cut elsewhere. Runs of two tokens or more give the same bits
/// however they are cut, which `Cut::probe` checks at start: then a run may span several
/// chunks, up to the round's budget (`ALONE_ROUND_TOKENS` when nothing else runs), since matrix
/// kernels are faster per token on more rows; else every run is one chunk.
/// The fewest tokens a prompt run feeds (but for a one-token prompt): see `Cut`.
pub(super) const SHORTEST_RUN: usize = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cut {
    chunk: usize,
    spans: bool,
}

impl Cut {
    /// The cut for `chunk`, spanning chunks where `model` gives the same bits either way.
    fn probe<L: Layout>(model: &mut Model<L>, chunk: usize) -> Cut {
        let chunk = chunk.max(1);
        // A one-token chunk is itself the lone run that rounds differently.
        if !(SHORTEST_RUN..ALONE_ROUND_TOKENS).contains(&chunk) {
            return Cut { chunk, spans: false };
        }
        let vocab = model.info().vocab_size;
        // Ids spread over the vocabulary; which ones does not matter, only that both ways see them.
        let probe: Vec<u32> = (0..3 * chunk).map(|i| ((i * 7919 + 13) % vocab) as u32).collect();
        let spans = model.runs_agree(&probe, chunk).unwrap_or_else(|e| {
            log::warn!("could not compare run lengths ({e:#})");
            false
        });
        if spans {
            log::info!("prompts run up to {ALONE_ROUND_TOKENS} tokens at a time, cut at multiples of {chunk}");
        } else {
            log::info!(
                "this machine's kernels round differently for other run lengths: prompts run {chunk} tokens at a time"
            );
        }
        Cut { chunk, spans }
    }

    /// The most prompt tokens one run feeds.
    fn longest_run(self) -> usize {
        if self.spans { ALONE_ROUND_TOKENS } else { self.chunk }
    }

    /// Where the run from position `start` of a `len`-token prompt ends when `budget` tokens
    /// may be fed: the furthest cut within the budget (the next one when runs do not span
    /// chunks), or `None` when not even the next is within it. A run that would leave one
    /// token takes it too, a token past the budget.
    fn run_end(self, start: usize, len: usize, budget: usize) -> Option<usize> {
        let next = ((start / self.chunk + 1) * self.chunk).min(len);
        if next - start > budget {
            return None;
        }
        let end = if self.spans {
            let furthest = (start + budget.min(self.longest_run())).min(len);
            if furthest == len { len } else { (furthest / self.chunk * self.chunk).max(next) }
        } else {
            next
        };
        Some(if len - end < SHORTEST_RUN { len } else { end })
    }
}

/// Paces prompt feeding while other sequences generate. On a small CPU a prompt token costs
/// about as much as a whole decode step, so feeding a long prompt flat out would stall every
/// running stream. Prompt tokens accrue as credit at a rate per round; whole chunks (see
/// `Cut`) run once the credit covers them. The rate is tuned so that rounds take on average
/// `slowdown` times a decode step without a prompt beside it.
struct Pacer {
    /// `EngineConfig::stream_slowdown`.
    slowdown: f64,
    /// Prompt tokens earned per round.
    rate: f64,
    credit: f64,
    /// Recent decode steps, and their median: the reference, a round without a prompt beside
    /// it. Taken from every round's decode step, prompt or not: under steady load some prompt
    /// is always waiting, and a reference read only from prompt-free rounds never formed (the
    /// rate then stayed at its start, a token per round). A median, because a burst of other
    /// work on the box (say, the client that is about to send the long prompt) must not move it.
    recent: VecDeque<f64>,
    alone: f64,
    /// Moving average of a round's time while a prompt is fed.
    mixed: f64,
}

impl Pacer {
    fn new(slowdown: f64) -> Self {
        Self { slowdown, rate: 1.0, credit: 0.0, recent: VecDeque::with_capacity(64), alone: 0.0, mixed: 0.0 }
    }

    /// Prompt tokens this round may feed: whole chunks, at most one per waiting prompt in all
    /// (fed oldest first).
    fn budget(&mut self, prompting: usize, chunk: usize) -> usize {
        if prompting == 0 {
            return 0;
        }
        let most = chunk * prompting;
        self.credit = (self.credit + self.rate).min(most as f64);
        if self.credit < chunk as f64 { 0 } else { self.credit as usize / chunk * chunk }
    }

    /// `prompting`: requests still reading their prompt; `fed`: prompt tokens of the round,
    /// which took `prefill` to feed and `decode` for its decode step.
    fn observe(&mut self, prompting: usize, fed: usize, prefill: Duration, decode: Duration) {
        let t = (prefill + decode).as_secs_f64();
        let ema = |avg: f64, x: f64| if avg == 0.0 { x } else { avg + (x - avg) / 8.0 };
        if !decode.is_zero() {
            if self.recent.len() == 64 {
                self.recent.pop_front();
            }
            self.recent.push_back(decode.as_secs_f64());
            let mut sorted: Vec<f64> = self.recent.iter().copied().collect();
            sorted.sort_by(f64::total_cmp);
            self.alone = sorted[sorted.len() / 2];
        }
        if prompting == 0 {
            self.mixed = 0.0;
            self.credit = 0.0;
            return;
        }
        self.credit -= fed as f64;
        self.mixed = ema(self.mixed, t);
        if self.alone > 0.0 {
            // Each waiting prompt is a request stalled outright, so prompts get a larger share
            // of the CPU as more of them wait: one waiting prompt may slow running streams by
            // `slowdown`, each further one by as much again. A burst of new requests thus
            // joins the batch quickly instead of trickling in.
            let target = (1.0 + (self.slowdown - 1.0) * prompting as f64) * self.alone;
            if self.mixed > target {
                self.rate *= 0.8;
            } else if self.mixed < 0.8 * target {
                self.rate = self.rate * 1.1 + 0.05;
            }
            // The floor keeps a prompt moving even when the box is too busy to meet the target.
            self.rate = self.rate.clamp(0.5, 256.0);
        }
        log::trace!(
            "pacer: round {:.1} ms (fed {fed}), mixed {:.1} ms, alone {:.1} ms, rate {:.2} tokens/round",
            t * 1e3,
            self.mixed * 1e3,
            self.alone * 1e3,
            self.rate
        );
    }
}

/// A request as it travels from `Engine::submit` to the scheduler.
pub(crate) struct Job {
    pub request: GenerateRequest,
    pub events: Sender<Event>,
    pub cancel: Arc<AtomicBool>,
    pub queued_at: Instant,
    /// When the request ends, queued or running (its `timeout`, else the engine's default).
    pub deadline: Instant,
}

/// An admitted request: its prompt is being fed, or its choices are being generated.
struct Group<L: Layout> {
    job: Job,
    state: State<L>,
    timings: Timings,
    first_token: bool,
    /// Prompt tokens restored from the prefix cache.
    cached: usize,
    /// Events of the current round, sent once the round is done.
    events: Vec<Event>,
    /// Earlier rounds' events of a request that is not incremental, kept until it ends.
    held: Vec<Event>,
    /// What `held`'s events hold beyond their own size, counted as they come.
    held_heap_bytes: usize,
}

impl<L: Layout> Group<L> {
    fn new(job: Job, state: State<L>, timings: Timings, cached: usize) -> Self {
        let (events, held) = (Vec::new(), Vec::new());
        Self { job, state, timings, first_token: false, cached, events, held, held_heap_bytes: 0 }
    }

    /// Keeps this round's events with the earlier ones, until the request ends.
    fn hold(&mut self) {
        self.held_heap_bytes += self.events.iter().map(Event::heap_bytes).sum::<usize>();
        self.held.append(&mut self.events);
    }

    /// What the kept events take.
    fn held_bytes(&self) -> usize {
        self.held.capacity() * std::mem::size_of::<Event>() + self.held_heap_bytes
    }

    /// Sends the events not yet sent, oldest first; false once the caller is gone.
    fn send_unsent(&mut self) -> bool {
        self.held_heap_bytes = 0;
        let caller = &self.job.events;
        self.held.drain(..).chain(self.events.drain(..)).all(|event| caller.send(event).is_ok())
    }
}

enum State<L: Layout> {
    Prefill { cache: KvCache<L>, fed: usize },
    Decode { seqs: Vec<Sequence<L>> },
    Done,
}

/// The step loop. Each round: queued requests are admitted while there is room, every request
/// still reading its prompt feeds one chunk, and every generating sequence of every request
/// advances one token in one batched decode step. Requests join and leave between rounds.
pub(crate) struct Scheduler<L: Layout> {
    model: Model<L>,
    tokenizer: Arc<Tokenizer>,
    config: EngineConfig,
    cut: Cut,
    jobs: Receiver<Job>,
    stats: Arc<EngineStats>,
    groups: Vec<Group<L>>,
    /// Jobs taken off the channel, waiting for room, oldest first (first come, first served).
    waiting: Waiting,
    running: usize,
    /// The parked row and the prefix cache.
    reuse: Reuse<L>,
    pacer: Pacer,
    /// Logits of the last prompt chunk run, reused from chunk to chunk.
    prefill_logits: Vec<f32>,
    /// Logits of every position of a speculative run.
    verify_logits: Vec<f32>,
    /// Threads for per-sequence CPU work; `None` runs it on the scheduler thread.
    workers: Option<rayon::ThreadPool>,
    /// When to beat the watchdog, give memory back, read the resident size.
    upkeep: Upkeep,
}

impl<L: Layout> Scheduler<L> {
    pub fn new(
        mut model: Model<L>,
        tokenizer: Arc<Tokenizer>,
        config: EngineConfig,
        jobs: Receiver<Job>,
        stats: Arc<EngineStats>,
    ) -> Self {
        let cut = Cut::probe(&mut model, config.prefill_chunk);
        let reuse = Reuse::new(config.prefix_cache_bytes);
        let pacer = Pacer::new(config.stream_slowdown);
        let workers = (config.workers > 0)
            .then(|| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(config.workers)
                    .thread_name(|i| format!("chatd-worker-{i}"))
                    .build()
                    .map_err(|e| log::warn!("no worker pool ({e}); sampling on the engine thread"))
                    .ok()
            })
            .flatten();
        Self {
            model,
            tokenizer,
            config,
            cut,
            jobs,
            stats,
            groups: Vec::new(),
            waiting: Waiting::new(),
            running: 0,
            reuse,
            pacer,
            prefill_logits: Vec::new(),
            verify_logits: Vec::new(),
            workers,
            upkeep: Upkeep::new(Instant::now()),
        }
    }

    /// The most prompt tokens one model run feeds.
    pub fn longest_prefill_run(&self) -> usize {
        self.cut.longest_run()
    }

    /// Runs until the engine is dropped and every admitted request has finished.
    pub fn run(mut self) {
        while self.admit() {
            self.beat();
            let now = Instant::now();
            let stopping = self.stats.stopping.load(Ordering::Relaxed);
            for group in &mut self.groups {
                if group.job.cancel.load(Ordering::Relaxed) || stopping {
                    end(group, FinishReason::Cancelled);
                } else if now >= group.job.deadline {
                    end(group, FinishReason::Deadline);
                }
            }
            let decoding = self.groups.iter().any(|g| matches!(g.state, State::Decode { .. }));
            let prompting = self.groups.iter().filter(|g| matches!(g.state, State::Prefill { .. })).count();
            let budget = if !decoding {
                ALONE_ROUND_TOKENS.max(self.cut.chunk)
            } else {
                self.pacer.budget(prompting, self.cut.chunk)
            };
            let (prefill, fed) = self.prefill_round(budget);
            let decode = self.decode_round();
            if decoding {
                self.pacer.observe(prompting, fed, prefill, decode);
            }
            self.deliver();
            let before = self.groups.len();
            self.groups.retain(|g| !matches!(g.state, State::Done));
            if self.groups.len() < before {
                // The rows of finished requests take no memory while they wait for new ones.
                self.model.discard_free_kv_rows();
            }
            self.upkeep.round_ran();
            self.running = self.groups.iter().map(|g| g.job.request.n).sum();
            self.publish_round_stats();
        }
    }

    /// What a round leaves in the engine's statistics: places taken and memory held.
    fn publish_round_stats(&mut self) {
        self.stats.publish_load(self.running, self.sequence_bytes());
        self.publish_memory_stats(self.upkeep.resident_due(Instant::now()));
    }

    /// The KV pool's and the prefix cache's sizes; the pool's resident size when asked.
    fn publish_memory_stats(&mut self, read_resident: bool) {
        let model = &self.model;
        let kv_pool_resident = read_resident.then(|| model.kv_pool_resident_bytes());
        self.stats.publish_holdings(&Holdings {
            kv_pool: model.kv_pool_bytes(),
            kv_pool_leased: model.kv_pool_used_bytes(),
            parked_row: if self.reuse.is_parked() { model.kv_row_bytes() } else { 0 },
            prefix_cache: self.reuse.prefix_bytes(),
            kv_pool_resident,
        });
        if read_resident {
            self.upkeep.resident_was_read(Instant::now());
        }
    }

    /// What the requests in the engine hold beside the shared pool and the prefix cache.
    fn sequence_bytes(&self) -> usize {
        let model = &self.model;
        let logits = (self.prefill_logits.capacity() + self.verify_logits.capacity()) * std::mem::size_of::<f32>();
        logits
            + self
                .groups
                .iter()
                .map(|g| {
                    let state = match &g.state {
                        State::Prefill { cache, .. } => model.private_cache_bytes(cache),
                        State::Decode { seqs } => {
                            seqs.iter().map(|s| s.buffer_bytes() + model.private_cache_bytes(&s.cache)).sum()
                        }
                        State::Done => 0,
                    };
                    state + g.held_bytes()
                })
                .sum::<usize>()
    }

    /// Tells the watchdog the loop is alive, when it is due.
    fn beat(&mut self) {
        if let Some(heartbeat) = &self.config.heartbeat
            && self.upkeep.beat_due(heartbeat.every, Instant::now())
        {
            (heartbeat.beat)();
        }
    }

    /// Takes new jobs off the channel, drops queued jobs that were cancelled or waited too
    /// long, and admits the oldest while there is room. Blocks only when there is nothing to
    /// do. Returns false when the engine is closed and everything has finished.
    fn admit(&mut self) -> bool {
        while self.groups.is_empty() && self.waiting.is_empty() {
            match self.jobs.recv_timeout(self.upkeep.idle_wait(self.config.heartbeat.as_ref().map(|h| h.every))) {
                Ok(job) => self.waiting.push(job),
                Err(RecvTimeoutError::Timeout) => {
                    self.beat();
                    if self.upkeep.release_due() {
                        self.release_idle_memory();
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return false,
            }
        }
        self.waiting.take_sent(&self.jobs);
        let stopping = self.stats.stopping.load(Ordering::Relaxed);
        self.waiting.expire(stopping, self.config.max_queue_wait, &self.stats.queued);
        while let Some(job) = self.waiting.oldest() {
            let n = job.request.n;
            let fits =
                self.running + n <= self.config.max_running && self.model.has_room_for(job.request.prompt.len() + 1, n);
            match Admission::decide(fits, self.reuse.is_parked(), !self.groups.is_empty()) {
                Admission::Start => {}
                Admission::FreeParked => {
                    self.reuse.unpark(&self.model);
                    continue;
                }
                Admission::Wait => break,
                Admission::Refuse => {
                    let job = self.waiting.take_oldest(&self.stats.queued).expect("oldest exists");
                    let error =
                        EngineError::new(ErrorKind::TooLarge, "the request does not fit the server's KV cache budget");
                    let _ = job.events.send(Event::Error(error));
                    continue;
                }
            }
            let job = self.waiting.take_oldest(&self.stats.queued).expect("oldest exists");
            self.start(job);
        }
        true
    }

    /// Gives back what an idle engine need not hold: the parked row goes to the prefix cache,
    /// the model's working memory and the prefix cache's slack are released.
    fn release_idle_memory(&mut self) {
        self.reuse.release_idle(&self.model);
        self.model.release_idle_memory();
        self.publish_memory_stats(true);
        self.upkeep.released();
    }

    /// Admits `job`: its cache (restored from the parked row or the prefix cache where they
    /// hold its prompt's start) and its place among the running groups.
    fn start(&mut self, job: Job) {
        let n = job.request.n;
        let timings = Timings { queued: job.queued_at.elapsed(), ..Timings::default() };
        let (cache, cached) =
            match self.reuse.cache_for(&mut self.model, &job.request.prompt, self.cut.chunk, &self.stats) {
                Ok(c) => c,
                Err(e) => {
                    let error =
                        EngineError::caused(ErrorKind::Internal, Arc::new(e.context("cannot allocate the KV cache")));
                    let _ = job.events.send(Event::Error(error));
                    return;
                }
            };
        let state = State::Prefill { cache, fed: cached };
        let _ = job.events.send(Event::Started);
        self.running += n;
        self.groups.push(Group::new(job, state, timings, cached));
    }

    /// Feeds up to `budget` prompt tokens, oldest request first; returns the time taken and the
    /// tokens fed.
    fn prefill_round(&mut self, budget: usize) -> (Duration, usize) {
        let mut left = budget;
        let started = Instant::now();
        for group in &mut self.groups {
            if left == 0 {
                break;
            }
            if matches!(group.state, State::Prefill { .. }) {
                match prefill_step(&mut self.model, &self.tokenizer, &mut self.prefill_logits, self.cut, left, group) {
                    Ok(fed) => left = left.saturating_sub(fed),
                    Err(e) => fail(group, Arc::new(e)),
                }
            }
        }
        (started.elapsed(), budget - left)
    }

    /// Advances every generating sequence by one token: one model step for all of them.
    fn decode_round(&mut self) -> Duration {
        // A sequence the KV budget cannot hold one position more ends here ("length"), rather
        // than failing the whole batch when the pool cannot grow. One position more is kept
        // free: an ended sequence's row stays leased until its request is done, and rides along
        // in later steps with a padding token written at its length, which must fit too (else
        // the pool would have to grow past its budget and every request in the step failed).
        let limit = self.model.kv_position_limit();
        for group in &mut self.groups {
            if let State::Decode { seqs } = &mut group.state {
                for seq in seqs.iter_mut().filter(|s| s.finished.is_none() && s.cache.len() + 2 > limit) {
                    log::warn!("a sequence reached the KV cache budget at {} positions", seq.cache.len());
                    seq.end(FinishReason::Length, None, &mut group.events);
                }
            }
        }
        if let Some(elapsed) = self.speculative_round() {
            return elapsed;
        }
        let mut items = Vec::new();
        for group in &mut self.groups {
            if let State::Decode { seqs } = &mut group.state {
                for seq in seqs.iter_mut().filter(|s| s.finished.is_none()) {
                    items.push(DecodeItem { cache: &mut seq.cache, token: seq.last_token, logits: &mut seq.logits });
                }
            }
        }
        if items.is_empty() {
            return Duration::ZERO;
        }
        self.stats.count_step(items.len());
        let batch = items.len();
        let started = Instant::now();
        let result = self.model.decode(&mut items);
        drop(items);
        let elapsed = started.elapsed();
        log::trace!("decode step, batch {batch}: {:.1} ms", elapsed.as_secs_f64() * 1e3);
        if let Err(e) = result {
            let error = Arc::new(e);
            for group in self.groups.iter_mut().filter(|g| matches!(g.state, State::Decode { .. })) {
                fail(group, error.clone());
            }
            return elapsed;
        }
        // Sampling, detokenization and stop strings: per request, on the worker pool when
        // several requests are generating, so one request's heavy work runs beside the others'.
        let info = self.model.info();
        let tokenizer = &self.tokenizer;
        let work = |group: &mut Group<L>| advance_group(group, info, tokenizer, elapsed);
        let generating = self.groups.iter().filter(|g| matches!(g.state, State::Decode { .. })).count();
        match &self.workers {
            Some(pool) if generating > 1 => pool.install(|| self.groups.par_iter_mut().for_each(work)),
            _ => self.groups.iter_mut().for_each(work),
        }
        elapsed
    }

    /// When one sequence generates alone and its last tokens occurred before, runs its token
    /// and the tokens that followed then in one model run and keeps those the sampler agrees
    /// with (see `speculation`). `None`: not the case, or no draft; a plain step follows.
    fn speculative_round(&mut self) -> Option<Duration> {
        if self.config.speculative_tokens == 0 || !self.model.can_verify() {
            return None;
        }
        // Alone: no prompt being read and exactly one sequence generating.
        if self.groups.iter().any(|g| matches!(g.state, State::Prefill { .. })) {
            return None;
        }
        let mut alone = None;
        for (g, group) in self.groups.iter().enumerate() {
            if let State::Decode { seqs } = &group.state {
                for (i, _) in seqs.iter().enumerate().filter(|(_, s)| s.finished.is_none()) {
                    if alone.replace((g, i)).is_some() {
                        return None;
                    }
                }
            }
        }
        let (g, i) = alone?;
        let group = &mut self.groups[g];
        let State::Decode { seqs } = &mut group.state else { return None };
        let seq = &mut seqs[i];
        if !seq.can_speculate() {
            return None;
        }
        let request = &group.job.request;
        let old_len = seq.cache.len();
        // Room for the token and its draft: tokens still allowed, context and KV budget.
        let room = (request.max_tokens.saturating_sub(seq.generated))
            .min(self.model.info().context_length.saturating_sub(old_len + 1))
            .min(self.model.kv_position_limit().saturating_sub(old_len + 1));
        let drafter = seq.drafter.get_or_insert_with(|| Drafter::new(self.config.speculative_tokens));
        let draft = drafter.draft(&request.prompt, &seq.tokens, room.saturating_sub(1));
        if draft.is_empty() {
            return None;
        }
        let mut tokens = Vec::with_capacity(draft.len() + 1);
        tokens.push(seq.last_token);
        tokens.extend_from_slice(&draft);
        let started = Instant::now();
        let result = self.model.verify(&tokens, &mut seq.cache, &mut self.verify_logits);
        let elapsed = started.elapsed();
        log::trace!("speculative step, {} draft tokens: {:.1} ms", draft.len(), elapsed.as_secs_f64() * 1e3);
        if let Err(e) = result {
            fail(group, Arc::new(e));
            return Some(elapsed);
        }
        group.timings.model += elapsed;
        let vocab = self.model.info().vocab_size;
        let rules = rules(self.model.info(), &self.tokenizer, request);
        // Row `used` holds the logits after the token and draft[..used]; valid while every
        // earlier draw agreed with the draft.
        let mut used = 0;
        let outcome = loop {
            seq.logits.copy_from_slice(&self.verify_logits[used * vocab..(used + 1) * vocab]);
            if let Err(e) = seq.advance(&rules, &mut group.timings, &mut group.events) {
                break Err(e);
            }
            if seq.finished.is_some() || used == draft.len() || seq.last_token != draft[used] {
                break Ok(());
            }
            used += 1;
        };
        seq.drafter.as_mut().expect("speculating").update(draft.len(), used);
        let outcome = outcome.and_then(|()| self.model.truncate(&mut seq.cache, old_len + 1 + used));
        self.stats.count_step(used + 1);
        self.stats.count_drafts(draft.len(), used);
        if let Err(e) = outcome {
            fail(group, Arc::new(e));
        }
        Some(elapsed)
    }

    /// Sends each request the events of this round, or, where the request is not incremental,
    /// all its events once it has ended; a request whose caller is gone is dropped here, which
    /// frees its sequences' KV memory.
    fn deliver(&mut self) {
        let mut finished = Vec::new();
        for group in &mut self.groups {
            if !group.first_token
                && group.events.iter().any(|e| matches!(e, Event::Text { .. } | Event::Finished { .. }))
            {
                group.first_token = true;
                group.timings.time_to_first_token = group.job.queued_at.elapsed();
            }
            let ended = matches!(&group.state, State::Decode { seqs } if seqs.iter().all(|s| s.finished.is_some()));
            if !ended && !group.job.request.incremental {
                group.hold();
                continue;
            }
            if !group.send_unsent() {
                group.state = State::Done;
            }
            let State::Decode { seqs } = &group.state else { continue };
            if !ended {
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
            if self.config.prefix_cache_bytes > 0
                && let Some(first) = seqs.into_iter().next()
            {
                finished.push(park(&group.job.request, first));
            }
        }
        if finished.is_empty() {
            return;
        }
        // Parked only when the engine goes idle with it (a chat's turn done, its next one on
        // the way); under load, rows are copied out at once as other requests are waiting.
        let idle = self.waiting.is_empty() && self.groups.iter().all(|g| matches!(g.state, State::Done));
        self.reuse.keep(&self.model, finished, idle);
        self.publish_memory_stats(false);
    }
}

/// The first choice's cache and the tokens it holds (the prompt and the reply so far).
fn park<L: Layout>(request: &GenerateRequest, seq: Sequence<L>) -> Parked<L> {
    let fed = seq.cache.len() - request.prompt.len();
    let mut tokens = Vec::with_capacity(seq.cache.len());
    tokens.extend_from_slice(&request.prompt);
    tokens.extend_from_slice(&seq.tokens[..fed]);
    Parked { tokens, prompt_len: request.prompt.len(), cache: seq.cache }
}

fn rules<'a>(info: &'a ModelInfo, tokenizer: &'a Arc<Tokenizer>, request: &'a GenerateRequest) -> Rules<'a> {
    Rules { request, eos: &info.eos_token_ids, context_length: info.context_length, tokenizer }
}

/// Samples the next token of each generating sequence of `group` from its fresh logits.
fn advance_group<L: Layout>(group: &mut Group<L>, info: &ModelInfo, tokenizer: &Arc<Tokenizer>, step: Duration) {
    let State::Decode { seqs } = &mut group.state else { return };
    group.timings.model += step;
    let rules = rules(info, tokenizer, &group.job.request);
    let mut outcome = Ok(());
    for seq in seqs.iter_mut().filter(|s| s.finished.is_none()) {
        outcome = seq.advance(&rules, &mut group.timings, &mut group.events);
        if outcome.is_err() {
            break;
        }
    }
    if let Err(e) = outcome {
        fail(group, Arc::new(e));
    }
}

/// Feeds the prompt in runs cut as `cut` says while `budget` allows; returns the tokens fed.
/// After the last run, forks the cache into `n` choices and samples each first token.
fn prefill_step<L: Layout>(
    model: &mut Model<L>,
    tokenizer: &Arc<Tokenizer>,
    logits: &mut Vec<f32>,
    cut: Cut,
    budget: usize,
    group: &mut Group<L>,
) -> Result<usize> {
    let mut fed_now = 0;
    loop {
        let State::Prefill { fed, .. } = &group.state else { return Ok(fed_now) };
        let start = *fed;
        let Some(end) = cut.run_end(start, group.job.request.prompt.len(), budget - fed_now) else {
            return Ok(fed_now);
        };
        prefill_chunk(model, tokenizer, logits, start, end, group)?;
        fed_now += end - start;
    }
}

/// Runs prompt positions `start..end`; after the last, starts generating.
fn prefill_chunk<L: Layout>(
    model: &mut Model<L>,
    tokenizer: &Arc<Tokenizer>,
    logits: &mut Vec<f32>,
    start: usize,
    end: usize,
    group: &mut Group<L>,
) -> Result<()> {
    let State::Prefill { cache, fed } = &mut group.state else { return Ok(()) };
    let prompt = &group.job.request.prompt;
    logits.resize(model.info().vocab_size, 0.0);
    let started = Instant::now();
    model.forward(&prompt[start..end], cache, logits)?;
    group.timings.model += started.elapsed();
    log::trace!("prefill {} tokens after {start}: {:.1} ms", end - start, started.elapsed().as_secs_f64() * 1e3);
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
        seqs.push(Sequence::new(choice, cache, logits.clone(), sampler, request));
    }
    let rules = rules(model.info(), tokenizer, request);
    for seq in &mut seqs {
        seq.advance(&rules, &mut group.timings, &mut group.events)?;
    }
    group.state = State::Decode { seqs };
    Ok(())
}

fn fail<L: Layout>(group: &mut Group<L>, error: Arc<anyhow::Error>) {
    let kind = if error.downcast_ref::<crate::constraint::Failed>().is_some() {
        log::info!("request ended by its constraint: {error:#}");
        ErrorKind::Constraint
    } else {
        log::error!("request failed in the engine: {error:#}");
        ErrorKind::Internal
    };
    group.events.clear();
    let _ = group.job.events.send(Event::Error(EngineError::caused(kind, error)));
    group.state = State::Done;
}

/// Ends a request early (cancelled, or past its deadline): each unfinished choice gets what
/// its stop matcher held back and a finish with `reason`, then `Done` with the usage so far.
fn end<L: Layout>(group: &mut Group<L>, reason: FinishReason) {
    let mut completion_tokens = 0;
    match &mut group.state {
        State::Decode { seqs } => {
            for seq in seqs.iter_mut() {
                completion_tokens += seq.generated;
                if seq.finished.is_none() {
                    seq.end(reason, None, &mut group.events);
                }
            }
        }
        // Still reading its prompt: every choice ends with no text.
        State::Prefill { .. } => {
            group.events.extend((0..group.job.request.n).map(|choice| Event::Finished {
                choice,
                reason,
                matched: None,
            }));
        }
        State::Done => {}
    }
    let _ = group.send_unsent();
    let usage = Usage { prompt_tokens: group.job.request.prompt.len(), completion_tokens, cached_tokens: group.cached };
    group.timings.total = group.job.queued_at.elapsed();
    let _ = group.job.events.send(Event::Done { usage, timings: group.timings });
    group.state = State::Done;
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Cut, Pacer};

    /// Runs `rounds` rounds of a pacer with `prompting` prompts always waiting, where a decode
    /// step takes `decode_ms` and each 16-token chunk `chunk_ms`; returns the prompt tokens fed
    /// and the mean round time (ms) over the second half, once the rate has settled.
    fn pace(prompting: usize, decode_ms: f64, chunk_ms: f64, rounds: usize) -> (usize, f64) {
        let mut pacer = Pacer::new(2.0);
        let (mut fed_total, mut time_total) = (0, 0.0);
        for round in 0..rounds {
            let fed = pacer.budget(prompting, 16);
            let prefill = (fed / 16) as f64 * chunk_ms;
            pacer.observe(
                prompting,
                fed,
                Duration::from_secs_f64(prefill / 1e3),
                Duration::from_secs_f64(decode_ms / 1e3),
            );
            if round >= rounds / 2 {
                fed_total += fed;
                time_total += prefill + decode_ms;
            }
        }
        (fed_total, time_total / (rounds - rounds / 2) as f64)
    }

    #[test]
    fn prompts_paced_beside_streams_keep_rounds_near_the_target() {
        // A chunk costs four decode steps (a 0.5B model on 2 cores): with one prompt waiting and
        // slowdown 2, rounds may average two decode steps.
        let (fed, mean) = pace(1, 30.0, 120.0, 2000);
        assert!((50.0..=70.0).contains(&mean), "mean round {mean:.1} ms against a target of 60");
        assert!(fed > 0);
        // Cheap chunks (a small model) go in every round.
        let (fed, _) = pace(1, 30.0, 5.0, 2000);
        assert_eq!(fed, 16 * 1000);
    }

    #[test]
    fn the_reference_forms_while_prompts_are_always_waiting() {
        // No round ever runs without a prompt waiting: the rate must still grow past its start
        // of a token per round (a chunk every 16 rounds) when the rounds allow it.
        let (fed, _) = pace(3, 30.0, 60.0, 2000);
        assert!(fed > 1000 * 16 / 4, "{fed} tokens in 1000 rounds");
    }

    #[test]
    fn a_round_feeds_at_most_a_chunk_per_waiting_prompt() {
        let mut pacer = Pacer::new(2.0);
        pacer.rate = 1000.0;
        assert_eq!(pacer.budget(1, 16), 16);
        pacer.credit = 0.0;
        assert_eq!(pacer.budget(3, 16), 48);
        pacer.credit = 0.0;
        pacer.rate = 20.0;
        assert_eq!(pacer.budget(3, 16), 16);
    }

    #[test]
    fn more_waiting_prompts_get_a_larger_share() {
        let (one, _) = pace(1, 30.0, 120.0, 2000);
        let (four, _) = pace(4, 30.0, 120.0, 2000);
        assert!(four > one, "{four} tokens with four prompts waiting, {one} with one");
    }

    /// The ends of the runs feeding a `len`-token prompt from `start`, `budget` tokens a round.
    fn runs(cut: Cut, start: usize, len: usize, budget: usize) -> Vec<usize> {
        let (mut at, mut ends) = (start, Vec::new());
        while at < len {
            let end = cut.run_end(at, len, budget).expect("the next cut is within the budget");
            ends.push(end);
            at = end;
        }
        ends
    }

    #[test]
    fn runs_end_at_chunk_multiples_or_the_prompt_end() {
        let single = Cut { chunk: 16, spans: false };
        assert_eq!(runs(single, 0, 40, 256), [16, 32, 40]);
        let spanning = Cut { chunk: 16, spans: true };
        assert_eq!(runs(spanning, 0, 40, 256), [40]);
        assert_eq!(runs(spanning, 0, 600, 256), [256, 512, 600]);
        // A budget that is not a multiple of the chunk stops at the last cut within it.
        assert_eq!(runs(spanning, 0, 120, 40), [32, 64, 96, 120]);
        // Resumed from a restored prefix, runs still end on the same cuts.
        assert_eq!(runs(spanning, 20, 600, 256), [272, 528, 600]);
        assert_eq!(runs(single, 20, 40, 256), [32, 40]);
    }

    #[test]
    fn no_run_leaves_a_single_token_behind() {
        // A one-token run would round differently (see `Cut`).
        for cut in [Cut { chunk: 16, spans: false }, Cut { chunk: 16, spans: true }] {
            assert_eq!(*runs(cut, 0, 33, 16).last().unwrap(), 33);
            assert_eq!(cut.run_end(16, 33, 16), Some(33), "{cut:?}");
            for len in 2..100 {
                for budget in [16, 48, 256] {
                    let ends = runs(cut, 0, len, budget);
                    let starts = std::iter::once(0).chain(ends.iter().copied());
                    assert!(starts.zip(&ends).all(|(s, e)| e - s >= 2), "{cut:?} {len} {budget}: {ends:?}");
                }
            }
        }
        assert_eq!(runs(Cut { chunk: 16, spans: true }, 0, 257, 256), [257]);
    }

    #[test]
    fn nothing_runs_when_the_next_cut_is_past_the_budget() {
        let cut = Cut { chunk: 16, spans: true };
        assert_eq!(cut.run_end(0, 600, 15), None);
        assert_eq!(cut.run_end(0, 10, 10), Some(10));
        assert_eq!(cut.run_end(0, 600, 0), None);
    }
}
