//! The heart: admits requests, schedules model steps, owns the model and its KV caches.
//!
//! Callers (the HTTP server, the C ABI, tests) hand a tokenized [`GenerateRequest`] to
//! [`Engine::submit`] and read [`Event`]s from the returned [`RequestHandle`]. One scheduler
//! thread owns the model and runs it in rounds over every admitted sequence; the queue in
//! front of it is bounded (`max_queued`), so a full queue is an immediate, explicit refusal.

mod prefix_cache;
mod request;
mod reuse;
mod scheduler;
mod sequence;
mod speculation;
mod upkeep;
mod waiting;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use crossbeam_channel::{Sender, TrySendError};

use crate::model::{Layout, LoadedModel, Model, ModelInfo, UseModel};
use crate::text::Tokenizer;

pub use request::{
    EngineError, ErrorKind, Event, FinishReason, GenerateRequest, Matched, RequestHandle, ThinkingBudget, Timings,
    Usage,
};

/// Limits of the engine; every queue and every set of sequences is bounded by these.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Sequences generating at once (a request with `n` choices counts `n`).
    pub max_running: usize,
    /// Requests waiting for a place; beyond this `submit` refuses at once.
    pub max_queued: usize,
    /// Longest a request may wait for a place before it is refused as overloaded.
    pub max_queue_wait: Duration,
    /// Deadline of requests that don't set their own, at start (`Engine::set_request_timeout`
    /// changes it; `submit` reads the current one).
    pub request_timeout: Duration,
    /// Prompts are cut into model runs at multiples of this many positions: the unit of the
    /// pacing beside running streams and of prefix cache reuse (see `Cut`).
    pub prefill_chunk: usize,
    /// While sequences generate, new prompts are fed slowly enough that rounds take on average
    /// at most this many times a plain decode step (running streams' inter-token latency).
    pub stream_slowdown: f64,
    /// Threads for per-sequence CPU work beside the model (0: on the engine thread).
    pub workers: usize,
    /// Memory for keys and values kept for reuse by later requests (0 turns reuse off).
    pub prefix_cache_bytes: usize,
    /// Draft tokens checked per model run when one sequence generates alone (prompt-lookup
    /// speculation, see `speculation`); 0 turns it off.
    pub speculative_tokens: usize,
    /// Called from the scheduler loop itself at least this often, idle or busy: a stuck
    /// engine stops calling it (systemd's watchdog).
    pub heartbeat: Option<Heartbeat>,
}

/// A function the scheduler calls to say it is alive, and how often.
#[derive(Clone)]
pub struct Heartbeat {
    pub every: Duration,
    pub beat: Arc<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for Heartbeat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Heartbeat every {:?}", self.every)
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_running: 8,
            max_queued: 64,
            max_queue_wait: Duration::from_secs(30),
            request_timeout: Duration::from_secs(600),
            prefill_chunk: 16,
            stream_slowdown: 2.0,
            workers: 2,
            prefix_cache_bytes: 256 << 20,
            speculative_tokens: 0,
            heartbeat: None,
        }
    }
}

/// Why a request was not accepted.
#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// The queue is full: try again later.
    Overloaded,
    /// The engine has stopped (shutdown, or its thread died).
    Stopped,
    /// More choices than `max_running`: the request could never run.
    TooManyChoices(String),
    /// Prompt plus completion do not fit the model's context.
    ContextLength(String),
}

impl std::fmt::Display for SubmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubmitError::Overloaded => f.write_str("the server is busy: too many requests are queued, retry later"),
            SubmitError::Stopped => f.write_str("the server is shutting down"),
            SubmitError::TooManyChoices(m) | SubmitError::ContextLength(m) => f.write_str(m),
        }
    }
}

