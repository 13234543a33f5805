//! Reuse of prompt keys and values across requests: a chat app resends the whole conversation
//! every turn, and on-box apps share system prompts. Finished sequences leave a snapshot of
//! their cache here, indexed by the tokens it holds; a new request starts from the longest
//! cached prefix of its prompt and computes only the rest. Entries are evicted least recently
//! used first, within a byte budget. A linear scan is enough at this size (tens of entries).

use crate::model::KvSnapshot;

/// Shorter matches are not worth a restore.
const MIN_REUSE: usize = 8;

struct Entry {
    /// The prompt, then the reply.
    tokens: Vec<u32>,
    prompt_len: usize,
    snapshot: KvSnapshot,
    last_used: u64,
}

pub(super) struct PrefixCache {
    entries: Vec<Entry>,
    budget_bytes: usize,
    bytes: usize,
    clock: u64,
}

impl PrefixCache {
    pub fn new(budget_bytes: usize) -> Self {
        Self { entries: Vec::new(), budget_bytes, bytes: 0, clock: 0 }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The entry with the longest common prefix with `prompt`, and how much of it to reuse: a
    /// multiple of `chunk` (so the rest of the prompt is cut exactly as without the cache, see
    /// the scheduler's `Cut`), leaving at least `SHORTEST_RUN` (two) prompt tokens to run: the
    /// last one's logits start the completion, and a run of one token alone would round
    /// differently.
    pub fn lookup(&mut self, prompt: &[u32], chunk: usize) -> Option<(&KvSnapshot, usize)> {
        let (index, len) = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, reusable(&e.tokens, prompt, chunk)))
            .max_by_key(|&(_, len)| len)?;
        if len == 0 {
            return None;
        }
        self.clock += 1;
        let entry = &mut self.entries[index];
        entry.last_used = self.clock;
        Some((&entry.snapshot, len))
    }

    /// Keeps `snapshot` of the cache holding `tokens`, the first `prompt_len` of them its prompt.
    /// Entries whose conversation it carries on are dropped (an earlier turn of it); the least
    /// recently used go when over budget.
    pub fn insert(&mut self, tokens: Vec<u32>, prompt_len: usize, snapshot: KvSnapshot) {
        debug_assert_eq!(tokens.len(), snapshot.len());
        let size = snapshot.bytes();
        if size > self.budget_bytes || snapshot.len() < MIN_REUSE {
            return;
        }
        let before = self.entries.len();
        self.entries.retain(|e| !carries_on(&e.tokens, e.prompt_len, &tokens));
        if self.entries.len() != before {
            self.bytes = self.entries.iter().map(|e| e.snapshot.bytes()).sum();
        }
        self.evict_to(self.budget_bytes - size);
        self.clock += 1;
        self.bytes += size;
        self.entries.push(Entry { tokens, prompt_len, snapshot, last_used: self.clock });
    }

    /// Drops the least recently used entries until at most `bytes` are held.
    fn evict_to(&mut self, bytes: usize) {
        while self.bytes > bytes {
            let Some(oldest) = self.entries.iter().enumerate().min_by_key(|(_, e)| e.last_used).map(|(i, _)| i) else {
                break;
            };
            let gone = self.entries.swap_remove(oldest);
            self.bytes -= gone.snapshot.bytes();
        }
    }

    /// When chatd goes idle: keeps the most recently used entries within a quarter of the
    /// budget, at most [`IDLE_MAX_BYTES`] (the conversation that may go on), and gives the rest
    /// back.
    pub fn shrink_for_idle(&mut self) {
        self.evict_to((self.budget_bytes / IDLE_SHARE).min(IDLE_MAX_BYTES));
    }
}

/// The share of its budget the prefix cache keeps while chatd is idle: 1 / this.
const IDLE_SHARE: usize = 4;

/// The most an idle chatd keeps in the prefix cache, so that an idle daemon holds its model
/// plus well under 100 MB whatever the budget (about 1,000 positions of SmolLM2 as float32).
const IDLE_MAX_BYTES: usize = 48 << 20;

