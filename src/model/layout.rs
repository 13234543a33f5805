//! What an on-disk model layout provides to the engine. A layout is one module implementing
//! [`Layout`] plus one variant of [`super::LoadedModel`]; [`super::Model`] and
//! [`super::KvCache`] are generic over it, so a cache of one layout cannot reach a model of
//! another (the compiler refuses it).

use anyhow::{Result, bail};

use super::kv_pool::KvPool;
use super::pages::Pages;
use super::{DecodeItem, KvCacheDtype, ModelInfo};

pub trait Layout: Send + Sized + 'static {
    /// One sequence's keys and values as this layout keeps them.
    type Kv: Send;

    /// What `/health` and the logs call the layout.
    const NAME: &'static str;

    /// Whether `verify` and `truncate` work: the layout can cut a cache back cheaply.
    const CAN_VERIFY: bool = false;

    /// An empty cache for a new sequence.
    fn new_kv(&mut self) -> Result<Self::Kv>;

    /// A second cache holding the first `len` positions of `kv`.
    fn fork_kv(&mut self, kv: &Self::Kv, len: usize) -> Result<Self::Kv>;

    /// The first `len` positions of `kv` as `[kv_heads, len, head_dim]` per layer input.
    fn read_kv(&self, kv: &Self::Kv, len: usize) -> Result<Vec<Pages>>;

    /// A new cache holding the first `len` of the `data_len` positions `data` holds (as
    /// `read_kv` wrote them).
    fn restore_kv(&mut self, data: &[Pages], data_len: usize, len: usize) -> Result<Self::Kv>;

    /// Runs `tokens` after the `len` positions `kv` holds, appends them to it, and writes the
    /// logits after the last one into `logits`.
    fn forward(&mut self, tokens: &[u32], kv: &mut Self::Kv, len: usize, logits: &mut [f32]) -> Result<()>;

    /// Feeds one token to each item's sequence; the caller counts the new positions. One run
    /// per sequence unless the layout batches them.
    fn decode(&mut self, items: &mut [DecodeItem<'_, Self>]) -> Result<()> {
        for item in items.iter_mut() {
            self.forward(&[item.token], &mut item.cache.inner, item.cache.len, item.logits)?;
        }
        Ok(())
    }

    /// Like `forward`, but returns the logits after every one of `tokens` (`CAN_VERIFY` only).
    fn verify(&mut self, _tokens: &[u32], _kv: &mut Self::Kv, _len: usize) -> Result<&[f32]> {
        bail!("the {} layout cannot verify drafts", Self::NAME)
    }

    /// Forgets every position of `kv` from `len` on (`CAN_VERIFY` only).
    fn truncate(&mut self, _kv: &mut Self::Kv, _len: usize) -> Result<()> {
        bail!("the {} layout cannot cut back a cache", Self::NAME)
    }

    /// The KV pool shared by all sequences, for layouts that keep one.
    fn pool(&self) -> Option<&KvPool> {
        None
    }

    fn pool_mut(&mut self) -> Option<&mut KvPool> {
        None
    }

    /// Bytes a cache of `len` positions holds outside the shared pool.
    fn private_kv_bytes(&self, _info: &ModelInfo, _len: usize) -> usize {
        0
    }

    /// How the caches store keys and values.
    fn kv_cache_dtype(&self) -> KvCacheDtype {
        KvCacheDtype::Float32
    }
}
