//! Verification: every object and block a capsule reaches, or every file in the store.

use std::collections::HashSet;

use serde::Serialize;

use crate::envelope::{self, ObjectKind};
use crate::error::Result;
use crate::hash::Hash;
use crate::store::repair::is_damage;
use crate::store::Store;

/// Most problems listed in one report (the count is still exact).
const MAX_LISTED: usize = 50;

/// What a verification found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    /// Distinct blocks read and checked.
    pub blocks_checked: u64,
    /// Their raw size.
    pub bytes_checked: u64,
    /// Metadata objects checked.
    pub objects_checked: u64,
    /// Number of problems found.
    pub problem_count: u64,
    /// The first problems, each naming capsule, image, block index and hash.
    pub problems: Vec<String>,
    /// Blocks with a copy found damaged (its bytes fail its hash), for
    /// [`Store::set_aside_damaged`]; a check of the store's files fills it.
    #[serde(skip)]
    pub damaged_blocks: Vec<Hash>,
}

impl VerifyReport {
    /// True if nothing was wrong.
    pub fn ok(&self) -> bool {
        self.problem_count == 0
    }

    fn problem(&mut self, p: String) {
        self.problem_count += 1;
        if self.problems.len() < MAX_LISTED {
            self.problems.push(p);
        }
    }
}

/// Checks capsule `id` (named `name` in messages) and its ancestors: every manifest, layer,
/// map page and block is read and checked against its hash.
pub fn verify_capsule(store: &Store, name: &str, id: &Hash) -> VerifyReport {
    let mut report = VerifyReport::default();
    let mut seen_blocks = HashSet::new();
    let mut seen_objects = HashSet::new();
    let mut problems = Vec::new();
    let walked = store.walk_capsule(
        id,
        &mut |h| {
            // Reading an object through the store already verified it.
            seen_objects.insert(*h);
            Ok(())
        },
        &mut |label, index, h| {
            if seen_blocks.insert(*h) {
                match store.get_block(h) {
                    Ok(data) => {
                        report.blocks_checked += 1;
                        report.bytes_checked += data.len() as u64;
                    }
                    Err(e) => problems.push(format!("{label}: block {index} (hash {h}): {e}")),
                }
            }
            Ok(())
        },
    );
    report.objects_checked = seen_objects.len() as u64;
    if let Err(e) = walked {
        problems.push(format!("capsule {name} ({id}): {e}"));
    }
    for p in problems {
        report.problem(p);
    }
    report
}

/// Checks every block (in its file or a pack) and object file in the store against its hash.
pub fn verify_store_files(store: &Store) -> Result<VerifyReport> {
    let mut report = VerifyReport::default();
    for (path, h) in store.list_dir_hashes("blocks")? {
        // The file itself: `get_block` would read a packed copy of the same block first.
        let decoded = std::fs::read(&path).map_err(|e| crate::Error::io(path.display(), e)).and_then(|encoded| crate::block::decode(&h, &encoded));
        match decoded {
            Ok(data) => {
                report.blocks_checked += 1;
                report.bytes_checked += data.len() as u64;
            }
            Err(e) => {
                if is_damage(&e) {
                    report.damaged_blocks.push(h);
                }
                report.problem(format!("{}: {e}", path.display()))
            }
        }
    }
    let (packs, broken) = store.packs.all();
    for (path, why) in broken {
        report.problem(format!("{}: {why}", path.display()));
    }
    for pack in packs {
        for e in &pack.entries {
            match pack.read_decoded(e) {
                Ok(data) => {
                    report.blocks_checked += 1;
                    report.bytes_checked += data.len() as u64;
                }
                Err(err) => {
                    if is_damage(&err) {
                        report.damaged_blocks.push(e.hash);
                    }
                    report.problem(format!("{}: {err}", pack.path().display()))
                }
            }
        }
    }
    for (path, h) in store.list_dir_hashes("objects")? {
        report.objects_checked += 1;
        let ok = std::fs::read(&path).map(|bytes| Hash::of(&bytes) == h && envelope_ok(&bytes));
        match ok {
            Ok(true) => {}
            Ok(false) => report.problem(format!("{}: object does not match its name {h} or has a damaged envelope", path.display())),
            Err(e) => report.problem(format!("{}: {e}", path.display())),
        }
    }
    Ok(report)
}

fn envelope_ok(bytes: &[u8]) -> bool {
    [ObjectKind::Manifest, ObjectKind::Layer, ObjectKind::MapPage, ObjectKind::Profile].iter().any(|k| envelope::open(*k, bytes).is_ok())
}
