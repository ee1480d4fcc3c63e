//! What the CLI prints about capsules and transfers: import, inspect, verify and push/pull
//! reports, human-readable sizes, and `export`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use capsule_images::{self as images, Hash, Image, Manifest, Slot, Store};
use serde_json::json;

use crate::args::ExportFormat;
use crate::progress;

pub fn print_transfer(json: bool, verb: &str, name: &str, r: &capsule_net::TransferReport, id: Option<Hash>) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    println!(
        "{verb} {name}{}: {} logical, {} blocks sent/received ({} encoded), {} blocks skipped (the other side had them), {} objects; wire: {} sent, {} received",
        id.map(|i| format!(" ({})", i.short())).unwrap_or_default(),
        human(r.logical_bytes),
        r.blocks_transferred,
        human(r.block_bytes),
        r.blocks_skipped,
        r.objects_transferred,
        human(r.wire_sent),
        human(r.wire_received)
    );
    Ok(())
}

pub fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

pub(crate) fn print_import(name: &str, r: &images::ImportReport) {
    for (what, s) in &r.images {
        println!(
            "{what}: {} in {} blocks: {} zero, {} unchanged from parent, {} mapped ({} new, {} already stored), {} stored",
            human(s.logical_bytes),
            s.blocks,
            s.zero_blocks,
            s.unchanged_blocks,
            s.mapped_blocks,
            s.new_blocks,
            s.deduplicated_blocks,
            human(s.stored_bytes)
        );
    }
    if r.shared_layers > 0 {
        println!("{} layer(s) were already in the store and are shared", r.shared_layers);
    }
    println!("imported {name} as {} (manifest {} bytes)", r.id, r.manifest_bytes);
}

pub(crate) fn image_json(store: &Store, image: &Image) -> Result<serde_json::Value> {
    let reader = images::ImageReader::open(store, *image)?;
    let mut layers = Vec::new();
    let mut metadata_bytes = 0;
    for (id, layer) in reader.chain() {
        let mut pages = 0u64;
        let mut page_bytes = 0u64;
        images::map::walk(
            store,
            &layer.map,
            image.block_count(),
            &mut |p| {
                pages += 1;
                page_bytes += store.object_size(p)?;
                Ok(())
            },
            &mut |_, _| Ok(()),
        )?;
        metadata_bytes += page_bytes + store.object_size(id)?;
        layers.push(json!({"id": id.to_hex(), "mapped_blocks": layer.mapped, "map_pages": pages, "map_bytes": page_bytes}));
    }
    Ok(json!({
        "size": image.size,
        "block_size": image.block_size(),
        "blocks": image.block_count(),
        "top_layer": image.top.map(|h| h.to_hex()),
        "layers": layers,
        "metadata_bytes": metadata_bytes,
    }))
}

pub(crate) fn inspect_json(store: &Store, id: &Hash, m: &Manifest) -> Result<serde_json::Value> {
    let mut disks = Vec::new();
    for d in &m.disks {
        disks.push(json!({"name": d.name, "image": image_json(store, &d.image)?}));
    }
    let opt = |i: Option<Image>| -> Result<serde_json::Value> { Ok(i.map(|i| image_json(store, &i)).transpose()?.unwrap_or(serde_json::Value::Null)) };
    let boot = match &m.boot {
        Some(b) => json!({"kernel": image_json(store, &b.kernel)?, "initrd": opt(b.initrd)?, "cmdline": b.cmdline}),
        None => serde_json::Value::Null,
    };
    Ok(json!({
        "name": m.name,
        "id": id.to_hex(),
        "parent": m.parent.map(|p| p.to_hex()),
        "created_unix": m.created_unix,
        "encrypted_with_key": m.sealing.as_ref().map(|s| s.key_id.to_string()),
        "manifest_bytes": store.object_size(id)?,
        "vm": {"cpus": m.vm.cpus, "memory_mib": m.vm.memory_mib, "hypervisor": m.vm.hypervisor, "hints": m.vm.hints},
        "disks": disks,
        "memory": opt(m.memory)?,
        "devstate": opt(m.devstate)?,
        "boot": boot,
        "profiles": store.list_profiles(id)?.into_iter().map(|(n, p)| {
            let blocks = store.profile(&p).map(|p| p.blocks).unwrap_or_default();
            // Compressed bytes of the blocks this store holds: what warming them moves.
            let stored: u64 = blocks.iter().filter_map(|h| store.block_stored_size(h).ok()).sum();
            json!({"name": n, "id": p.to_hex(), "blocks": blocks.len(), "stored_bytes": stored})
        }).collect::<Vec<_>>(),
    }))
}

