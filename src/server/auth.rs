//! API keys: `Authorization: Bearer KEY`, checked against a file of keys in constant time.

use std::path::Path;

use anyhow::{Context, Result};

/// The accepted keys; empty means no key is needed.
#[derive(Default, PartialEq, Eq)]
pub(crate) struct ApiKeys {
    keys: Vec<Vec<u8>>,
}

impl ApiKeys {
    /// Reads one key per line; blank lines and `#` comments are skipped. A file that others
    /// may read is used, with a warning: keys belong to the service alone.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let Some(path) = path else { return Ok(Self::default()) };
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading the API keys file {}", path.display()))?;
        let keys: Vec<Vec<u8>> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| l.as_bytes().to_vec())
            .collect();
        if keys.is_empty() {
            anyhow::bail!("the API keys file {} holds no key", path.display());
        }
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o004 != 0
        {
            log::warn!("the API keys file {} is readable by every user; chmod o-r it", path.display());
        }
        Ok(Self { keys })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether an `Authorization` header value carries an accepted key. Every key is compared
    /// in full, so the time taken says nothing about how much of a guess was right.
    pub fn accepts(&self, authorization: Option<&str>) -> bool {
        let Some(given) = authorization.and_then(|h| h.strip_prefix("Bearer ")).map(str::trim) else {
            return false;
        };
        let mut found = false;
        for key in &self.keys {
            found |= constant_time_eq(key, given.as_bytes());
        }
        found
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff));
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_keys_from_a_file() {
        let path = std::env::temp_dir().join(format!("chatd-keys-{}", std::process::id()));
        std::fs::write(&path, "# fleet keys\nsk-one\n\n  sk-two  \n").unwrap();
        let keys = ApiKeys::load(Some(&path)).unwrap();
        assert_eq!(keys.len(), 2);
        assert!(keys.accepts(Some("Bearer sk-one")) && keys.accepts(Some("Bearer sk-two")));
        for wrong in
            [None, Some("sk-one"), Some("Bearer sk-on"), Some("Bearer sk-one1"), Some("Bearer "), Some("Basic sk-one")]
        {
            assert!(!keys.accepts(wrong), "{wrong:?}");
        }
        std::fs::write(&path, "# none\n").unwrap();
        assert!(ApiKeys::load(Some(&path)).is_err());
        assert!(ApiKeys::load(None).unwrap().is_empty());
    }
}
