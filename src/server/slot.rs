//! The model as the HTTP handlers see it: loading, ready, asleep after a quiet spell, or being
//! woken. Handlers never load a model: a request that finds it asleep asks the main loop to load
//! it again (`wake`) and waits, like a request that arrives while the first load runs.
//! This module must not know how a model is loaded, nor anything of HTTP.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

/// Where the model is, as `/health` reports it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Phase {
    /// The first load, before anything was served.
    Loading,
    Ready,
    /// Being released after `idle_unload_s` without requests.
    Releasing,
    /// Released; the next request loads it again.
    Sleeping,
    /// Loading again for a request that found it asleep.
    Waking,
}

enum State<T> {
    Loading,
    Ready(Arc<T>),
    Releasing,
    Sleeping,
    Waking,
    /// Waking failed; the requests that waited get this, the next one tries again.
    Failed(String),
    /// The server drains: no model will come.
    Closed(String),
}

struct Inner<T> {
    state: State<T>,
    /// When a request last took or gave back the model.
    last_used: Instant,
    /// How long a request waits for a load before it gets 503 (`max_queue_wait_s`).
    wait: Duration,
}

/// Why a request got no model.
#[derive(Debug, PartialEq)]
pub enum Unavailable {
    /// Still loading after the request's wait.
    Loading,
    /// Loading it again failed.
    Failed(String),
}

/// Holds a `T` (the server's `Ready`: engine and frontend) while it is loaded.
pub(crate) struct ModelSlot<T> {
    inner: Mutex<Inner<T>>,
    changed: Condvar,
    wake: Sender<()>,
    /// Models loaded, the first included.
    pub loads: AtomicUsize,
}

impl<T> ModelSlot<T> {
    /// A slot in the loading state, and the receiver of its wake-up calls.
    pub fn new(wait: Duration) -> (Self, Receiver<()>) {
        let (wake, woken) = crossbeam_channel::bounded(1);
        let inner = Inner { state: State::Loading, last_used: Instant::now(), wait };
        (Self { inner: Mutex::new(inner), changed: Condvar::new(), wake, loads: AtomicUsize::new(0) }, woken)
    }

    fn lock(&self) -> MutexGuard<'_, Inner<T>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The model if it is loaded, without waking it or counting as use (`/health`, `/metrics`).
    pub fn current(&self) -> (Phase, Option<Arc<T>>) {
        match &self.lock().state {
            State::Loading => (Phase::Loading, None),
            State::Ready(ready) => (Phase::Ready, Some(ready.clone())),
            State::Releasing => (Phase::Releasing, None),
            State::Sleeping | State::Failed(_) | State::Closed(_) => (Phase::Sleeping, None),
            State::Waking => (Phase::Waking, None),
        }
    }

