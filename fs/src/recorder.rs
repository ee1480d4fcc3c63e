//! Working-set profiles: the first-touch order of the blocks reads need.

use std::sync::Mutex;

use capsule_images::Hash;

/// First-touch order of the blocks reads need, across all images: a working-set profile.
#[derive(Debug, Default)]
pub struct Recorder {
    seen: Mutex<(std::collections::HashSet<Hash>, Vec<Hash>)>,
}

impl Recorder {
    pub(crate) fn touch(&self, hashes: &[Hash]) {
        let mut g = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        for h in hashes {
            if g.1.len() < capsule_images::manifest::MAX_PROFILE_BLOCKS && g.0.insert(*h) {
                g.1.push(*h);
            }
        }
    }

    /// The blocks recorded so far, first touch first.
    pub fn blocks(&self) -> Vec<Hash> {
        self.seen.lock().map(|g| g.1.clone()).unwrap_or_default()
    }
}