/// Live counts, readable from any thread.
#[derive(Default)]
pub struct EngineStats {
    pub running: AtomicUsize,
    pub queued: AtomicUsize,
    /// Bytes of the shared KV pool (genai layout), and of it those held by live sequences.
    pub kv_pool_bytes: AtomicUsize,
    pub kv_pool_used_bytes: AtomicUsize,
    /// Bytes of the pool resident in memory (read at most once a second).
    pub kv_pool_resident_bytes: AtomicUsize,
    /// Requests that started from a cached prefix, and the prompt tokens they did not compute.
    pub prefix_hits: AtomicUsize,
    pub prefix_cached_tokens: AtomicUsize,
    /// Bytes held by the prefix cache.
    pub prefix_cache_bytes: AtomicUsize,
    /// Bytes requests hold in the engine: each sequence's logits and sampling buffers, and in
    /// the Optimum layout its own keys and values.
    pub sequence_bytes: AtomicUsize,
    /// Decode steps run, and tokens they produced: tokens / steps is the mean batch size.
    pub decode_steps: AtomicUsize,
    pub decode_tokens: AtomicUsize,
    /// Draft tokens checked by speculative runs, and of them those accepted.
    pub draft_tokens: AtomicUsize,
    pub draft_accepted: AtomicUsize,
    /// Set by `Engine::stop`: running requests end now, queued and new ones are refused.
    pub stopping: AtomicBool,
}

/// The engine's counts at one moment, as plain values: what `/health`, `/metrics` and systemd's
/// STATUS all read (see `EngineStats` for what each means).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub running: usize,
    pub queued: usize,
    pub kv_pool_bytes: usize,
    pub kv_pool_used_bytes: usize,
    pub kv_pool_resident_bytes: usize,
    pub prefix_hits: usize,
    pub prefix_cached_tokens: usize,
    pub prefix_cache_bytes: usize,
    pub sequence_bytes: usize,
    pub decode_steps: usize,
    pub decode_tokens: usize,
    pub draft_tokens: usize,
    pub draft_accepted: usize,
}

/// What the engine holds in memory, as the scheduler measures it after a round.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Holdings {
    pub kv_pool: usize,
    /// Bytes of the pool's rows leased now, and of them the parked row's.
    pub kv_pool_leased: usize,
    pub parked_row: usize,
    pub prefix_cache: usize,
    /// The pool's resident size, when it was read this time.
    pub kv_pool_resident: Option<usize>,
}

/// The scheduler's writes: every count and size is set in one of these.
impl EngineStats {
    /// A model run that produced `tokens` tokens for generating sequences.
    pub(crate) fn count_step(&self, tokens: usize) {
        self.decode_steps.fetch_add(1, Ordering::Relaxed);
        self.decode_tokens.fetch_add(tokens, Ordering::Relaxed);
    }

    /// Draft tokens a speculative run checked, and of them those it kept.
    pub(crate) fn count_drafts(&self, checked: usize, accepted: usize) {
        self.draft_tokens.fetch_add(checked, Ordering::Relaxed);
        self.draft_accepted.fetch_add(accepted, Ordering::Relaxed);
    }

    /// A request that started from `tokens` prompt tokens already in a cache.
    pub(crate) fn count_prefix_hit(&self, tokens: usize) {
        self.prefix_hits.fetch_add(1, Ordering::Relaxed);
        self.prefix_cached_tokens.fetch_add(tokens, Ordering::Relaxed);
    }

    /// The places requests take after a round, and the bytes they hold beside the pool.
    pub(crate) fn publish_load(&self, running: usize, sequence_bytes: usize) {
        self.running.store(running, Ordering::Relaxed);
        self.sequence_bytes.store(sequence_bytes, Ordering::Relaxed);
    }

    /// The pool's and the prefix cache's sizes. The parked row is counted as the prefix
    /// cache's, not as a request's; the resident size is kept from its last reading.
    pub(crate) fn publish_holdings(&self, holdings: &Holdings) {
        self.kv_pool_bytes.store(holdings.kv_pool, Ordering::Relaxed);
        let used = holdings.kv_pool_leased.saturating_sub(holdings.parked_row);
        self.kv_pool_used_bytes.store(used, Ordering::Relaxed);
        self.prefix_cache_bytes.store(holdings.prefix_cache, Ordering::Relaxed);
        if let Some(resident) = holdings.kv_pool_resident {
            self.kv_pool_resident_bytes.store(resident, Ordering::Relaxed);
        }
    }
}

