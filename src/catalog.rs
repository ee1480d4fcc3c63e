//! The commands on the local store's capsules: `import`, `import-snapshot`, `ls`,
//! `inspect`, `verify`, `export` and `gc` (`rm` and `flatten` are in `retain.rs`). Each
//! takes its parsed arguments, calls the crates and prints (a line for people, or with
//! `--json` a typed document).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use capsule_images::{self as images, CapsuleSpec, Store};
use serde::Serialize;

use crate::cli::{DiskFormatArg, ImportArgs};
use crate::exit;
use crate::report::{export, human, inspect_view, print_import, print_inspect, print_json_or, print_json_or_with, report_set_aside, report_verify};

pub fn import(store: &Store, a: ImportArgs) -> Result<()> {
    let key = a.key.as_deref().map(crate::keys::load).transpose()?;
    store.set_compression_level(a.compress_level);
    let mut spec = CapsuleSpec {
        name: a.name.clone(),
        disk_format: a.disk_format.map(|f| match f {
            DiskFormatArg::Raw => images::DiskFormat::Raw,
            DiskFormatArg::Qcow2 => images::DiskFormat::Qcow2,
        }),
        backing_files: a.backing_files,
        memory: a.memory,
        devstate: a.devstate,
        kernel: a.kernel,
        initrd: a.initrd,
        cmdline: a.cmdline,
        parent: a.parent,
        block_size_log2: a.block_size,
        cpus: a.cpus,
        memory_mib: a.ram.map(|b| b >> 20),
        hypervisor: a.hypervisor,
        key,
        ..Default::default()
    };
    for d in &a.disks {
        spec.disks.push(parse_disk_arg(d)?);
    }
    for h in &a.hints {
        let (k, v) = h.split_once('=').with_context(|| format!("--hint {h:?}: expected KEY=VALUE"))?;
        spec.hints.push((k.to_string(), v.to_string()));
    }
    let report = images::import_capsule(store, &spec, &crate::progress::Bar::new()).with_context(|| format!("importing capsule {}", a.name))?;
    print_json_or_with(a.json, &report, || print_import(&a.name, &report))
}

pub fn import_snapshot(store: &Store, name: &str, dir: &Path, block_size: Option<u8>, json: bool) -> Result<()> {
    let report = crate::chv::import_snapshot(store, name, dir, block_size)?;
    print_json_or_with(json, &report, || print_import(name, &report))
}

/// `--disk [NAME=]PATH`: the name given, else the file's stem made a valid disk name.
pub(crate) fn parse_disk_arg(arg: &str) -> Result<(String, PathBuf)> {
    if let Some((name, path)) = arg.split_once('=') {
        if !name.contains('/') {
            return Ok((name.to_string(), PathBuf::from(path)));
        }
    }
    let path = PathBuf::from(arg);
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let name: String = stem.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect();
    let name = name.trim_start_matches('.').to_string();
    if name.is_empty() {
        bail!("--disk {arg:?}: cannot derive a disk name; use NAME=PATH");
    }
    Ok((name, path))
}

/// A row of `capsule ls`: what the table shows, and the rest of it with `--json`.
#[derive(Debug, Serialize)]
struct Listed {
    name: String,
    id: String,
    parent: Option<String>,
    created_unix: Option<u64>,
    /// Bytes of all disks.
    size: Option<u64>,
    disks: Option<Vec<String>>,
    /// The manifest could not be read (the reason).
    damaged: Option<String>,
}

