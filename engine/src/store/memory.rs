//! A backend held in memory, for tests: the whole [`Backend`] contract with nothing on disk.
//!
//! Objects are kept whole in a map behind one mutex, so every operation is atomic; versions
//! are a counter bumped at every write, so a tag never repeats even when contents do. It is
//! the reference a remote store is compared with: the contract suite in this module's
//! tests runs against it and [`LocalDir`](super::LocalDir) alike.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{Backend, ObjectInfo, Version};
use crate::error::{Error, Result};

/// One stored object and the write that made it.
#[derive(Debug)]
struct Stored {
    data: Arc<Vec<u8>>,
    generation: u64,
}

#[derive(Debug, Default)]
struct Objects {
    by_key: BTreeMap<String, Stored>,
    /// Generation of the latest write; never reused.
    last_generation: u64,
}

impl Objects {
    fn next_generation(&mut self) -> u64 {
        self.last_generation = self.last_generation.saturating_add(1);
        self.last_generation
    }

    fn stored(&self, key: &str) -> Result<&Stored> {
        self.by_key.get(key).ok_or_else(|| Error::NotFound {
            object: key.to_string(),
        })
    }

    fn check_version(&self, key: &str, expected: &Version) -> Result<()> {
        if version_of(self.stored(key)?) == *expected {
            Ok(())
        } else {
            Err(Error::VersionMismatch {
                object: key.to_string(),
            })
        }
    }
}

fn version_of(s: &Stored) -> Version {
    Version(s.generation.to_string())
}

/// An in-memory [`Backend`]; clones share the same objects.
#[derive(Clone, Debug, Default)]
pub struct MemoryBackend {
    objects: Arc<Mutex<Objects>>,
}

impl MemoryBackend {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Objects> {
        self.objects.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Backend for MemoryBackend {
    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        let mut objects = self.lock();
        if objects.by_key.contains_key(key) {
            return Err(Error::AlreadyExists {
                object: key.to_string(),
            });
        }
        let generation = objects.next_generation();
        objects.by_key.insert(
            key.to_string(),
            Stored {
                data: Arc::new(data.to_vec()),
                generation,
            },
        );
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        Ok(self.lock().stored(key)?.data.to_vec())
    }

    fn get_range(&self, key: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        let data = Arc::clone(&self.lock().stored(key)?.data);
        let range = usize::try_from(offset)
            .ok()
            .and_then(|start| Some(start..start.checked_add(len)?));
        match range.and_then(|r| data.get(r)) {
            Some(bytes) => Ok(bytes.to_vec()),
            None => Err(Error::corrupt(
                key,
                offset,
                format!("object ends before {len} bytes could be read (truncated?)"),
            )),
        }
    }

    fn size(&self, key: &str) -> Result<u64> {
        Ok(self.lock().stored(key)?.data.len() as u64)
    }

    fn exists(&self, key: &str) -> Result<bool> {
        Ok(self.lock().by_key.contains_key(key))
    }

    fn list_with_sizes(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        Ok(self
            .lock()
            .by_key
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, s)| ObjectInfo {
                key: k.clone(),
                size: s.data.len() as u64,
                modified: None,
            })
            .collect())
    }

    fn remove(&self, key: &str) -> Result<()> {
        self.lock().by_key.remove(key);
        Ok(())
    }

    fn version(&self, key: &str) -> Result<Version> {
        Ok(version_of(self.lock().stored(key)?))
    }

    fn replace(&self, key: &str, data: &[u8], expected: &Version) -> Result<Version> {
        let mut objects = self.lock();
        objects.check_version(key, expected)?;
        let generation = objects.next_generation();
        let stored = Stored {
            data: Arc::new(data.to_vec()),
            generation,
        };
        let version = version_of(&stored);
        objects.by_key.insert(key.to_string(), stored);
        Ok(version)
    }

    fn delete_if(&self, key: &str, expected: &Version) -> Result<()> {
        let mut objects = self.lock();
        objects.check_version(key, expected)?;
        objects.by_key.remove(key);
        Ok(())
    }
}
