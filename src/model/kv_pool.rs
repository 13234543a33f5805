//! The KV memory of the onnxruntime-genai layout: per layer, one key and one value buffer of
//! shape `[rows, kv_heads, capacity, head_dim]`, held as 4-byte words whatever the stored type
//! (`head_words` per head and position: `head_dim` for float32, a quarter of it for int8; see
//! `kv_quant`), since the pool only moves positions and never reads a value. Each sequence leases a row; a batched decode
//! step binds rows `0..n` of every buffer as both the past input and the present output of
//! `GroupQueryAttention`, which writes each new token in place at its row's length. Rows and
//! capacity grow on demand, never beyond the byte budget.

use std::sync::{Arc, Mutex};

use anyhow::{Result, bail};

use super::pages::Pages;

/// The shared bookkeeping a lease needs to give its row back when dropped.
#[derive(Default)]
struct Rows {
    /// Per row: leased, and how many positions hold valid keys and values.
    leased: Vec<bool>,
    len: Vec<usize>,
    /// Per row: whether its memory may hold anything (else it is all zero pages, taking none).
    written: Vec<bool>,
}

impl Rows {
    fn in_use(&self) -> usize {
        self.leased.iter().filter(|&&l| l).count()
    }

    /// Rows up to the highest leased one: those the buffers must keep.
    fn kept(&self) -> usize {
        self.leased.iter().rposition(|&l| l).map_or(0, |r| r + 1)
    }
}

pub struct KvPool {
    rows: Arc<Mutex<Rows>>,
    /// Rows allocated in the buffers.
    allocated: usize,
    capacity: usize,
    /// Mapped memory of their own (see `pages`): freed, it goes back to the system at once.
    buffers: Vec<Pages>,
    kv_heads: usize,
    head_words: usize,
    /// Positions every row holds at least (see `with_min_capacity`).
    min_capacity: usize,
    max_capacity: usize,
    budget_bytes: usize,
    /// Bumped whenever the buffers may have moved (see `generation`).
    generation: u64,
}

/// A row of the pool, held by one sequence's cache; dropping it frees the row.
pub struct RowLease {
    row: usize,
    rows: Arc<Mutex<Rows>>,
}

impl RowLease {
    pub fn row(&self) -> usize {
        self.row
    }
}

impl Drop for RowLease {
    fn drop(&mut self) {
        let mut rows = self.rows.lock().unwrap_or_else(|e| e.into_inner());
        rows.leased[self.row] = false;
        rows.len[self.row] = 0;
    }
}

/// Capacity grows in blocks so a growing sequence re-lays out the pool rarely.
const BLOCK: usize = 256;

impl KvPool {
    pub fn new(layers: usize, kv_heads: usize, head_words: usize, max_capacity: usize, budget_bytes: usize) -> Self {
        Self {
            rows: Arc::default(),
            allocated: 0,
            capacity: 0,
            buffers: (0..2 * layers).map(|_| Pages::default()).collect(),
            kv_heads,
            head_words,
            min_capacity: 0,
            max_capacity,
            budget_bytes,
            generation: 0,
        }
    }

    /// A pool whose rows never hold fewer than `positions` positions (bounded by the context):
    /// ONNX Runtime's windowed attention refuses a cache shorter than its window. Positions never
    /// written take no memory, but they count against the budget.
    pub fn with_min_capacity(self, positions: usize) -> Self {
        Self { min_capacity: positions.min(self.max_capacity), ..self }
    }

    /// The capacity rows get to hold `positions` positions: whole blocks, within the bounds.
    fn capacity_for(&self, positions: usize) -> usize {
        round_up(positions.max(self.min_capacity)).min(self.max_capacity)
    }

    /// Gives back the memory of rows no sequence holds (they read as zero and take none until
    /// leased and written again), so a pool sized for a burst shrinks to what is in use.
    pub fn discard_free_rows(&mut self) {
        let (h, d, cap) = (self.kv_heads, self.head_words, self.capacity);
        let mut rows = self.rows.lock().unwrap_or_else(|e| e.into_inner());
        for row in 0..rows.leased.len().min(self.allocated) {
            if rows.leased[row] || !rows.written[row] {
                continue;
            }
            for buffer in &mut self.buffers {
                buffer.discard(row * h * cap * d..(row + 1) * h * cap * d);
            }
            rows.written[row] = false;
        }
    }

