//! When the engine looks after itself: tells the watchdog it is alive, gives its working memory
//! back once idle, and reads the KV pool's resident size. Only the timing decisions live here,
//! taking the time as an argument (unit-tested without a model or a clock); the scheduler does
//! the work they call for.

use std::time::{Duration, Instant};

/// How long the engine stays idle before it gives its working memory (the KV pool) back to the
/// system. A chat app sends its next turn as soon as an answer arrives: freeing the pool at once
/// made every turn pay for allocating and faulting it in again (~0.2 s at 2000 positions).
const IDLE_RELEASE_AFTER: Duration = Duration::from_secs(1);

/// How often the KV pool's resident size is read for `/health`: asking the kernel page by page
/// costs ~0.1 ms for a large pool, too much for every round.
const RESIDENT_CHECK_EVERY: Duration = Duration::from_secs(1);

/// How long an idle engine without a watchdog and without memory to give back waits for work
/// before it looks again (it wakes at once when a job arrives).
const IDLE_WAIT: Duration = Duration::from_secs(3600);

pub(super) struct Upkeep {
    last_beat: Option<Instant>,
    /// Whether rounds ran since the working memory was last given back.
    memory_held: bool,
    resident_read: Instant,
}

impl Upkeep {
    pub fn new(now: Instant) -> Self {
        Self { last_beat: None, memory_held: false, resident_read: now }
    }

    /// How long an idle engine waits for a job before its upkeep is due, with a watchdog of
    /// period `heartbeat` if there is one.
    pub fn idle_wait(&self, heartbeat: Option<Duration>) -> Duration {
        let every = heartbeat.unwrap_or(IDLE_WAIT);
        if self.memory_held { every.min(IDLE_RELEASE_AFTER) } else { every }
    }

    /// Whether a watchdog of period `every` is due a beat at `now`: at most once per half its
    /// period, so that a late round still lands inside it. A true answer counts as the beat.
    pub fn beat_due(&mut self, every: Duration, now: Instant) -> bool {
        let due = self.last_beat.is_none_or(|t| now - t >= every / 2);
        if due {
            self.last_beat = Some(now);
        }
        due
    }

    /// A round ran: the working memory is in use again.
    pub fn round_ran(&mut self) {
        self.memory_held = true;
    }

    /// Whether an idle engine has memory to give back.
    pub fn release_due(&self) -> bool {
        self.memory_held
    }

    /// The working memory was given back.
    pub fn released(&mut self) {
        self.memory_held = false;
    }

    /// Whether the pool's resident size is due a reading at `now`.
    pub fn resident_due(&self, now: Instant) -> bool {
        now - self.resident_read >= RESIDENT_CHECK_EVERY
    }

    /// The pool's resident size was read at `now`.
    pub fn resident_was_read(&mut self, now: Instant) {
        self.resident_read = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn an_idle_engine_holding_memory_wakes_to_give_it_back() {
        let mut upkeep = Upkeep::new(Instant::now());
        assert_eq!(upkeep.idle_wait(None), IDLE_WAIT);
        assert_eq!(upkeep.idle_wait(Some(ms(30_000))), ms(30_000));
        upkeep.round_ran();
        assert!(upkeep.release_due());
        assert_eq!(upkeep.idle_wait(None), IDLE_RELEASE_AFTER);
        // A watchdog shorter than the release delay still wakes the engine in time for it.
        assert_eq!(upkeep.idle_wait(Some(ms(400))), ms(400));
        upkeep.released();
        assert!(!upkeep.release_due());
        assert_eq!(upkeep.idle_wait(None), IDLE_WAIT);
    }

    #[test]
    fn the_watchdog_is_told_at_most_once_per_half_period() {
        let start = Instant::now();
        let every = ms(1000);
        let mut upkeep = Upkeep::new(start);
        assert!(upkeep.beat_due(every, start), "the first round beats");
        assert!(!upkeep.beat_due(every, start + ms(499)));
        assert!(upkeep.beat_due(every, start + ms(500)));
        assert!(!upkeep.beat_due(every, start + ms(999)));
        assert!(upkeep.beat_due(every, start + ms(1000)));
    }

    #[test]
    fn the_resident_size_is_read_once_per_period() {
        let start = Instant::now();
        let mut upkeep = Upkeep::new(start);
        assert!(!upkeep.resident_due(start + RESIDENT_CHECK_EVERY - ms(1)));
        assert!(upkeep.resident_due(start + RESIDENT_CHECK_EVERY));
        upkeep.resident_was_read(start + RESIDENT_CHECK_EVERY);
        assert!(!upkeep.resident_due(start + RESIDENT_CHECK_EVERY + ms(1)));
    }
}