    /// The model for a request: at once when loaded, else once it is (woken if asleep), waiting
    /// at most `max_queue_wait_s`.
    pub fn acquire(&self) -> Result<Arc<T>, Unavailable> {
        let mut inner = self.lock();
        let deadline = Instant::now() + inner.wait;
        let mut first = true;
        loop {
            match &inner.state {
                State::Ready(ready) => {
                    let ready = ready.clone();
                    inner.last_used = Instant::now();
                    return Ok(ready);
                }
                State::Failed(why) if !first => return Err(Unavailable::Failed(why.clone())),
                State::Closed(why) => return Err(Unavailable::Failed(why.clone())),
                State::Releasing | State::Sleeping | State::Failed(_) => {
                    inner.state = State::Waking;
                    // Full means a call is already pending.
                    let _ = self.wake.try_send(());
                }
                State::Loading | State::Waking => {}
            }
            first = false;
            let now = Instant::now();
            if now >= deadline {
                return Err(Unavailable::Loading);
            }
            inner = self.changed.wait_timeout(inner, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// A request gave the model back: the quiet spell starts now.
    pub fn release(&self) {
        self.lock().last_used = Instant::now();
    }

    /// Serves `ready` and wakes the requests waiting for it.
    pub fn set_ready(&self, ready: T) {
        let mut inner = self.lock();
        inner.state = State::Ready(Arc::new(ready));
        inner.last_used = Instant::now();
        self.loads.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_all();
    }

    /// Loading it again failed: the requests waiting get `why`.
    pub fn set_failed(&self, why: String) {
        self.lock().state = State::Failed(why);
        self.changed.notify_all();
    }

    /// Starts releasing the model when nothing has used it for `idle` and `busy` (requests
    /// being answered) is 0. Returns the slot's hold on it, for the caller to drop outside the
    /// lock (dropping the engine joins its thread) before it calls `released`.
    pub fn release_if_idle(&self, idle: Duration, busy: &AtomicUsize) -> Option<Arc<T>> {
        let mut inner = self.lock();
        if !matches!(inner.state, State::Ready(_)) || inner.last_used.elapsed() < idle {
            return None;
        }
        // Generation requests count themselves busy before they take the model, and give it
        // back before they stop counting: none can slip in between.
        if busy.load(Ordering::SeqCst) > 0 {
            return None;
        }
        match std::mem::replace(&mut inner.state, State::Releasing) {
            State::Ready(ready) => Some(ready),
            _ => None,
        }
    }

    /// The model's memory is given back: it sleeps, unless a request came meanwhile (then it
    /// is already waking).
    pub fn released(&self) {
        let mut inner = self.lock();
        if matches!(inner.state, State::Releasing) {
            inner.state = State::Sleeping;
        }
    }

    /// The server drains: requests waiting for a load get `why` instead.
    pub fn close(&self, why: &str) {
        let mut inner = self.lock();
        if !matches!(inner.state, State::Ready(_)) {
            inner.state = State::Closed(why.to_owned());
        }
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(wait_ms: u64) -> (Arc<ModelSlot<u32>>, Receiver<()>) {
        let (slot, woken) = ModelSlot::new(Duration::from_millis(wait_ms));
        (Arc::new(slot), woken)
    }

    #[test]
    fn a_request_during_the_first_load_waits_for_it() {
        let (slot, woken) = slot(60_000);
        assert_eq!(slot.current().0, Phase::Loading);
        let waiter = std::thread::spawn({
            let slot = slot.clone();
            move || slot.acquire().map(|r| *r)
        });
        slot.set_ready(7);
        assert_eq!(waiter.join().unwrap(), Ok(7));
        assert!(woken.try_recv().is_err(), "the first load needs no wake-up call");
    }

    #[test]
    fn a_request_waits_no_longer_than_its_bound() {
        let (slot, _woken) = slot(1);
        assert_eq!(slot.acquire().err(), Some(Unavailable::Loading));
    }

    #[test]
    fn only_an_idle_model_sleeps_and_the_next_request_wakes_it() {
        let (slot, woken) = slot(60_000);
        let busy = AtomicUsize::new(0);
        slot.set_ready(1);
        assert!(slot.release_if_idle(Duration::from_secs(3600), &busy).is_none(), "used just now");
        busy.store(1, Ordering::SeqCst);
        assert!(slot.release_if_idle(Duration::ZERO, &busy).is_none(), "a request is being answered");
        busy.store(0, Ordering::SeqCst);
        assert_eq!(slot.release_if_idle(Duration::ZERO, &busy).map(|r| *r), Some(1));
        assert_eq!(slot.current(), (Phase::Releasing, None));
        slot.released();
        assert_eq!(slot.current(), (Phase::Sleeping, None));
        assert!(woken.try_recv().is_err(), "looking does not wake it");

        let waiter = std::thread::spawn({
            let slot = slot.clone();
            move || slot.acquire().map(|r| *r)
        });
        woken.recv_timeout(Duration::from_secs(60)).expect("a wake-up call");
        assert_eq!(slot.current().0, Phase::Waking);
        slot.set_ready(2);
        assert_eq!(waiter.join().unwrap(), Ok(2));
        assert_eq!(slot.loads.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_failed_wake_answers_the_waiting_requests_and_the_next_one_tries_again() {
        let (slot, woken) = slot(60_000);
        slot.set_ready(1);
        slot.release_if_idle(Duration::ZERO, &AtomicUsize::new(0));
        slot.released();
        let waiter = std::thread::spawn({
            let slot = slot.clone();
            move || slot.acquire().map(|r| *r)
        });
        woken.recv_timeout(Duration::from_secs(60)).expect("a wake-up call");
        slot.set_failed("no such file".into());
        assert_eq!(waiter.join().unwrap(), Err(Unavailable::Failed("no such file".into())));
        let (slot2, woken2) = (slot.clone(), woken.clone());
        let retry = std::thread::spawn(move || slot2.acquire().map(|r| *r));
        woken2.recv_timeout(Duration::from_secs(60)).expect("the next request tries again");
        slot.set_ready(3);
        assert_eq!(retry.join().unwrap(), Ok(3));
    }

    #[test]
    fn a_request_while_the_model_is_released_wakes_it_afterwards() {
        let (slot, woken) = slot(60_000);
        slot.set_ready(1);
        let held = slot.release_if_idle(Duration::ZERO, &AtomicUsize::new(0));
        let waiter = std::thread::spawn({
            let slot = slot.clone();
            move || slot.acquire().map(|r| *r)
        });
        woken.recv_timeout(Duration::from_secs(60)).expect("a wake-up call");
        drop(held);
        slot.released();
        assert_eq!(slot.current().0, Phase::Waking, "released, but already called back");
        slot.set_ready(2);
        assert_eq!(waiter.join().unwrap(), Ok(2));
    }

    #[test]
    fn closing_answers_the_requests_waiting_for_a_load() {
        let (slot, _woken) = slot(60_000);
        let waiter = std::thread::spawn({
            let slot = slot.clone();
            move || slot.acquire().map(|r| *r)
        });
        // Closed before the waiter looks, or after: either way it gets the reason.
        slot.close("shutting down");
        assert_eq!(waiter.join().unwrap(), Err(Unavailable::Failed("shutting down".into())));
    }
}
