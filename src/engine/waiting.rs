//! Requests waiting for a place, oldest first, and what becomes of them: dropped when their
//! client cancelled, refused when the server stops, their deadline passes or they waited too
//! long, admitted in arrival order while there is room. Knows nothing of the model: whether a
//! request fits is the scheduler's question, asked through [`Admission::decide`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use super::request::{EngineError, ErrorKind, Event};
use super::scheduler::Job;

/// What becomes of a waiting request at a look over the queue.
#[derive(Debug, PartialEq)]
pub(super) enum Verdict {
    Keep,
    /// Its client is gone: no one to tell.
    Drop,
    Refuse(ErrorKind, String),
}

impl Verdict {
    /// The first reason that applies, in this order: the client cancelled, the server is
    /// stopping, the request's own deadline passed, it waited `max_wait`.
    pub fn of(cancelled: bool, stopping: bool, past_deadline: bool, waited: Duration, max_wait: Duration) -> Self {
        if cancelled {
            Verdict::Drop
        } else if stopping {
            Verdict::Refuse(ErrorKind::Unavailable, "the server is shutting down".into())
        } else if past_deadline {
            Verdict::Refuse(ErrorKind::Timeout, "the request's deadline passed while it waited in the queue".into())
        } else if waited >= max_wait {
            let message = format!("the server is busy: the request waited {:.0} s for a place", waited.as_secs_f64());
            Verdict::Refuse(ErrorKind::Overloaded, message)
        } else {
            Verdict::Keep
        }
    }
}

/// What to do with the oldest waiting request.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Admission {
    Start,
    /// Free the parked cache's row and ask again.
    FreeParked,
    /// Wait for running requests to free room; no younger request goes first.
    Wait,
    /// Nothing runs and nothing is parked, so nothing will free room: it can never run.
    Refuse,
}

impl Admission {
    pub fn decide(fits: bool, parked: bool, running: bool) -> Self {
        match (fits, parked, running) {
            (true, _, _) => Admission::Start,
            (false, true, _) => Admission::FreeParked,
            (false, false, true) => Admission::Wait,
            (false, false, false) => Admission::Refuse,
        }
    }
}

/// The queue in front of the running requests. `queued` counts what `Engine::submit` sent and
/// no one has taken out yet (channel and queue together).
pub(super) struct Waiting {
    jobs: VecDeque<Job>,
}

impl Waiting {
    pub fn new() -> Self {
        Self { jobs: VecDeque::new() }
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    pub fn push(&mut self, job: Job) {
        self.jobs.push_back(job);
    }

    /// Takes every job already sent, without blocking.
    pub fn take_sent(&mut self, channel: &Receiver<Job>) {
        while let Ok(job) = channel.try_recv() {
            self.jobs.push_back(job);
        }
    }

    /// Drops or refuses the jobs whose [`Verdict`] says so; `queued` counts them out.
    pub fn expire(&mut self, stopping: bool, max_wait: Duration, queued: &AtomicUsize) {
        let now = Instant::now();
        self.jobs.retain(|job| {
            let cancelled = job.cancel.load(Ordering::Relaxed);
            match Verdict::of(cancelled, stopping, now >= job.deadline, job.queued_at.elapsed(), max_wait) {
                Verdict::Keep => return true,
                Verdict::Drop => {}
                Verdict::Refuse(kind, message) => {
                    let _ = job.events.send(Event::Error(EngineError::new(kind, message)));
                }
            }
            queued.fetch_sub(1, Ordering::SeqCst);
            false
        });
    }

    pub fn oldest(&self) -> Option<&Job> {
        self.jobs.front()
    }

    /// Takes the oldest job out; `queued` counts it out.
    pub fn take_oldest(&mut self, queued: &AtomicUsize) -> Option<Job> {
        let job = self.jobs.pop_front()?;
        queued.fetch_sub(1, Ordering::SeqCst);
        Some(job)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_secs(10);
    const SHORT: Duration = Duration::from_secs(1);

    fn kind(v: Verdict) -> Option<ErrorKind> {
        match v {
            Verdict::Refuse(kind, _) => Some(kind),
            _ => None,
        }
    }

    #[test]
    fn a_cancelled_request_is_dropped_whatever_else_holds() {
        assert_eq!(Verdict::of(true, true, true, MAX, MAX), Verdict::Drop);
    }

    #[test]
    fn stopping_comes_before_the_deadline_and_the_deadline_before_the_wait() {
        assert_eq!(kind(Verdict::of(false, true, true, MAX, MAX)), Some(ErrorKind::Unavailable));
        assert_eq!(kind(Verdict::of(false, false, true, MAX, MAX)), Some(ErrorKind::Timeout));
        assert_eq!(kind(Verdict::of(false, false, false, MAX, MAX)), Some(ErrorKind::Overloaded));
    }

    #[test]
    fn a_request_within_its_limits_keeps_its_place() {
        assert_eq!(Verdict::of(false, false, false, SHORT, MAX), Verdict::Keep);
    }

    #[test]
    fn an_overloaded_refusal_says_how_long_it_waited() {
        let Verdict::Refuse(_, message) = Verdict::of(false, false, false, Duration::from_secs(12), MAX) else {
            panic!("not refused");
        };
        assert!(message.contains("12 s"), "{message}");
    }

    #[test]
    fn admission_frees_the_parked_row_before_waiting_and_refuses_only_an_idle_misfit() {
        assert_eq!(Admission::decide(true, true, true), Admission::Start);
        assert_eq!(Admission::decide(false, true, true), Admission::FreeParked);
        assert_eq!(Admission::decide(false, true, false), Admission::FreeParked);
        assert_eq!(Admission::decide(false, false, true), Admission::Wait);
        assert_eq!(Admission::decide(false, false, false), Admission::Refuse);
    }
}
