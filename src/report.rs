//! What the CLI prints about capsules and transfers: import, inspect, verify and push/pull
//! reports, human-readable sizes, and `export`.

use std::path::Path;

use anyhow::{Context, Result};
use capsule_images::{self as images, Hash, Image, Manifest, Store};
use serde_json::json;

use crate::{progress, ExportFormat};

pub(crate) fn print_transfer(json: bool, verb: &str, name: &str, r: &capsule_net::TransferReport, id: Option<Hash>) -> Result<()> {
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

pub(crate) fn human(bytes: u64) -> String {
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

pub(crate) fn export(store: &Store, id: &Hash, m: &Manifest, out: &Path, format: ExportFormat) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let progress = progress::Bar::new();
    for d in &m.disks {
        match format {
            ExportFormat::Raw => {
                let path = out.join(format!("{}.raw", d.name));
                images::export::export_raw(store, &d.image, &path, &progress).with_context(|| format!("disk {}", d.name))?;
                println!("{}", path.display());
            }
            ExportFormat::Qcow2 => {
                let files = images::qcow2::export_chain(store, &d.image, out, &d.name).with_context(|| format!("disk {}", d.name))?;
                for f in files {
                    println!("{}", f.display());
                }
            }
        }
    }
    let mut blobs: Vec<(&str, Image)> = Vec::new();
    if let Some(i) = m.memory {
        blobs.push(("memory.raw", i));
    }
    if let Some(i) = m.devstate {
        blobs.push(("devstate.bin", i));
    }
    if let Some(b) = &m.boot {
        blobs.push(("vmlinuz", b.kernel));
        if let Some(i) = b.initrd {
            blobs.push(("initrd.img", i));
        }
    }
    for (file, image) in blobs {
        let path = out.join(file);
        images::export::export_raw(store, &image, &path, &progress).with_context(|| file.to_string())?;
        println!("{}", path.display());
    }
    let desc = json!({
        "capsule": m.name, "id": id.to_hex(), "cpus": m.vm.cpus, "memory_mib": m.vm.memory_mib,
        "hypervisor": m.vm.hypervisor, "hints": m.vm.hints,
        "disks": m.disks.iter().map(|d| d.name.clone()).collect::<Vec<_>>(),
        "cmdline": m.boot.as_ref().map(|b| b.cmdline.clone()),
    });
    let path = out.join("capsule.json");
    std::fs::write(&path, serde_json::to_string_pretty(&desc)? + "\n").with_context(|| path.display().to_string())?;
    println!("{}", path.display());
    Ok(())
}
