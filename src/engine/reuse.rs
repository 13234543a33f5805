//! What finished requests leave for later ones: the parked row (the last finished request's KV
//! cache, left in the pool as it is) and the prefix cache (snapshots indexed by tokens). Decides
//! where a new request's cache starts from and when a parked row is copied out. Knows nothing of
//! the queue or of running requests: the scheduler says when the engine goes idle.

use std::time::Instant;

use anyhow::Result;

use super::EngineStats;
use super::prefix_cache::{self, PrefixCache};
use crate::model::{KvCache, Layout, Model};

/// The KV cache of the last finished request, left in the pool as it is instead of copied into
/// the prefix cache: a chat's next turn resends the conversation and adds to it, and continues
/// from this row without any copy. (Copying 2000 positions out took ~0.2 s on the 2-core box,
/// most of it faulting in fresh memory, and the next turn waited for it.) It goes to the prefix
/// cache when the next request admitted does not continue it or after a second idle. Only a
/// request that leaves the engine idle is parked: under load rows are copied out at once, so
/// no parked row rides along in batched steps.
pub(super) struct Parked<L: Layout> {
    /// The prompt, then the reply as generated.
    pub tokens: Vec<u32>,
    /// How many of `tokens` are the prompt.
    pub prompt_len: usize,
    pub cache: KvCache<L>,
}

/// How many of a parked row's positions a request for `prompt` continues from, when it is that
/// row's next turn: it shares all of the row but the last few tokens (the cut at a chunk
/// boundary, the reply's end as the template writes it), or it carries on the row's
/// conversation (`prefix_cache::carries_on`) with the reply come back otherwise; the part it
/// does not share is then dropped rather than copied into the prefix cache.
pub(super) fn resumes(row: &[u32], row_prompt_len: usize, prompt: &[u32], chunk: usize) -> Option<usize> {
    let len = prefix_cache::reusable(row, prompt, chunk);
    let next_turn = row.len() - len <= 2 * chunk || prefix_cache::carries_on(row, row_prompt_len, prompt);
    (len > 0 && next_turn).then_some(len)
}

pub(super) struct Reuse<L: Layout> {
    prefix: PrefixCache,
    parked: Option<Parked<L>>,
}

impl<L: Layout> Reuse<L> {
    pub fn new(prefix_cache_bytes: usize) -> Self {
        Self { prefix: PrefixCache::new(prefix_cache_bytes), parked: None }
    }

    pub fn is_parked(&self) -> bool {
        self.parked.is_some()
    }

    /// Bytes of the prefix cache's snapshots (the parked row is in the KV pool).
    pub fn prefix_bytes(&self) -> usize {
        self.prefix.bytes()
    }

    /// Copies the parked row, if any, into the prefix cache, freeing its place in the pool.
    pub fn unpark(&mut self, model: &Model<L>) {
        if let Some(parked) = self.parked.take() {
            stash(model, &mut self.prefix, parked);
        }
    }

    /// Gives back what an idle engine need not hold: the parked row and the prefix cache's slack.
    pub fn release_idle(&mut self, model: &Model<L>) {
        self.unpark(model);
        self.prefix.shrink_for_idle();
    }

    /// A cache for `prompt`: the parked one when the prompt continues it, else one restored
    /// from the longest cached prefix, else an empty one; and the positions it already holds.
    pub fn cache_for(
        &mut self,
        model: &mut Model<L>,
        prompt: &[u32],
        chunk: usize,
        stats: &EngineStats,
    ) -> Result<(KvCache<L>, usize)> {
        if let Some(mut parked) = self.parked.take() {
            if let Some(len) = resumes(&parked.tokens, parked.prompt_len, prompt, chunk) {
                model.truncate(&mut parked.cache, len)?;
                stats.count_prefix_hit(len);
                return Ok((parked.cache, len));
            }
            // Otherwise into the prefix cache, where this request may still find part of it;
            // left parked, the row would ride along in every batched step.
            stash(model, &mut self.prefix, parked);
        }
        if let Some((snapshot, len)) = self.prefix.lookup(prompt, chunk) {
            let started = Instant::now();
            match model.restore(snapshot, len) {
                Ok(cache) => {
                    log::debug!(
                        "prefix cache: restored {len} positions in {:.1} ms",
                        started.elapsed().as_secs_f64() * 1e3
                    );
                    stats.count_prefix_hit(len);
                    return Ok((cache, len));
                }
                Err(e) => log::warn!("prefix cache restore failed, computing the prompt: {e:#}"),
            }
        }
        Ok((model.new_cache()?, 0))
    }

    /// Keeps finished requests' caches: the last one stays parked when the engine goes idle with
    /// it (a chat's turn done, its next one on the way; and only where the model can run it
    /// again as it is), every other one, and an older parked row, goes to the prefix cache.
    pub fn keep(&mut self, model: &Model<L>, mut finished: Vec<Parked<L>>, idle: bool) {
        let keep = (idle && model.can_verify()).then(|| finished.pop()).flatten();
        for parked in finished.into_iter().chain(self.parked.take()) {
            stash(model, &mut self.prefix, parked);
        }
        self.parked = keep;
    }
}

/// Copies a parked cache into the prefix cache for later requests that share its tokens, and
/// frees it.
fn stash<L: Layout>(model: &Model<L>, prefix: &mut PrefixCache, parked: Parked<L>) {
    let started = Instant::now();
    match model.snapshot(&parked.cache) {
        Ok(snapshot) => {
            log::debug!(
                "prefix cache: kept {} positions in {:.1} ms",
                parked.tokens.len(),
                started.elapsed().as_secs_f64() * 1e3
            );
            prefix.insert(parked.tokens, parked.prompt_len, snapshot)
        }
        Err(e) => log::debug!("not caching this prefix: {e:#}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNK: usize = 16;

    fn tokens(n: usize) -> Vec<u32> {
        (0..n as u32).collect()
    }

    #[test]
    fn a_chats_next_turn_resumes_the_parked_row_in_whole_chunks() {
        // The row held 100 positions; the next turn resends them and adds 40.
        assert_eq!(resumes(&tokens(100), 60, &tokens(140), CHUNK), Some(96));
    }

    #[test]
    fn a_prompt_that_keeps_little_of_the_row_does_not_resume_it() {
        // Sharing 48 of 100 positions, part of the row's 60-token prompt, leaves more than two
        // chunks to drop: a new conversation that shares a system prompt goes through the prefix
        // cache instead, and the row's own conversation can still continue from there.
        let mut prompt = tokens(48);
        prompt.extend([9999; 60]);
        assert_eq!(resumes(&tokens(100), 60, &prompt, CHUNK), None);
    }

    #[test]
    fn a_turn_that_resends_the_prompt_and_another_reply_resumes_the_row() {
        // The row's prompt (60 tokens) comes back whole, its 40-token reply otherwise: the reply
        // re-encoded from text, or regenerated. The row is cut back to the prompt's whole chunks.
        let mut prompt = tokens(60);
        prompt.extend([9999; 60]);
        assert_eq!(resumes(&tokens(100), 60, &prompt, CHUNK), Some(48));
    }

    #[test]
    fn an_unrelated_prompt_does_not_resume_the_row() {
        let prompt: Vec<u32> = (5000..5100).collect();
        assert_eq!(resumes(&tokens(100), 60, &prompt, CHUNK), None);
    }
}