/// How many positions of a cache holding `tokens` a request for `prompt` may reuse (see
/// `lookup`); 0 when not worth it.
pub(super) fn reusable(tokens: &[u32], prompt: &[u32], chunk: usize) -> usize {
    let len =
        common_prefix(tokens, prompt).min(prompt.len().saturating_sub(super::scheduler::SHORTEST_RUN)) / chunk * chunk;
    if len < MIN_REUSE.max(chunk) { 0 } else { len }
}

/// Whether `tokens` resend the whole prompt of a cache holding `held` (its first `prompt_len`
/// tokens the prompt): the same conversation carried on, or its last turn sent again. Its reply
/// may come back otherwise (regenerated; re-encoded from the text a client resends, when the
/// model wrote tokens the tokenizer would not), and then what the cache holds past the shared
/// part is of no use to anyone.
pub(super) fn carries_on(held: &[u32], prompt_len: usize, tokens: &[u32]) -> bool {
    common_prefix(held, tokens) >= prompt_len
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(len: usize) -> KvSnapshot {
        KvSnapshot::synthetic(len, 1)
    }

    #[test]
    fn longest_prefix_wins_in_whole_chunks() {
        let mut cache = PrefixCache::new(1 << 20);
        let a: Vec<u32> = (0..20).collect();
        let b: Vec<u32> = (0..12).chain(100..120).collect();
        cache.insert(a.clone(), 16, snap(20));
        cache.insert(b, 20, snap(32));
        let prompt: Vec<u32> = (0..30).collect();
        assert_eq!(cache.lookup(&prompt, 1).map(|(_, n)| n), Some(20));
        assert_eq!(cache.lookup(&prompt, 8).map(|(_, n)| n), Some(16), "whole chunks only");
        assert_eq!(cache.lookup(&a, 1).map(|(_, n)| n), Some(18), "two prompt tokens are left to run");
        assert!(cache.lookup(&[0, 1, 2, 3, 9], 1).is_none(), "too short to be worth it");
    }

    #[test]
    fn a_later_turn_replaces_the_earlier_one_and_lru_goes_first() {
        let mut cache = PrefixCache::new(100 * 4);
        let turn1: Vec<u32> = (0..30).collect();
        let turn2: Vec<u32> = (0..50).collect();
        cache.insert(turn1, 20, snap(30));
        cache.insert(turn2, 40, snap(50));
        assert_eq!(cache.len(), 1);
        let other: Vec<u32> = (500..540).collect();
        cache.insert(other.clone(), 30, snap(40));
        assert_eq!(cache.bytes(), 90 * 4);
        // Touch the conversation, then overflow: the other entry, least recently used, goes.
        assert!(cache.lookup(&(0..60).collect::<Vec<u32>>(), 1).is_some());
        cache.insert((900..930).collect(), 20, snap(30));
        assert!(cache.lookup(&other, 1).is_none());
        assert!(cache.bytes() <= 100 * 4);
    }

    #[test]
    fn a_turn_that_resends_the_prompt_replaces_the_earlier_one_whatever_came_back_as_its_reply() {
        let mut cache = PrefixCache::new(1 << 20);
        // Turn 1: a 20-token prompt and a 10-token reply; turn 2 resends the prompt, the reply
        // re-encoded otherwise, and a new question.
        cache.insert((0..20).chain(100..110).collect(), 20, snap(30));
        cache.insert((0..20).chain(200..240).collect(), 35, snap(60));
        assert_eq!((cache.len(), cache.bytes()), (1, 60 * 4));
        // Another conversation that shares part of the prompt keeps its own entry, and so does
        // the one it shares with.
        cache.insert((0..12).chain(300..330).collect(), 25, snap(42));
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn going_idle_keeps_the_most_recent_conversation_within_a_quarter() {
        let mut cache = PrefixCache::new(400 * 4);
        cache.insert((0..90).collect(), 60, snap(90));
        cache.insert((500..560).collect(), 40, snap(60));
        cache.insert((900..1000).collect(), 70, snap(100));
        assert!(cache.lookup(&(0..95).collect::<Vec<u32>>(), 1).is_some());
        cache.shrink_for_idle();
        // 100 positions allowed: the conversation just used stays, the others go.
        assert_eq!((cache.len(), cache.bytes()), (1, 90 * 4));
        assert!(cache.lookup(&(0..95).collect::<Vec<u32>>(), 1).is_some());
    }
}
