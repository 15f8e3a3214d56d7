//! Decides how one file's ids are looked up from another: the ids a file defined, and which
//! lookups cannot be checked (the entry or the whole file was unreadable, already reported), so
//! that a problem is reported once. Used by the model, operation and route steps of `build`.

use std::collections::{HashMap, HashSet};

/// Ids defined by one file, for checking references from other files.
pub(crate) struct Known<'a> {
    pub(super) index: HashMap<&'a str, usize>,
    pub(super) unreadable: HashSet<&'a str>,
    /// False when the file itself could not be read: references are then not checked.
    pub(super) complete: bool,
}

pub(crate) enum Lookup {
    Found(usize),
    Unknown,
    /// Defined by an entry that could not be read, or the defining file is unreadable.
    Unchecked,
}

impl<'a> Known<'a> {
    pub(super) fn new(complete: bool, unreadable: &'a [String]) -> Self {
        Self {
            index: HashMap::new(),
            unreadable: unreadable.iter().map(String::as_str).collect(),
            complete,
        }
    }

    pub fn lookup(&self, id: &str) -> Lookup {
        match self.index.get(id) {
            Some(&i) => Lookup::Found(i),
            None if !self.complete || self.unreadable.contains(id) => Lookup::Unchecked,
            None => Lookup::Unknown,
        }
    }
}