pub(crate) fn print_inspect(v: &serde_json::Value) {
    println!("capsule  {}", v["name"].as_str().unwrap_or_default());
    println!("id       {}", v["id"].as_str().unwrap_or_default());
    println!("parent   {}", v["parent"].as_str().unwrap_or("-"));
    println!("created  {} (unix)", v["created_unix"]);
    println!("manifest {} bytes", v["manifest_bytes"]);
    if let Some(k) = v["encrypted_with_key"].as_str() {
        println!("key      {k} (encrypted)");
    }
    let vm = &v["vm"];
    println!("vm       {} cpu(s), {} MiB RAM, hypervisor {}", vm["cpus"], vm["memory_mib"], vm["hypervisor"].as_str().unwrap_or("any"));
    let show = |label: &str, img: &serde_json::Value| {
        if img.is_null() {
            return;
        }
        println!(
            "{label:<16} {:>10}  block {:>7}  {} layer(s), metadata {} bytes",
            human(img["size"].as_u64().unwrap_or(0)),
            human(img["block_size"].as_u64().unwrap_or(0)),
            img["layers"].as_array().map_or(0, Vec::len),
            img["metadata_bytes"]
        );
        for l in img["layers"].as_array().into_iter().flatten() {
            println!("    layer {}  maps {} blocks", &l["id"].as_str().unwrap_or_default()[..12], l["mapped_blocks"]);
        }
    };
    for d in v["disks"].as_array().into_iter().flatten() {
        show(&format!("disk {}", d["name"].as_str().unwrap_or_default()), &d["image"]);
    }
    show("memory", &v["memory"]);
    show("devstate", &v["devstate"]);
    if !v["boot"].is_null() {
        show("kernel", &v["boot"]["kernel"]);
        show("initrd", &v["boot"]["initrd"]);
        println!("cmdline  {}", v["boot"]["cmdline"].as_str().unwrap_or_default());
    }
    for p in v["profiles"].as_array().into_iter().flatten() {
        println!("profile  {}: {} blocks", p["name"].as_str().unwrap_or_default(), p["blocks"]);
    }
}

pub(crate) fn report_verify(what: &str, r: &images::VerifyReport) {
    if r.ok() {
        println!("{what}: ok ({} blocks, {}, {} objects)", r.blocks_checked, human(r.bytes_checked), r.objects_checked);
    } else {
        println!("{what}: {} problem(s)", r.problem_count);
        for p in &r.problems {
            println!("  {p}");
        }
    }
}

/// Writes every image of capsule `m` into `out` (disks raw or as qcow2 chains, the others
/// raw, each under its slot's file name) and a `capsule.json`; returns the files written.
pub fn export(store: &Store, id: &Hash, m: &Manifest, key: Option<&images::Key>, out: &Path, format: ExportFormat) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let progress = progress::Bar::new();
    let mut written = Vec::new();
    for (slot, image) in m.slots() {
        match (&slot, format) {
            (Slot::Disk(name), ExportFormat::Qcow2) => {
                written.extend(images::qcow2::export_chain(store, &image, out, name).with_context(|| slot.to_string())?);
            }
            _ => {
                let path = out.join(slot.file_name());
                images::export::export_raw(store, &image, key, &path, &progress).with_context(|| slot.to_string())?;
                written.push(path);
            }
        }
    }
    let desc = json!({
        "capsule": m.name, "id": id.to_hex(), "cpus": m.vm.cpus, "memory_mib": m.vm.memory_mib,
        "hypervisor": m.vm.hypervisor, "hints": m.vm.hints,
        "disks": m.disks.iter().map(|d| d.name.clone()).collect::<Vec<_>>(),
        "cmdline": m.boot.as_ref().map(|b| b.cmdline.clone()),
    });
    let path = out.join("capsule.json");
    std::fs::write(&path, serde_json::to_string_pretty(&desc)? + "\n").with_context(|| path.display().to_string())?;
    written.push(path);
    Ok(written)
}