/// `ls` of a store; none yet lists nothing (and makes none).
pub fn ls(store: Option<Store>, json: bool) -> Result<()> {
    let refs = match &store {
        Some(s) => s.list_refs()?,
        None => Vec::new(),
    };
    let rows: Vec<Listed> = refs
        .into_iter()
        .map(|(name, id)| match store.as_ref().map(|s| s.manifest(&id)) {
            Some(Ok(m)) => Listed {
                name,
                id: id.to_hex(),
                parent: m.parent.map(|p| p.to_hex()),
                created_unix: Some(m.created_unix),
                size: Some(m.disks.iter().map(|d| d.image.size).sum()),
                disks: Some(m.disks.iter().map(|d| d.name.clone()).collect()),
                damaged: None,
            },
            Some(Err(e)) => Listed { name, id: id.to_hex(), parent: None, created_unix: None, size: None, disks: None, damaged: Some(e.to_string()) },
            None => unreachable!("refs come from a store"),
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!("{:<24} {:<14} {:<14} {:>10}  DISKS", "NAME", "ID", "PARENT", "SIZE");
    for r in rows {
        let short = &r.id[..12];
        match &r.damaged {
            None => {
                let parent = r.parent.as_deref().map_or("-", |p| &p[..12]);
                println!("{:<24} {short:<14} {parent:<14} {:>10}  {}", r.name, human(r.size.unwrap_or(0)), r.disks.unwrap_or_default().join(","));
            }
            Some(e) => println!("{:<24} {short:<14} DAMAGED: {e}", r.name),
        }
    }
    Ok(())
}

pub fn inspect(store: &Store, name: &str, json: bool) -> Result<()> {
    let id = store.resolve(name)?;
    let m = store.manifest(&id).with_context(|| format!("capsule {name}"))?;
    let view = inspect_view(store, &id, &m)?;
    print_json_or_with(json, &view, || print_inspect(&view))
}

/// One thing `verify` checked: a capsule, or the store's files.
#[derive(Debug, Serialize)]
struct Verified {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    store: Option<PathBuf>,
    report: images::VerifyReport,
    /// What `--repair` set aside.
    #[serde(skip_serializing_if = "Option::is_none")]
    repair: Option<images::store::repair::SetAside>,
}

/// Exits [`exit::DAMAGED`] when anything is damaged.
pub fn verify(store: &Store, name: Option<&str>, repair: bool, json: bool) -> Result<ExitCode> {
    let targets = match name {
        Some(n) => vec![(n.to_string(), store.resolve(n)?)],
        None => store.list_refs()?,
    };
    let mut out = Vec::new();
    for (n, id) in targets {
        let report = images::verify_capsule(store, &n, &id);
        if !json {
            report_verify(&format!("capsule {n} ({})", id.short()), &report);
        }
        out.push(Verified { name: Some(n), id: Some(id.to_hex()), store: None, report, repair: None });
    }
    if name.is_none() {
        let report = images::verify_store_files(store)?;
        if !json {
            report_verify(&format!("store {}", store.root().display()), &report);
        }
        let repair = match repair && !report.damaged_blocks.is_empty() {
            true => {
                let done = store.set_aside_damaged(&report.damaged_blocks).context("setting damaged copies aside")?;
                if !json {
                    report_set_aside(&done);
                }
                Some(done)
            }
            false => None,
        };
        out.push(Verified { name: None, id: None, store: Some(store.root().to_path_buf()), report, repair });
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(if out.iter().all(|v| v.report.ok()) { ExitCode::SUCCESS } else { ExitCode::from(exit::DAMAGED) })
}

#[derive(Debug, Serialize)]
struct Exported {
    name: String,
    id: String,
    files: Vec<PathBuf>,
}

pub fn export_capsule(store: &Store, name: &str, out: &Path, key: Option<&str>, format: crate::args::ExportFormat, json: bool) -> Result<()> {
    let id = store.resolve(name)?;
    let m = store.manifest(&id).with_context(|| format!("capsule {name}"))?;
    let key = crate::keys::for_capsule(key, &m, &id)?;
    let files = export(store, &id, &m, key.as_ref(), out, format).with_context(|| format!("exporting capsule {name} to {}", out.display()))?;
    let report = Exported { name: name.to_string(), id: id.to_hex(), files };
    print_json_or(json, &report, || report.files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join("\n"))
}

/// `gc` of the local store, or with `--backend` of a bucket.
pub fn gc(open: impl FnOnce() -> Result<Store>, backend: &crate::backend::BackendArgs, grace: f64, settle: f64, json: bool) -> Result<()> {
    let s = match &backend.backend {
        Some(_) => {
            let secs = |v: f64, what: &str| Duration::try_from_secs_f64(v).with_context(|| format!("--{what}: not a duration in seconds"));
            let options = capsule_store_s3::gc::GcOptions { grace: secs(grace, "grace")?, settle: secs(settle, "settle")? };
            if options.settle <= capsule_store_s3::gc::FENCE_WINDOW {
                bail!("--settle {settle} s: must be longer than the servers' fence window ({} s) plus one write", capsule_store_s3::gc::FENCE_WINDOW.as_secs());
            }
            backend.open_s3()?.gc(&options)?
        }
        None => open()?.gc()?,
    };
    print_json_or(json, &s, || {
        let packed = if s.blocks_packed > 0 { format!(", packed {} block files", s.blocks_packed) } else { String::new() };
        format!(
            "gc: kept {} blocks, removed {} blocks and {} objects, freed {}{packed}",
            s.blocks_kept,
            s.blocks_removed,
            s.objects_removed,
            human(s.bytes_freed)
        )
    })
}
