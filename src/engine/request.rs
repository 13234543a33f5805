use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crossbeam_channel::Receiver;

use crate::constraint::Prepared;
use crate::sampling::{SamplingParams, TokenLogprobs};

/// A tokenized, validated request: everything the engine needs and nothing about HTTP or JSON.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    /// Independent completions of the same prompt.
    pub n: usize,
    pub max_tokens: usize,
    /// End-of-sequence tokens are not allowed before this many tokens.
    pub min_tokens: usize,
    /// Keep generating past end-of-sequence tokens (until `max_tokens` or a stop string).
    pub ignore_eos: bool,
    /// Stop strings; the completion ends before the first one found.
    pub stop: Vec<String>,
    /// Extra tokens that end the completion (besides the model's end-of-sequence tokens).
    pub stop_token_ids: Vec<u32>,
    pub sampling: SamplingParams,
    /// Report log-probabilities, with this many alternatives per token.
    pub logprobs: Option<usize>,
    /// The client's own limit (`timeout`): the request ends this long after submission, with
    /// the text so far (finish reason `Deadline`). `None`: the engine's `request_timeout` at
    /// submission (see `Job::deadline`).
    pub timeout: Option<Duration>,
    /// A compiled constraint every choice's output must follow.
    pub constraint: Option<Prepared>,
    /// Keep a matched stop string at the end of the text (vLLM's `include_stop_str_in_output`,
    /// SGLang's `no_stop_trim`) instead of cutting it off.
    pub keep_stop: bool,
    /// A thinking model's most reasoning tokens: then its end-of-thinking token is forced.
    pub thinking_budget: Option<ThinkingBudget>,
    /// Hand text over as it is generated (streaming). When false the engine keeps a request's
    /// events until it ends and sends them together, so its caller wakes once instead of once
    /// per token: where the model's threads take every core, each wake-up costs them one.
    pub incremental: bool,
}

/// How long a thinking model may reason: `tokens` generated inside its reasoning block (opened
/// by the prompt, when `opened`, or by `start` in the output; closed by `end`), after which
/// `end` is the only token it may generate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThinkingBudget {
    pub tokens: usize,
    pub start: u32,
    pub end: u32,
    pub opened: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-sequence token or stop string.
    Stop,
    /// `max_tokens` or the model's context was reached.
    Length,
    /// The request was cancelled (client gone, or a callback asked to stop).
    Cancelled,
    /// The request's deadline passed.
    Deadline,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Deadline => "timeout",
        }
    }
}

/// What ended a choice with `FinishReason::Stop`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Matched {
    /// One of the model's end-of-sequence tokens.
    Eos(u32),
    /// One of the request's `stop_token_ids`.
    Token(u32),
    /// One of the request's `stop` strings.
    Text(String),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Tokens sampled over all choices, end-of-sequence tokens included.
    pub completion_tokens: usize,
    /// Prompt tokens whose keys and values were reused instead of computed.
    pub cached_tokens: usize,
}

/// Where a request's time went, for logs and the benchmark's per-step split.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timings {
    pub queued: Duration,
    /// Submission to the first sampled token.
    pub time_to_first_token: Duration,
    /// Model runs for this request's prompt and tokens.
    pub model: Duration,
    pub sampling: Duration,
    pub detokenize: Duration,
    pub total: Duration,
}

/// What the engine reports about a request, in order: `Started` (unless refused from the
/// queue), text pieces and finishes per choice, then exactly one `Done` (or one `Error`).
#[derive(Clone, Debug)]
pub enum Event {
    /// The request has left the queue and its prompt is being read: it can no longer be
    /// refused as overloaded or timed out in the queue.
    Started,
    /// New text for a choice: always complete UTF-8, never part of a stop string.
    Text { choice: usize, text: String, logprobs: Vec<TokenLogprobs> },
    /// A choice has ended; its text is complete. `matched` says what stopped it, when a token
    /// or stop string did.
    Finished { choice: usize, reason: FinishReason, matched: Option<Matched> },
    /// All choices have ended.
    Done { usage: Usage, timings: Timings },
    /// The request failed or was refused inside the engine; no more events follow.
    Error(EngineError),
}