impl EngineStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let read = |v: &AtomicUsize| v.load(Ordering::Relaxed);
        StatsSnapshot {
            running: read(&self.running),
            queued: read(&self.queued),
            kv_pool_bytes: read(&self.kv_pool_bytes),
            kv_pool_used_bytes: read(&self.kv_pool_used_bytes),
            kv_pool_resident_bytes: read(&self.kv_pool_resident_bytes),
            prefix_hits: read(&self.prefix_hits),
            prefix_cached_tokens: read(&self.prefix_cached_tokens),
            prefix_cache_bytes: read(&self.prefix_cache_bytes),
            sequence_bytes: read(&self.sequence_bytes),
            decode_steps: read(&self.decode_steps),
            decode_tokens: read(&self.decode_tokens),
            draft_tokens: read(&self.draft_tokens),
            draft_accepted: read(&self.draft_accepted),
        }
    }
}

pub struct Engine {
    jobs: Option<Sender<scheduler::Job>>,
    thread: Option<JoinHandle<()>>,
    info: ModelInfo,
    layout: &'static str,
    provider: crate::model::Provider,
    kv_cache_dtype: crate::model::KvCacheDtype,
    tokenizer: Arc<Tokenizer>,
    config: EngineConfig,
    /// Measured at start: see `longest_prefill_run`.
    longest_prefill_run: usize,
    stats: Arc<EngineStats>,
    /// Deadline of requests without their own, in ms; changeable at run time (reload).
    request_timeout_ms: std::sync::atomic::AtomicU64,
}

