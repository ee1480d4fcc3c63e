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

/// An image as `inspect` shows it: its size, blocks and layers, and the metadata it costs.
#[derive(Debug, serde::Serialize)]
pub(crate) struct ImageView {
    size: u64,
    block_size: u64,
    blocks: u64,
    top_layer: Option<String>,
    layers: Vec<LayerView>,
    /// Bytes of its layers and map pages.
    metadata_bytes: u64,
}

#[derive(Debug, serde::Serialize)]
struct LayerView {
    id: String,
    mapped_blocks: u64,
    map_pages: u64,
    map_bytes: u64,
}

/// What `inspect` shows of a capsule (`--json`: this document).
#[derive(Debug, serde::Serialize)]
pub(crate) struct InspectView {
    name: String,
    id: String,
    parent: Option<String>,
    created_unix: u64,
    encrypted_with_key: Option<String>,
    manifest_bytes: u64,
    vm: VmView,
    disks: Vec<DiskView>,
    memory: Option<ImageView>,
    devstate: Option<ImageView>,
    boot: Option<BootView>,
    profiles: Vec<ProfileView>,
}

#[derive(Debug, serde::Serialize)]
struct VmView {
    cpus: u32,
    memory_mib: u64,
    hypervisor: Option<String>,
    hints: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, serde::Serialize)]
struct DiskView {
    name: String,
    image: ImageView,
}

#[derive(Debug, serde::Serialize)]
struct BootView {
    kernel: ImageView,
    initrd: Option<ImageView>,
    cmdline: String,
}

#[derive(Debug, serde::Serialize)]
struct ProfileView {
    name: String,
    id: String,
    blocks: usize,
    /// Compressed bytes of the blocks this store holds: what warming them moves.
    stored_bytes: u64,
}

fn image_view(store: &Store, image: &Image) -> Result<ImageView> {
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
        layers.push(LayerView { id: id.to_hex(), mapped_blocks: layer.mapped, map_pages: pages, map_bytes: page_bytes });
    }
    Ok(ImageView {
        size: image.size,
        block_size: image.block_size(),
        blocks: image.block_count(),
        top_layer: image.top.map(|h| h.to_hex()),
        layers,
        metadata_bytes,
    })
}

pub(crate) fn inspect_view(store: &Store, id: &Hash, m: &Manifest) -> Result<InspectView> {
    let opt = |i: Option<Image>| i.map(|i| image_view(store, &i)).transpose();
    let boot = match &m.boot {
        Some(b) => Some(BootView { kernel: image_view(store, &b.kernel)?, initrd: opt(b.initrd)?, cmdline: b.cmdline.clone() }),
        None => None,
    };
    let mut profiles = Vec::new();
    for (name, p) in store.list_profiles(id)? {
        let blocks = store.profile(&p).map(|p| p.blocks).unwrap_or_default();
        let stored_bytes = blocks.iter().filter_map(|h| store.block_stored_size(h).ok()).sum();
        profiles.push(ProfileView { name, id: p.to_hex(), blocks: blocks.len(), stored_bytes });
    }
    Ok(InspectView {
        name: m.name.clone(),
        id: id.to_hex(),
        parent: m.parent.map(|p| p.to_hex()),
        created_unix: m.created_unix,
        encrypted_with_key: m.sealing.as_ref().map(|s| s.key_id.to_string()),
        manifest_bytes: store.object_size(id)?,
        vm: VmView { cpus: m.vm.cpus, memory_mib: m.vm.memory_mib, hypervisor: m.vm.hypervisor.clone(), hints: m.vm.hints.clone() },
        disks: m.disks.iter().map(|d| Ok(DiskView { name: d.name.clone(), image: image_view(store, &d.image)? })).collect::<Result<_>>()?,
        memory: opt(m.memory)?,
        devstate: opt(m.devstate)?,
        boot,
        profiles,
    })
}

pub(crate) fn print_inspect(v: &InspectView) {
    println!("capsule  {}", v.name);
    println!("id       {}", v.id);
    println!("parent   {}", v.parent.as_deref().unwrap_or("-"));
    println!("created  {} (unix)", v.created_unix);
    println!("manifest {} bytes", v.manifest_bytes);
    if let Some(k) = &v.encrypted_with_key {
        println!("key      {k} (encrypted)");
    }
    println!("vm       {} cpu(s), {} MiB RAM, hypervisor {}", v.vm.cpus, v.vm.memory_mib, v.vm.hypervisor.as_deref().unwrap_or("any"));
    let show = |label: &str, img: Option<&ImageView>| {
        let Some(img) = img else { return };
        println!(
            "{label:<16} {:>10}  block {:>7}  {} layer(s), metadata {} bytes",
            human(img.size),
            human(img.block_size),
            img.layers.len(),
            img.metadata_bytes
        );
        for l in &img.layers {
            println!("    layer {}  maps {} blocks", &l.id[..12], l.mapped_blocks);
        }
    };
    for d in &v.disks {
        show(&format!("disk {}", d.name), Some(&d.image));
    }
    show("memory", v.memory.as_ref());
    show("devstate", v.devstate.as_ref());
    if let Some(b) = &v.boot {
        show("kernel", Some(&b.kernel));
        show("initrd", b.initrd.as_ref());
        println!("cmdline  {}", b.cmdline);
    }
    for p in &v.profiles {
        println!("profile  {}: {} blocks", p.name, p.blocks);
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

/// What `verify --repair` set aside, and the blocks a pull or push must now bring.
pub(crate) fn report_set_aside(done: &images::store::repair::SetAside) {
    println!("repair: {} damaged copies moved to {} ({} packs written again)", done.copies, done.dir.display(), done.packs_rewritten);
    for why in &done.unreadable {
        println!("repair: left as it is (could not be read): {why}");
    }
    if done.now_missing.is_empty() {
        println!("repair: every block they held has a sound copy");
        return;
    }
    println!(
        "repair: {} blocks are missing now; a push from a machine that holds them, or a pull from another server, stores them again:",
        done.now_missing.len()
    );
    for h in done.now_missing.iter().take(20) {
        println!("  {h}");
    }
    if done.now_missing.len() > 20 {
        println!("  ... and {} more", done.now_missing.len() - 20);
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

impl Fetched {
    /// Read from the mount at `mnt`; the disks are the ones `capsule.json` (`vm`) lists.
    pub fn read(mnt: &Path, vm: &capsule_images::VmFile) -> Option<Fetched> {
        let stats: capsule_fs::mount::MountStats = serde_json::from_slice(&std::fs::read(mnt.join(".capsule/stats.json")).ok()?).ok()?;
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
