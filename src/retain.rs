//! Retention: `capsule rm` of old generations and `capsule flatten`, which makes a capsule
//! stand alone so that what only removed generations read becomes garbage for `gc`.

use std::collections::HashSet;

use anyhow::{Context, Result};
use capsule_images::flatten::{self, FlattenReport};
use capsule_images::Store;
use serde_json::json;

/// `capsule rm NAME... [--flatten]`: removes the refs (all or none: every name is checked
/// first). Remaining capsules built on a removed one still read its layers, so `gc` frees
/// nothing they reach; `--flatten` flattens the oldest such capsule of each chain (and
/// rebases the ones above it), otherwise they are named with the command that would.
pub fn rm(store: &Store, names: &[String], flatten: bool, json: bool) -> Result<()> {
    let mut removed = HashSet::new();
    for name in names {
        let id = store.read_ref(name)?.with_context(|| format!("no capsule named {name:?} in store {}; nothing was removed", store.root().display()))?;
        removed.insert(id);
    }
    for name in names {
        // Another remover may have been first: the ref is gone either way.
        store.delete_ref(name)?;
    }
    // Capsules a remaining ref still names are not removed: refs_reaching knows them.
    let reaching = match flatten::refs_reaching(store, &removed) {
        Ok(r) => r,
        Err(e) if flatten => return Err(e).context(format!("removed {}, then could not tell which capsules to flatten", names.join(", "))),
        // Only for the note: a damaged ref elsewhere must not fail an rm that is done.
        Err(e) => {
            tracing::warn!("cannot tell which capsules still read through the removed ones: {e}");
            Vec::new()
        }
    };
    let mut flattened = Vec::new();
    if flatten {
        for name in &reaching {
            let r = flatten::flatten_ref(store, name).with_context(|| {
                format!("removed {}, then flattening {name} failed; `capsule flatten {name}` finishes it (nothing is lost either way)", names.join(", "))
            })?;
            flattened.push(r);
        }
    }
    if json {
        let still: &[String] = if flatten { &[] } else { &reaching };
        println!("{}", serde_json::to_string_pretty(&json!({"removed": names, "flattened": flattened, "still_reaching_removed": still}))?);
        return Ok(());
    }
    let s = if names.len() == 1 { "" } else { "s" };
    println!("removed ref{s} {}; run `capsule gc` to free their blocks", names.join(", "));
    for r in &flattened {
        print_flatten(r);
    }
    if !flatten && !reaching.is_empty() {
        println!(
            "note: {} still read{} through the removed capsules, so gc frees nothing they share; `capsule flatten {}` (or `rm --flatten`) makes {} stand alone",
            reaching.join(", "),
            if reaching.len() == 1 { "s" } else { "" },
            reaching.join(" && capsule flatten "),
            if reaching.len() == 1 { "it" } else { "them" }
        );
    }
    Ok(())
}

/// `capsule flatten NAME`.
pub fn flatten(store: &Store, name: &str, json: bool) -> Result<()> {
    let r = flatten::flatten_ref(store, name).with_context(|| format!("flattening {name}"))?;
    crate::report::print_json_or_with(json, &r, || print_flatten(&r))
}

fn print_flatten(r: &FlattenReport) {
    if r.old_id == r.new_id {
        println!("{} ({}) already stands alone: no parent, one layer per image", r.name, r.old_id.short());
        return;
    }
    println!(
        "flattened {}: {} -> {} (same bytes, no parent; {} layers and {} map pages written)",
        r.name,
        r.old_id.short(),
        r.new_id.short(),
        r.layers_written,
        r.pages_written
    );
    if !r.rebased.is_empty() {
        let moved: Vec<String> = r.rebased.iter().map(|m| format!("{} ({} -> {})", m.name, m.old_id.short(), m.new_id.short())).collect();
        println!("moved onto it: {}", moved.join(", "));
    }
    println!("run `capsule gc` to free what only its old ancestors read");
}