impl Engine {
    /// Starts the scheduler thread, which owns `model` from now on.
    pub fn start(model: LoadedModel, tokenizer: Arc<Tokenizer>, config: EngineConfig) -> Result<Self> {
        model.with(Start { tokenizer, config })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The most prompt tokens one model run feeds (see the scheduler's `Cut`).
    pub fn longest_prefill_run(&self) -> usize {
        self.longest_prefill_run
    }

    /// The model's layout: "optimum" or "genai".
    pub fn layout(&self) -> &'static str {
        self.layout
    }

    /// The execution provider the model runs on.
    pub fn provider(&self) -> crate::model::Provider {
        self.provider
    }

    /// How the KV pool stores keys and values.
    pub fn kv_cache_dtype(&self) -> crate::model::KvCacheDtype {
        self.kv_cache_dtype
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Ends every running request at its next step (finish reason `cancelled`, with the text so
    /// far), refuses queued ones as unavailable, and refuses new ones: the last step of a
    /// graceful shutdown, once requests have had their time to finish.
    pub fn stop(&self) {
        self.stats.stopping.store(true, Ordering::SeqCst);
    }

    /// Sets the deadline of requests submitted from now on without their own.
    pub fn set_request_timeout(&self, timeout: Duration) {
        self.request_timeout_ms.store(timeout.as_millis() as u64, Ordering::Relaxed);
    }

    /// Queues a request. Never blocks: a full queue is `Overloaded`.
    pub fn submit(&self, request: GenerateRequest) -> Result<RequestHandle, SubmitError> {
        if self.stats.stopping.load(Ordering::SeqCst) {
            return Err(SubmitError::Stopped);
        }
        if request.n == 0 || request.n > self.config.max_running {
            return Err(SubmitError::TooManyChoices(format!(
                "n must be between 1 and {} (the server's max running sequences)",
                self.config.max_running
            )));
        }
        let needed = request.prompt.len() + request.max_tokens;
        if request.prompt.is_empty() || needed > self.info.context_length {
            return Err(SubmitError::ContextLength(format!(
                "{} prompt tokens plus {} completion tokens do not fit the model's context of {} tokens",
                request.prompt.len(),
                request.max_tokens,
                self.info.context_length
            )));
        }
        let (events_tx, events_rx) = crossbeam_channel::unbounded();
        let cancel = Arc::new(AtomicBool::new(false));
        let queued_at = std::time::Instant::now();
        // Resolved here, once: a reload's new default applies to requests submitted after it.
        let timeout = request.timeout.unwrap_or(Duration::from_millis(self.request_timeout_ms.load(Ordering::Relaxed)));
        let deadline = queued_at + timeout;
        let job = scheduler::Job { request, events: events_tx, cancel: cancel.clone(), queued_at, deadline };
        let jobs = self.jobs.as_ref().ok_or(SubmitError::Stopped)?;
        // Free places count as room: a burst on an idle server is admitted, not refused.
        let free = self.config.max_running.saturating_sub(self.stats.running.load(Ordering::Relaxed));
        if self.stats.queued.fetch_add(1, Ordering::SeqCst) >= self.config.max_queued + free {
            self.stats.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::Overloaded);
        }
        match jobs.try_send(job) {
            Ok(()) => Ok(RequestHandle::new(events_rx, cancel)),
            Err(e) => {
                self.stats.queued.fetch_sub(1, Ordering::SeqCst);
                Err(match e {
                    TrySendError::Full(_) => SubmitError::Overloaded,
                    TrySendError::Disconnected(_) => SubmitError::Stopped,
                })
            }
        }
    }
}

/// `Engine::start` once the model's layout is known: the scheduler is built for it.
struct Start {
    tokenizer: Arc<Tokenizer>,
    config: EngineConfig,
}

impl UseModel for Start {
    type Output = Result<Engine>;

    fn with<L: Layout>(self, model: Model<L>) -> Result<Engine> {
        let Start { tokenizer, config } = self;
        let info = model.info().clone();
        let layout = model.layout_name();
        let provider = model.provider();
        let kv_cache_dtype = model.kv_cache_dtype();
        let stats = Arc::new(EngineStats::default());
        if config.speculative_tokens > 0 && !model.can_verify() {
            log::warn!("speculative_tokens is ignored: the {layout} layout cannot cut back a KV cache");
        }
        // The scheduler drains this channel every round into its own queue, where `max_queued`
        // is enforced (by `stats.queued`) and waits and deadlines are watched.
        let (tx, rx) = crossbeam_channel::bounded(config.max_queued.max(1) * 2);
        let scheduler = scheduler::Scheduler::new(model, tokenizer.clone(), config.clone(), rx, stats.clone());
        let longest_prefill_run = scheduler.longest_prefill_run();
        let thread = std::thread::Builder::new()
            .name("chatd-engine".into())
            .spawn(move || scheduler.run())
            .context("starting the engine thread")?;
        let request_timeout_ms = std::sync::atomic::AtomicU64::new(config.request_timeout.as_millis() as u64);
        Ok(Engine {
            jobs: Some(tx),
            thread: Some(thread),
            info,
            layout,
            provider,
            kv_cache_dtype,
            tokenizer,
            config,
            longest_prefill_run,
            stats,
            request_timeout_ms,
        })
    }
}

impl Drop for Engine {
    /// Closes the queue and waits for the scheduler to finish the requests it holds.
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parked_row_is_the_prefix_caches_and_an_old_resident_reading_stays() {
        let stats = EngineStats::default();
        let holdings = Holdings {
            kv_pool: 1000,
            kv_pool_leased: 600,
            parked_row: 200,
            prefix_cache: 50,
            kv_pool_resident: Some(700),
        };
        stats.publish_holdings(&holdings);
        stats.publish_holdings(&Holdings { kv_pool_resident: None, ..holdings });
        let seen = stats.snapshot();
        assert_eq!((seen.kv_pool_bytes, seen.kv_pool_used_bytes, seen.prefix_cache_bytes), (1000, 400, 50));
        assert_eq!(seen.kv_pool_resident_bytes, 700);
    }

    #[test]
    fn a_speculative_run_counts_one_step_and_its_drafts() {
        let stats = EngineStats::default();
        stats.count_step(3);
        stats.count_drafts(4, 2);
        stats.count_prefix_hit(32);
        let seen = stats.snapshot();
        assert_eq!((seen.decode_steps, seen.decode_tokens, seen.draft_tokens, seen.draft_accepted), (1, 3, 4, 2));
        assert_eq!((seen.prefix_hits, seen.prefix_cached_tokens), (1, 32));
    }
}