impl Event {
    /// What the event holds beyond its own size (text and log-probabilities).
    pub(crate) fn heap_bytes(&self) -> usize {
        match self {
            Event::Text { text, logprobs, .. } => {
                text.capacity()
                    + logprobs.capacity() * std::mem::size_of::<TokenLogprobs>()
                    + logprobs.iter().map(|l| l.top.capacity() * std::mem::size_of::<(u32, f32)>()).sum::<usize>()
            }
            Event::Finished { matched: Some(Matched::Text(text)), .. } => text.capacity(),
            _ => 0,
        }
    }
}

/// Why the engine gave up on a request, by class (each maps to one HTTP status / C status).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// It waited in the queue longer than allowed: the server is overloaded.
    Overloaded,
    /// Its deadline passed before it could start.
    Timeout,
    /// It can never fit the KV memory budget.
    TooLarge,
    /// Its constraint (regex, grammar, schema) could not be followed: a client error.
    Constraint,
    /// The model run or text processing failed.
    Internal,
    /// The engine is stopping (shutdown) and will not run it.
    Unavailable,
}

/// Why the engine ended a request, with the whole chain of what went wrong (anyhow's context
/// and sources), kept as it is until someone shows it; one failure of a batch is shared by
/// every request in it, not copied into each as text.
#[derive(Clone, Debug)]
pub struct EngineError {
    pub kind: ErrorKind,
    error: Arc<anyhow::Error>,
}

impl EngineError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self::caused(kind, Arc::new(anyhow::anyhow!(message.into())))
    }

    pub fn caused(kind: ErrorKind, error: Arc<anyhow::Error>) -> Self {
        Self { kind, error }
    }

    /// The chain as one line, outermost first (`a: b: c`): what clients are told.
    pub fn message(&self) -> String {
        format!("{:#}", self.error)
    }

    /// The failure itself, for finding out its type (`downcast_ref`) or walking its chain.
    pub fn cause(&self) -> &anyhow::Error {
        &self.error
    }
}

impl std::fmt::Display for EngineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.error)
    }
}

/// The caller's side of a request. Dropping it cancels the request: the engine frees its
/// sequences at the next step.
pub struct RequestHandle {
    events: Receiver<Event>,
    cancel: Arc<AtomicBool>,
}

impl RequestHandle {
    pub(crate) fn new(events: Receiver<Event>, cancel: Arc<AtomicBool>) -> Self {
        Self { events, cancel }
    }

    /// The next event, waiting for it; `None` once the engine has dropped the request.
    pub fn recv(&self) -> Option<Event> {
        self.events.recv().ok()
    }

    pub fn recv_timeout(&self, timeout: Duration) -> Result<Event, crossbeam_channel::RecvTimeoutError> {
        self.events.recv_timeout(timeout)
    }

    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

impl Drop for RequestHandle {
    fn drop(&mut self) {
        self.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_engine_error_keeps_its_chain_and_its_type_until_shown() {
        let inner = anyhow::Error::new(crate::constraint::Failed("no token allowed".into()));
        let error = Arc::new(inner.context("decode step").context("batch of 3"));
        let (a, b) = (
            EngineError::caused(ErrorKind::Constraint, error.clone()),
            EngineError::caused(ErrorKind::Constraint, error),
        );
        assert!(Arc::ptr_eq(&a.error, &b.error), "one failure shared by the requests of a batch");
        assert!(a.cause().downcast_ref::<crate::constraint::Failed>().is_some());
        assert_eq!(a.cause().chain().count(), 3);
        assert_eq!(
            a.message(),
            "batch of 3: decode step: the request's constraint could not be followed: no token allowed"
        );
        assert_eq!(EngineError::new(ErrorKind::Timeout, "late").message(), "late");
    }
}
