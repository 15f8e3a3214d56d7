//! The live catalog: the last good load of the rules directory behind an `ArcSwap`, so every
//! request takes one consistent snapshot (one catalog version quotes and settles it) and a
//! reload never blocks a request. A reload that fails validation is refused whole and the old
//! catalog keeps serving.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::rules::{self, Catalog, RuleProblem};

pub struct LiveCatalog {
    dir: PathBuf,
    current: ArcSwap<Catalog>,
    next_version: AtomicU64,
}

impl LiveCatalog {
    /// Loads the directory; the first good load is version 1.
    pub fn load(dir: &Path) -> Result<Self, Vec<RuleProblem>> {
        let mut catalog = rules::load_dir(dir)?;
        catalog.version = 1;
        Ok(Self {
            dir: dir.to_path_buf(),
            current: ArcSwap::from_pointee(catalog),
            next_version: AtomicU64::new(2),
        })
    }

    /// The catalog to quote and settle one request with.
    pub fn snapshot(&self) -> Arc<Catalog> {
        self.current.load_full()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Re-reads the directory. On success the new catalog serves from the next request on and
    /// its version is returned; when nothing changed the version stays. On failure nothing
    /// changes.
    pub fn reload(&self) -> Result<u64, Vec<RuleProblem>> {
        let mut catalog = rules::load_dir(&self.dir)?;
        let live = self.current.load();
        if live.fingerprint == catalog.fingerprint {
            return Ok(live.version);
        }
        catalog.version = self.next_version.fetch_add(1, Ordering::SeqCst);
        let version = catalog.version;
        self.current.store(Arc::new(catalog));
        Ok(version)
    }
}