    /// Sets the most bytes the pool may hold (before its first use: chatd sizes it once the
    /// model is loaded).
    pub fn set_budget(&mut self, bytes: usize) {
        self.budget_bytes = bytes;
    }

    pub fn bytes_per_position(&self) -> usize {
        self.buffers.len() * self.kv_heads * self.head_words * std::mem::size_of::<f32>()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Changes whenever the buffers were reallocated: pointers into them from before are stale.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Bytes currently allocated for keys and values.
    pub fn allocated_bytes(&self) -> usize {
        self.allocated * self.capacity * self.bytes_per_position()
    }

    /// Bytes of the allocation that are resident: positions never written take no memory.
    pub fn resident_bytes(&self) -> usize {
        self.buffers.iter().map(Pages::resident_bytes).sum()
    }

    /// Bytes of the rows leased now (the rest of the allocation is free for new sequences).
    pub fn used_bytes(&self) -> usize {
        let leased = self.rows.lock().unwrap_or_else(|e| e.into_inner()).in_use();
        leased * self.capacity * self.bytes_per_position()
    }

    pub fn row_len(&self, row: usize) -> usize {
        self.rows.lock().unwrap_or_else(|e| e.into_inner()).len[row]
    }

    pub fn set_row_len(&self, row: usize, len: usize) {
        self.rows.lock().unwrap_or_else(|e| e.into_inner()).len[row] = len;
    }

    /// Whether `count` more sequences of `positions` tokens could be placed within the budget,
    /// once the free rows above the highest leased one are dropped (`drop_free_top_rows`): rows
    /// left by an earlier burst do not count against a long prompt that comes after it.
    pub fn has_room_for(&self, positions: usize, count: usize) -> bool {
        let (in_use, kept) = {
            let rows = self.rows.lock().unwrap_or_else(|e| e.into_inner());
            (rows.in_use(), rows.kept())
        };
        let rows = kept.max(in_use + count);
        let capacity = self.capacity.max(self.capacity_for(positions));
        rows * capacity * self.bytes_per_position() <= self.budget_bytes
    }

    /// Leases the highest free row, adding a row if all are taken. New sequences start at the
    /// top, away from the generating ones, which `move_down` keeps packed at the bottom, so a
    /// prompt being fed is not carried through the batched decode steps.
    pub fn lease(&mut self) -> Result<RowLease> {
        self.drop_free_top_rows()?;
        let row = {
            let mut rows = self.rows.lock().unwrap_or_else(|e| e.into_inner());
            let row = match rows.leased.iter().rposition(|&l| !l) {
                Some(r) => {
                    rows.leased[r] = true;
                    r
                }
                None => {
                    rows.leased.push(true);
                    rows.len.push(0);
                    rows.written.push(false);
                    rows.leased.len() - 1
                }
            };
            rows.written[row] = true;
            row
        };
        if row >= self.allocated {
            let capacity = self.capacity.max(self.capacity_for(1));
            if let Err(e) = self.resize(row + 1, capacity) {
                self.rows.lock().unwrap_or_else(|e| e.into_inner()).leased[row] = false;
                return Err(e);
            }
        }
        Ok(RowLease { row, rows: self.rows.clone() })
    }

    /// The most positions a row could hold by growing within the budget, with the rows now
    /// allocated.
    pub fn position_limit(&self) -> usize {
        let by_budget = self.budget_bytes / (self.allocated.max(1) * self.bytes_per_position());
        (by_budget / BLOCK * BLOCK).max(self.capacity).min(self.max_capacity)
    }

    /// Frees every buffer when no row is leased, so an idle daemon gives the memory of a burst
    /// back; the next sequence allocates afresh (one row, one block: a few MiB).
    pub fn release_if_idle(&mut self) {
        let mut rows = self.rows.lock().unwrap_or_else(|e| e.into_inner());
        if self.allocated == 0 || rows.leased.iter().any(|&l| l) {
            return;
        }
        rows.leased.clear();
        rows.len.clear();
        rows.written.clear();
        for buffer in &mut self.buffers {
            *buffer = Pages::default();
        }
        self.allocated = 0;
        self.capacity = 0;
        self.generation += 1;
        drop(rows);
        // What a burst's requests freed on the heap (bodies, logits, JSON) goes back too.
        crate::memory::give_back_freed();
    }

    /// Makes every row hold at least `positions` positions.
    pub fn ensure_capacity(&mut self, positions: usize) -> Result<()> {
        if positions <= self.capacity {
            return Ok(());
        }
        if positions > self.max_capacity {
            bail!("{positions} positions exceed the model's context of {}", self.max_capacity);
        }
        // Rows nobody holds above the leased ones would grow too, for nothing.
        self.drop_free_top_rows()?;
        self.resize(self.allocated, self.capacity_for(positions))
    }

    /// Drops the rows above the highest leased one (rows are the buffers' outermost dimension,
    /// so only those can go), so that a burst's rows do not stay counted against the budget.
    fn drop_free_top_rows(&mut self) -> Result<()> {
        let kept = {
            let mut rows = self.rows.lock().unwrap_or_else(|e| e.into_inner());
            let kept = rows.kept();
            if kept >= self.allocated {
                return Ok(());
            }
            rows.leased.truncate(kept);
            rows.len.truncate(kept);
            rows.written.truncate(kept);
            kept
        };
        self.resize(kept, self.capacity)
    }

    fn resize(&mut self, rows: usize, capacity: usize) -> Result<()> {
        let bytes = rows * capacity * self.bytes_per_position();
        if bytes > self.budget_bytes {
            bail!(
                "the KV cache would need {} MiB ({rows} sequences x {capacity} positions), over its budget of {} MiB",
                bytes >> 20,
                self.budget_bytes >> 20
            );
        }
        let (old_rows, old_cap) = (self.allocated, self.capacity);
        let (h, d) = (self.kv_heads, self.head_words);
        // Rows nobody holds are not carried over: their memory is given back instead.
        self.discard_free_rows();
        let written = self.rows.lock().unwrap_or_else(|e| e.into_inner()).written.clone();
        for buffer in &mut self.buffers {
            if capacity <= old_cap {
                // Rows are the outermost dimension: rows are appended or dropped at the end.
                buffer.resize(rows * h * capacity.max(old_cap) * d);
                continue;
            }
            // More positions per row: the buffer grows where it is (no second copy of the pool
            // at any moment), then each row's heads move up to their new places, last first so
            // that nothing is overwritten before it moved, and the room they leave is zeroed.
            buffer.resize(rows * h * capacity * d);
            let kept = old_cap * d;
            // Past the old contents the memory is fresh and zero: not written (nor resident).
            let old_end = old_rows * h * kept;
            for block in (0..old_rows.min(rows) * h).rev() {
                let (from, to) = (block * kept, block * capacity * d);
                let row_written = written.get(block / h).copied().unwrap_or(false);
                if row_written {
                    buffer.copy_within(from..from + kept, to);
                }
                let keep = if row_written { kept } else { 0 };
                let stale = (to + keep)..(to + capacity * d).min(old_end);
                if !stale.is_empty() {
                    buffer.discard(stale);
                }
            }
        }
        if capacity != old_cap || rows != old_rows {
            log::debug!("KV pool: {rows} rows x {capacity} positions ({} MiB)", bytes >> 20);
        }
        self.allocated = rows;
        self.capacity = capacity;
        self.generation += 1;
        Ok(())
    }

    /// Copies the first `len` positions of row `from` into row `to` (a fork for `n > 1`).
    pub fn copy_row(&mut self, from: usize, to: usize, len: usize) {
        let (h, d, cap) = (self.kv_heads, self.head_words, self.capacity);
        for buffer in &mut self.buffers {
            for head in 0..h {
                let src = (from * h + head) * cap * d;
                let dst = (to * h + head) * cap * d;
                buffer.copy_within(src..src + len * d, dst);
            }
        }
    }

    /// Moves `lease` to the lowest free row below it, if any, carrying its first `len`
    /// positions; keeps the rows of generating sequences packed at the front, so a batched
    /// step does not carry idle rows.
    pub fn move_down(&mut self, lease: &mut RowLease, len: usize) {
        let target = {
            let mut rows = self.rows.lock().unwrap_or_else(|e| e.into_inner());
            let Some(target) = rows.leased[..lease.row].iter().position(|&l| !l) else { return };
            rows.leased[target] = true;
            rows.len[target] = len;
            rows.leased[lease.row] = false;
            rows.len[lease.row] = 0;
            target
        };
        self.copy_row(lease.row, target, len);
        lease.row = target;
    }

    /// Copies the first `len` positions of `row` out, as `[kv_heads, len, head_words]` words per buffer.
    pub fn read_row(&self, row: usize, len: usize) -> Vec<Pages> {
        let (h, d, cap) = (self.kv_heads, self.head_words, self.capacity);
        self.buffers
            .iter()
            .map(|buffer| {
                let mut out = Pages::zeroed(h * len * d);
                for head in 0..h {
                    let src = (row * h + head) * cap * d;
                    out[head * len * d..(head + 1) * len * d].copy_from_slice(&buffer[src..src + len * d]);
                }
                out
            })
            .collect()
    }

    /// Writes the first `len` positions of `data` (as `read_row` gives, of `data_len` positions)
    /// into `row`.
    pub fn write_row(&mut self, row: usize, data: &[Pages], data_len: usize, len: usize) {
        let (h, d, cap) = (self.kv_heads, self.head_words, self.capacity);
        for (buffer, src) in self.buffers.iter_mut().zip(data) {
            for head in 0..h {
                let from = head * data_len * d;
                let to = (row * h + head) * cap * d;
                buffer[to..to + len * d].copy_from_slice(&src[from..from + len * d]);
            }
        }
        self.rows.lock().unwrap_or_else(|e| e.into_inner()).len[row] = len;
    }

    /// Pointer to `rows` consecutive rows from `row` of buffer `index` (layer * 2 for keys,
    /// layer * 2 + 1 for values), valid for `rows * kv_heads * capacity * head_words` words.
    /// Panics, in release builds too, when those rows are not all in the buffer.
    pub fn rows_ptr(&mut self, index: usize, row: usize, rows: usize) -> *mut f32 {
        let row_len = self.kv_heads * self.capacity * self.head_words;
        self.buffers[index][row * row_len..(row + rows) * row_len].as_mut_ptr()
    }

    pub fn kv_heads(&self) -> usize {
        self.kv_heads
    }
}

fn round_up(positions: usize) -> usize {
    positions.div_ceil(BLOCK).max(1) * BLOCK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growing_in_place_moves_every_row_and_head_and_zeroes_the_new_room() {
        let (heads, dim) = (3, 4);
        let mut pool = KvPool::new(2, heads, dim, 8192, 1 << 30);
        let leases: Vec<RowLease> = (0..3).map(|_| pool.lease().unwrap()).collect();
        let old_cap = pool.capacity();
        // Each float of each buffer, row and head holds where it came from.
        let tag = |b: usize, r: usize, h: usize, i: usize| (b * 1_000_000 + r * 10_000 + h * 1_000 + i) as f32;
        for (b, buffer) in pool.buffers.iter_mut().enumerate() {
            for r in 0..3 {
                for h in 0..heads {
                    for i in 0..old_cap * dim {
                        buffer[(r * heads + h) * old_cap * dim + i] = tag(b, r, h, i);
                    }
                }
            }
        }
        pool.ensure_capacity(old_cap * 3).unwrap();
        let cap = pool.capacity();
        assert!(cap > old_cap);
        for (b, buffer) in pool.buffers.iter().enumerate() {
            for r in 0..3 {
                for h in 0..heads {
                    let block = &buffer[(r * heads + h) * cap * dim..(r * heads + h + 1) * cap * dim];
                    assert!((0..old_cap * dim).all(|i| block[i] == tag(b, r, h, i)), "buffer {b} row {r} head {h}");
                    assert!(block[old_cap * dim..].iter().all(|&x| x == 0.0), "buffer {b} row {r} head {h}");
                }
            }
        }
        drop(leases);
    }

    #[test]
    fn rows_hold_at_least_the_minimum_capacity_within_the_context() {
        let mut pool = KvPool::new(1, 1, 4, 8192, 1 << 30).with_min_capacity(4096);
        let _row = pool.lease().unwrap();
        assert_eq!(pool.capacity(), 4096);
        pool.ensure_capacity(4097).unwrap();
        assert_eq!(pool.capacity(), 4096 + BLOCK);
        let mut short = KvPool::new(1, 1, 4, 1000, 1 << 30).with_min_capacity(4096);
        let _row = short.lease().unwrap();
        assert_eq!(short.capacity(), 1000);
        // The budget counts the floor: a row of 4,096 positions of 32 bytes does not fit in 16 KiB.
        let tight = KvPool::new(1, 1, 4, 8192, 16 << 10).with_min_capacity(4096);
        assert!(!tight.has_room_for(10, 1));
    }

    #[test]
    fn rows_are_reused_highest_first_and_growth_keeps_contents() {
        let mut pool = KvPool::new(1, 2, 4, 8192, 1 << 30);
        let a = pool.lease().unwrap();
        let b = pool.lease().unwrap();
        assert_eq!((a.row(), b.row()), (0, 1));
        let p = pool.rows_ptr(0, 1, 1);
        // SAFETY: `rows_ptr` checked that row 1 (2 heads x 256 positions x 4 floats) is there.
        unsafe { *p.add(3) = 7.0 };
        pool.ensure_capacity(600).unwrap();
        assert_eq!(pool.capacity(), 768);
        // SAFETY: as above, after growth.
        assert_eq!(unsafe { *pool.rows_ptr(0, 1, 1).add(3) }, 7.0);
        let mut c = pool.lease().unwrap();
        assert_eq!(c.row(), 2);
        drop(a);
        // A generating sequence moves down into the freed row, carrying its positions.
        pool.move_down(&mut c, 0);
        assert_eq!(c.row(), 0);
        assert_eq!(pool.lease().unwrap().row(), 2);
    }

    #[test]
    fn rows_left_by_a_burst_do_not_count_against_a_long_prompt() {
        // 32 bytes per position; the budget holds one row of 1024 positions, or four of 256.
        let mut pool = KvPool::new(1, 1, 4, 8192, 32 * 1024);
        let burst: Vec<RowLease> = (0..4).map(|_| pool.lease().unwrap()).collect();
        assert!(!pool.has_room_for(1000, 1), "four rows are held");
        drop(burst);
        assert!(pool.has_room_for(1000, 1), "the burst is over");
        let long = pool.lease().unwrap();
        assert_eq!(long.row(), 0);
        pool.ensure_capacity(1000).unwrap();
        assert_eq!(pool.allocated_bytes(), 32 * 1024);
    }

    #[test]
    fn the_budget_is_never_exceeded() {
        // 2 buffers x 1 head x 4 dims x 4 bytes = 32 bytes per position; 256 positions per row.
        let mut pool = KvPool::new(1, 1, 4, 8192, 32 * 256 * 2);
        let _a = pool.lease().unwrap();
        let _b = pool.lease().unwrap();
        assert!(pool.lease().is_err());
        assert!(pool.ensure_capacity(300).is_err());
        assert!(!pool.has_room_for(10, 1));
        assert_eq!(pool.position_limit(), 256, "two rows already fill the budget");
    }

    #[test]
    fn an_idle_pool_gives_its_memory_back() {
        let mut pool = KvPool::new(2, 3, 64, 8192, 1 << 30);
        let a = pool.lease().unwrap();
        pool.release_if_idle();
        assert!(pool.allocated_bytes() > 0, "a leased row keeps the pool");
        drop(a);
        pool.release_if_idle();
        assert_eq!(pool.allocated_bytes(), 0);
        assert_eq!(pool.lease().unwrap().row(), 0);
        assert!(pool.allocated_bytes() > 0);
    }
}
