//! The one loop that follows a request's events to its end, shared by the HTTP server (plain
//! and streamed answers) and libchat: every event but the last goes to the consumer, and the
//! end is `Done`, an error the API answers (the engine's, or the engine dropping the request
//! without a last event), or the consumer stopping (its client left, its callback said stop).
//!
//! This module must not know sockets or C: waiting and what to do with an event are the
//! caller's.

use super::{ApiError, Frontend};
use crate::engine::{Event, Timings, Usage};

/// How a request ended.
#[derive(Debug)]
pub enum Ended<S> {
    /// The last event: every choice is complete.
    Done { usage: Usage, timings: Timings },
    /// The error to answer with.
    Failed(ApiError),
    /// The consumer stopped following (and so, by dropping the request's handle, cancels it).
    Stopped(S),
}

/// Follows a request: `next` waits for its next event (`Ok(None)`: the engine dropped it
/// without a last event; `Err`: the consumer stops waiting), and `on_event` takes each event
/// before the last (`Err`: the consumer stops).
pub fn follow<S>(
    mut next: impl FnMut() -> Result<Option<Event>, S>,
    mut on_event: impl FnMut(Event) -> Result<(), S>,
) -> Ended<S> {
    loop {
        let event = match next() {
            Ok(Some(event)) => event,
            Ok(None) => return Ended::Failed(ApiError::engine_dropped()),
            Err(stop) => return Ended::Stopped(stop),
        };
        match event {
            Event::Done { usage, timings } => return Ended::Done { usage, timings },
            Event::Error(e) => return Ended::Failed(Frontend::engine_error(&e)),
            event => {
                if let Err(stop) = on_event(event) {
                    return Ended::Stopped(stop);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{EngineError, ErrorKind};

    fn text(s: &str) -> Event {
        Event::Text { choice: 0, text: s.into(), logprobs: Vec::new() }
    }

    /// Follows `events` (then the engine dropping the request), collecting the texts; the
    /// consumer stops at a text "stop".
    fn run(events: Vec<Event>) -> (Ended<&'static str>, Vec<String>) {
        let mut events = events.into_iter();
        let mut seen = Vec::new();
        let ended = follow(
            || Ok(events.next()),
            |event| match event {
                Event::Text { text, .. } if text == "stop" => Err("stopped"),
                Event::Text { text, .. } => {
                    seen.push(text);
                    Ok(())
                }
                _ => Ok(()),
            },
        );
        (ended, seen)
    }

    #[test]
    fn a_request_ends_done_failed_dropped_or_stopped() {
        let done = Event::Done { usage: Usage::default(), timings: Timings::default() };
        let (ended, seen) = run(vec![Event::Started, text("a"), text("b"), done, text("never")]);
        assert!(matches!(ended, Ended::Done { .. }) && seen == ["a", "b"], "{ended:?} {seen:?}");
        let error = EngineError::new(ErrorKind::Overloaded, "full");
        let (ended, _) = run(vec![text("a"), Event::Error(error)]);
        assert!(matches!(&ended, Ended::Failed(e) if e.status() == 429), "{ended:?}");
        let (ended, seen) = run(vec![text("a")]);
        assert!(matches!(&ended, Ended::Failed(e) if e.status() == 500) && seen == ["a"], "{ended:?}");
        let (ended, seen) = run(vec![text("a"), text("stop"), text("b")]);
        assert!(matches!(ended, Ended::Stopped("stopped")) && seen == ["a"], "{ended:?}");
        let ended = follow::<&str>(|| Err("gone"), |_| Ok(()));
        assert!(matches!(ended, Ended::Stopped("gone")));
    }
}