/// What a mount fetched, from its `.capsule/stats.json`: the run's summary line and the
/// `fetched` part of `run --json`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Fetched {
    /// Where blocks came from (`local` or a capsule:// URL).
    pub source: String,
    /// Block bytes received from the source (encoded: what the link carried).
    pub wire_bytes: u64,
    /// Blocks received.
    pub blocks: u64,
    /// Bytes of the disks' blocks fetched (decoded), and the disks' size.
    pub disk_bytes: u64,
    /// See `disk_bytes`.
    pub disk_size: u64,
    /// Decoded bytes fetched per file of the mount.
    pub files: std::collections::BTreeMap<String, u64>,
}

/// The part of `stats.json` [`Fetched`] reads.
#[derive(serde::Deserialize)]
struct StatsDoc {
    #[serde(default)]
    source: String,
    #[serde(default)]
    bytes_fetched: u64,
    #[serde(default)]
    blocks_fetched: u64,
    #[serde(default)]
    files: std::collections::BTreeMap<String, FileDoc>,
}

#[derive(serde::Deserialize)]
struct FileDoc {
    #[serde(default)]
    fetched_bytes: u64,
    #[serde(default)]
    blocks: u64,
    #[serde(default)]
    block_size: u64,
}

impl Fetched {
    /// Read from the mount at `mnt`; the disks are the ones `capsule.json` (`vm`) lists.
    pub fn read(mnt: &Path, vm: &capsule_images::VmFile) -> Option<Fetched> {
        let stats: StatsDoc = serde_json::from_slice(&std::fs::read(mnt.join(".capsule/stats.json")).ok()?).ok()?;
        let mut out = Fetched { source: stats.source, wire_bytes: stats.bytes_fetched, blocks: stats.blocks_fetched, ..Default::default() };
        for (name, f) in stats.files {
            if vm.disks.iter().any(|d| d.file == name) {
                out.disk_bytes += f.fetched_bytes;
                out.disk_size += f.blocks.saturating_mul(f.block_size);
            }
            out.files.insert(name, f.fetched_bytes);
        }
        Some(out)
    }

    /// "fetched 3.1 MiB of 128 MiB of disk (vmlinuz 7.9 MiB, ...); 9.0 MiB on the wire (N
    /// blocks) from SOURCE".
    pub fn summary(&self, vm: &capsule_images::VmFile) -> String {
        let other: Vec<String> =
            self.files.iter().filter(|(name, _)| !vm.disks.iter().any(|d| d.file == **name)).map(|(name, b)| format!("{name} {}", human(*b))).collect();
        format!(
            "fetched {} of {} of disk ({}); {} on the wire ({} blocks) from {}",
            human(self.disk_bytes),
            human(self.disk_size),
            other.join(", "),
            human(self.wire_bytes),
            self.blocks,
            self.source
        )
    }
}

/// `value` as pretty JSON, or the line `text` makes.
pub(crate) fn print_json_or(json: bool, value: &impl serde::Serialize, text: impl FnOnce() -> String) -> Result<()> {
    print_json_or_with(json, value, || println!("{}", text()))
}

/// `value` as pretty JSON, or what `print` prints for people.
pub(crate) fn print_json_or_with(json: bool, value: &impl serde::Serialize, print: impl FnOnce()) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print();
    }
    Ok(())
}

/// What `run --dry-run --json` prints: the hypervisor command line, as words and as one line.
#[derive(Debug, serde::Serialize)]
struct DryRun {
    binary: PathBuf,
    args: Vec<String>,
    line: String,
}

pub(crate) fn print_dry_run(json: bool, binary: PathBuf, args: Vec<String>, line: String) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&DryRun { binary, args, line })?);
    } else {
        println!("{line}");
    }
    Ok(())
}
