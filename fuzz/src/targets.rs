//! The targets: for each decoder of outside input, its seeds and how one input is fed to
//! it (true if the decoder accepted it).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use capsule_images::envelope::{self, ObjectKind};
use capsule_images::map::{self, Entry, MapPage, MapRoot, PageSource};
use capsule_images::{block, Hash, Layer, Manifest, Profile};

use crate::seeds::*;

pub(crate) fn seeds_frame() -> Vec<Vec<u8>> {
    use capsule_net::frame::{encode, Frame};
    let data = vec![7u8; 65536];
    let hash = Hash::of(&data);
    let encoded_block = block::encode(&data).unwrap_or_default();
    let manifest = envelope::encode(ObjectKind::Manifest, &sample_manifests()[0]).unwrap_or_default();
    let req = postcard::to_stdvec(&sample_requests()[3]).unwrap_or_default();
    let resp = postcard::to_stdvec(&sample_responses()[4]).unwrap_or_default();
    let frames = vec![
        Frame::Request(req.clone()),
        Frame::Response(resp.clone()),
        Frame::Block { hash, encoded: encoded_block.clone() },
        Frame::Object { kind: ObjectKind::Manifest, id: Hash::of(&manifest), bytes: manifest.clone() },
        Frame::End,
    ];
    let mut out = Vec::new();
    let mut stream = Vec::new();
    for f in &frames {
        let e = encode(f).unwrap_or_default();
        stream.extend_from_slice(&e);
        out.push([vec![0u8], e].concat());
    }
    out.push([vec![0u8], stream].concat());
    // Wrapped: type byte, then the payload.
    out.push([vec![1u8, 1], req].concat());
    out.push([vec![1u8, 2], resp].concat());
    out.push([vec![1u8, 3], hash.0.to_vec(), encoded_block].concat());
    out.push([vec![1u8, 4, 1], Hash::of(&manifest).0.to_vec(), manifest].concat());
    out
}

pub(crate) fn run_frame(input: &[u8]) -> bool {
    use capsule_net::frame::{decode_control, Decoder, Frame};
    let (wrapped, body) = mode(input);
    let bytes = if wrapped {
        match body.split_first() {
            Some((t, payload)) => frame_around(*t, payload),
            None => return false,
        }
    } else {
        body.to_vec()
    };
    // Fed in chunks whose sizes the input picks, as a network would.
    let mut dec = Decoder::new();
    let mut at = 0;
    let mut step = 1 + bytes.first().copied().unwrap_or(0) as usize % 97;
    let mut frames = 0;
    while at < bytes.len() {
        let end = (at + step).min(bytes.len());
        if dec.push(&bytes[at..end]).is_err() {
            return false;
        }
        at = end;
        step = step * 3 % 1031 + 1;
        let _ = dec.wanted();
        let _ = dec.frame_len();
        loop {
            match dec.next_frame() {
                Ok(Some(f)) => {
                    frames += 1;
                    match f {
                        Frame::Request(p) => {
                            let _ = decode_control::<capsule_net::proto::RequestHeader>(&p);
                        }
                        Frame::Response(p) => {
                            let _ = decode_control::<capsule_net::proto::Response>(&p);
                        }
                        Frame::Block { hash, encoded } => {
                            let _ = block::decode(&hash, &encoded);
                        }
                        Frame::Object { kind, id, bytes } => {
                            if Hash::of(&bytes) == id {
                                let _ = envelope::open(kind, &bytes);
                            }
                        }
                        Frame::End => {}
                    }
                }
                Ok(None) => break,
                Err(_) => return false,
            }
        }
    }
    frames > 0
}

pub(crate) fn seeds_control() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for r in sample_requests() {
        out.push([vec![0u8], postcard::to_stdvec(&r).unwrap_or_default()].concat());
    }
    for r in sample_responses() {
        out.push([vec![1u8], postcard::to_stdvec(&r).unwrap_or_default()].concat());
    }
    out
}

pub(crate) fn run_control(input: &[u8]) -> bool {
    use capsule_net::frame::decode_control;
    use capsule_net::proto::{RequestHeader, Response};
    let (response, body) = mode(input);
    if response {
        decode_control::<Response>(body).is_ok()
    } else {
        match decode_control::<RequestHeader>(body) {
            Ok(r) => {
                let _ = (r.request.batch_len(), r.request.is_write());
                // Names from a client meet the scope check.
                if let capsule_net::proto::Request::GetRef { name } | capsule_net::proto::Request::UpdateRef { name, .. } = &r.request {
                    let _ = capsule_net::auth::covers("team/", name);
                    let _ = capsule_images::manifest::check_name(name);
                }
                true
            }
            Err(_) => false,
        }
    }
}

pub(crate) fn seeds_envelope() -> Vec<Vec<u8>> {
    let mut out = seeds_manifest();
    out.extend(seeds_layer());
    out.extend(seeds_map_page());
    out
}

pub(crate) fn run_envelope(input: &[u8]) -> bool {
    let (_, body) = mode(input);
    let mut any = false;
    for kind in [ObjectKind::Manifest, ObjectKind::Layer, ObjectKind::MapPage, ObjectKind::Profile] {
        any |= envelope::open(kind, body).is_ok();
    }
    let _ = envelope::peek_kind(body);
    let _ = envelope::decode_verified::<Layer>(ObjectKind::Layer, &Hash::of(body), body);
    any
}

pub(crate) fn seeds_manifest() -> Vec<Vec<u8>> {
    // Encoded as the store does: a sealed manifest's header after the rest.
    let mut out = Vec::new();
    for mut m in sample_manifests() {
        if m.sealing.is_some() {
            let _ = m.seal(&capsule_images::Key::from_secrets([9; 32], None));
        }
        let Ok(encoded) = m.encode() else { continue };
        let payload = envelope::open(ObjectKind::Manifest, &encoded).map(<[u8]>::to_vec).unwrap_or_default();
        out.extend(seed_pair(encoded, payload));
    }
    out
}

pub(crate) fn run_manifest(input: &[u8]) -> bool {
    let bytes = envelope_input(ObjectKind::Manifest, input);
    let Ok(m) = Manifest::decode(&bytes) else { return false };
    if m.validate().is_err() {
        return false;
    }
    // What a mount and `run` then do with a manifest from elsewhere.
    for (_, i) in m.images() {
        let _ = (i.block_count(), i.validate());
    }
    let _ = m.memory_or_blank();
    let _ = capsule_vmm_glue::qemu::QemuHints::parse(&m.vm.hints);
    if let Some(t) = m.vm.hints.get(capsule_vmm_glue::cloud_hypervisor::CONFIG_HINT) {
        let cfg = capsule_vmm_glue::cloud_hypervisor::config_for_mount(t, Path::new("/run/capsule/mnt"));
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&cfg) {
            let _ = capsule_vmm_glue::cloud_hypervisor::check_config(&v, Path::new("/run/capsule/mnt"));
        }
    }
    true
}

pub(crate) fn seeds_layer() -> Vec<Vec<u8>> {
    let layers = vec![
        Layer { block_size_log2: 16, parent: Some(h(1)), map: MapRoot { height: 2, root: Some(h(2)) }, mapped: 1000 },
        Layer { block_size_log2: 12, parent: None, map: MapRoot { height: 1, root: None }, mapped: 0 },
    ];
    envelope_seeds(ObjectKind::Layer, &layers)
}

pub(crate) fn run_layer(input: &[u8]) -> bool {
    let bytes = envelope_input(ObjectKind::Layer, input);
    match envelope::decode::<Layer>(ObjectKind::Layer, &bytes) {
        Ok(l) => capsule_images::manifest::check_block_size_log2(l.block_size_log2).is_ok(),
        Err(_) => false,
    }
}

pub(crate) fn seeds_map_page() -> Vec<Vec<u8>> {
    let pages = vec![
        MapPage::Leaf(vec![(0, Entry::Zero), (1, Entry::Data(h(1))), (1023, Entry::Data(h(2)))]),
        MapPage::Node(vec![(0, h(3)), (5, h(4)), (6, h(4))]),
        MapPage::Node((0..1024).map(|i| (i as u16, h(9))).collect()),
    ];
    envelope_seeds(ObjectKind::MapPage, &pages)
}

/// Every id names the same page: the "all slots name one child" attack on a walk.
pub(crate) struct OnePage(Arc<MapPage>);

impl PageSource for OnePage {
    fn page(&self, _id: &Hash) -> capsule_images::Result<Arc<MapPage>> {
        Ok(self.0.clone())
    }
}

pub(crate) fn run_map_page(input: &[u8]) -> bool {
    let bytes = envelope_input(ObjectKind::MapPage, input);
    let Ok(page) = envelope::decode::<MapPage>(ObjectKind::MapPage, &bytes) else { return false };
    if page.validate().is_err() {
        return false;
    }
    // Walks and lookups over a tree made of this page alone, for images of a few sizes:
    // bounded however the page points.
    let src = OnePage(Arc::new(page));
    let tail = input.last().copied().unwrap_or(0) as u64;
    for nblocks in [1u64, 1000 + tail, 1 << 14] {
        for height in [1u8, 2, 3, map::height_for(nblocks), map::MAX_HEIGHT] {
            let root = MapRoot { height, root: Some(h(0)) };
            let mut entries = 0u64;
            let _ = map::walk(&src, &root, nblocks, &mut |_| Ok(()), &mut |_, _| {
                entries += 1;
                Ok(())
            });
            for index in [0, 1, nblocks - 1, nblocks, u64::MAX] {
                let _ = map::lookup(&src, &root, index);
            }
        }
    }
    true
}

pub(crate) fn seeds_profile() -> Vec<Vec<u8>> {
    let profiles = vec![
        Profile { capsule: h(1), name: "boot".into(), blocks: (0..200).map(|i| h(i as u8)).collect() },
        Profile { capsule: h(2), name: "x".into(), blocks: vec![] },
    ];
    envelope_seeds(ObjectKind::Profile, &profiles)
}

pub(crate) fn run_profile(input: &[u8]) -> bool {
    let bytes = envelope_input(ObjectKind::Profile, input);
    match envelope::decode::<Profile>(ObjectKind::Profile, &bytes) {
        Ok(p) => capsule_images::manifest::check_name(&p.name).is_ok() && p.blocks.len() <= capsule_images::manifest::MAX_PROFILE_BLOCKS,
        Err(_) => false,
    }
}

pub(crate) fn seeds_block() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let compressible: Vec<u8> = (0..65536u32).map(|i| (i / 100) as u8).collect();
    let random: Vec<u8> = (0..4096u32).map(|i| blake3::hash(&i.to_le_bytes()).as_bytes()[0]).collect();
    for data in [compressible, random, vec![1, 2, 3]] {
        let enc = block::encode(&data).unwrap_or_default();
        // Raw: hash of the content first, then the encoding; wrapped: the same (the
        // encoding has no checksum beyond its name).
        out.push([vec![0u8], Hash::of(&data).0.to_vec(), enc].concat());
    }
    out
}

pub(crate) fn run_block(input: &[u8]) -> bool {
    let (_, body) = mode(input);
    if body.len() < 32 {
        return false;
    }
    let mut hash = [0u8; 32];
    hash.copy_from_slice(&body[..32]);
    match block::decode(&Hash(hash), &body[32..]) {
        Ok(raw) => raw.len() <= block::MAX_STORED_SIZE,
        Err(_) => false,
    }
}

pub(crate) fn fuzz_key() -> capsule_images::Key {
    capsule_images::Key::from_secrets([3; 32], Some([4; 32]))
}

pub(crate) fn seeds_sealed_block() -> Vec<Vec<u8>> {
    let compressible: Vec<u8> = (0..65536u32).map(|i| (i / 100) as u8).collect();
    let random: Vec<u8> = (0..4096u32).map(|i| blake3::hash(&i.to_le_bytes()).as_bytes()[0]).collect();
    let key = fuzz_key();
    let mut out = Vec::new();
    for data in [compressible, random, vec![1, 2, 3]] {
        let Ok(s) = key.seal(&Hash::of(&data), &data, 3) else { continue };
        let capsule_images::Entry::Sealed { name, masked_plain } = s.entry else { continue };
        // Mode byte, the entry (name, masked plaintext hash), the ciphertext.
        out.push([vec![0u8], name.0.to_vec(), masked_plain.0.to_vec(), s.ciphertext].concat());
    }
    out
}

/// A sealed block as a mount opens it: the map entry and ciphertext from elsewhere.
pub(crate) fn run_sealed_block(input: &[u8]) -> bool {
    let (_, body) = mode(input);
    if body.len() < 64 {
        return false;
    }
    let (mut name, mut masked) = ([0u8; 32], [0u8; 32]);
    name.copy_from_slice(&body[..32]);
    masked.copy_from_slice(&body[32..64]);
    match fuzz_key().open(&Hash(name), &Hash(masked), &body[64..]) {
        Ok(raw) => raw.len() <= block::MAX_BLOCK_SIZE,
        Err(_) => false,
    }
}

pub(crate) fn seeds_store_pack() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for n in [0u8, 1, 5] {
        let blocks: Vec<(Hash, Vec<u8>)> = (0..n).map(|i| (h(i), vec![i; 10 + usize::from(i)])).collect();
        let p = capsule_images::packed::pack_bytes(&blocks);
        out.extend(seed_pair(p.clone(), p));
    }
    out
}

pub(crate) fn run_store_pack(input: &[u8]) -> bool {
    let (wrapped, body) = mode(input);
    let mut bytes = body.to_vec();
    if wrapped {
        capsule_images::packed::seal_pack_footer(&mut bytes);
    }
    capsule_images::packed::check_pack(&bytes).is_ok()
}

pub(crate) fn pins_checksum_fixed(mut bytes: Vec<u8>) -> Vec<u8> {
    if bytes.len() >= 8 {
        let body = bytes.len() - 8;
        let sum = blake3::hash(&bytes[..body]);
        bytes[body..].copy_from_slice(&sum.as_bytes()[..8]);
    }
    bytes
}

pub(crate) fn seeds_pins() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for n in [0usize, 1, 40] {
        let e = capsule_fs::pins::encode(&(0..n).map(|i| h(i as u8)).collect::<Vec<_>>());
        out.extend(seed_pair(e.clone(), e));
    }
    out
}

pub(crate) fn run_pins(input: &[u8]) -> bool {
    let (wrapped, body) = mode(input);
    let bytes = if wrapped { pins_checksum_fixed(body.to_vec()) } else { body.to_vec() };
    capsule_fs::pins::decode(&bytes, "fuzz.pins").is_ok()
}

pub(crate) fn overlay_header_fixed(mut bytes: Vec<u8>) -> Vec<u8> {
    if bytes.len() >= 64 && &bytes[..8] == b"CAPS-COW" {
        let sum = blake3::hash(&bytes[..48]);
        bytes[48..64].copy_from_slice(&sum.as_bytes()[..16]);
    }
    bytes
}

pub(crate) fn seeds_overlay_state() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let Ok(dir) = tempfile::tempdir() else { return out };
    for (size, bs, writes) in [(8 * 4096u64, 4096u64, 3u64), (1 << 20, 65536, 10), (4096, 4096, 0)] {
        let key = format!("k{size}");
        if let Ok(o) = capsule_fs::overlay::Overlay::open(dir.path(), &key, size, bs) {
            for i in 0..writes.min(size / bs) {
                let _ = if i % 3 == 2 { o.zero_block(i) } else { o.write_block(i, &vec![i as u8 + 1; bs as usize]) };
            }
            if writes > 5 {
                let _ = o.sync();
            }
            std::mem::forget(o); // unsynced states stay in the file
        }
        if let Ok(bytes) = std::fs::read(dir.path().join(format!("{key}.state"))) {
            out.extend(seed_pair(bytes.clone(), bytes));
        }
    }
    // The headerless first format.
    out.push(vec![0, 1, 0, 2, 1, 0, 0, 0, 0]);
    out
}

pub(crate) fn run_overlay_state(input: &[u8]) -> bool {
    let (wrapped, body) = mode(input);
    let bytes = if wrapped { overlay_header_fixed(body.to_vec()) } else { body.to_vec() };
    let a = capsule_fs::overlay::parse_state_file(&bytes, None).is_ok();
    let b = capsule_fs::overlay::parse_state_file(&bytes, Some((8 * 4096, 4096))).is_ok();
    let c = capsule_fs::overlay::parse_state_file(&bytes, Some((1 << 20, 65536))).is_ok();
    a || b || c
}

thread_local! {
    // In memory where possible: a million rewrites of a file on a disk filesystem cost a
    // writeback each (ext4 flushes a truncated-and-rewritten file on close).
    static TOKEN_DIR: Option<tempfile::TempDir> = tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()).ok();
}

pub(crate) fn seeds_token_file() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let Ok(dir) = tempfile::tempdir() else { return out };
    for (scope, prefix) in [(capsule_net::auth::Scope::Read, ""), (capsule_net::auth::Scope::Write, "team/"), (capsule_net::auth::Scope::Read, "a/b")] {
        let _ = capsule_net::auth::create_token(dir.path(), scope, prefix);
        if let Ok(bytes) = std::fs::read(capsule_net::auth::tokens_path(dir.path())) {
            out.push([vec![0u8], bytes].concat());
        }
    }
    out
}

thread_local! {
    static TOKEN_INPUTS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

pub(crate) fn run_token_file(input: &[u8]) -> bool {
    let (_, body) = mode(input);
    // The parse the server does, for every input; the whole load from a file (slow: file
    // system calls) for one in 64.
    let n = TOKEN_INPUTS.with(|c| {
        c.set(c.get() + 1);
        c.get()
    });
    if n % 64 != 1 {
        return match serde_json::from_slice::<Vec<capsule_net::auth::TokenRecord>>(body) {
            Ok(records) => {
                for r in &records {
                    let _ = (r.id(), capsule_net::auth::covers(&r.prefix, "team/a"), capsule_net::auth::covers(&r.prefix, &r.hash));
                }
                true
            }
            Err(_) => false,
        };
    }
    TOKEN_DIR.with(|dir| {
        let Some(dir) = dir else { return false };
        let path = capsule_net::auth::tokens_path(dir.path());
        let _ = std::fs::create_dir_all(path.parent().unwrap_or(dir.path()));
        if std::fs::write(&path, body).is_err() {
            return false;
        }
        let Ok(policy) = capsule_net::auth::Policy::load(dir.path(), false) else { return false };
        for req in sample_requests() {
            let _ = policy.authorize(req.token.as_deref(), &req.request);
        }
        let _ = capsule_net::auth::list_tokens(dir.path());
        true
    })
}

pub(crate) fn seeds_qmp() -> Vec<Vec<u8>> {
    let greeting = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}"#;
    let scripts = [
        vec![
            greeting,
            r#"{"return": {}}"#,
            r#"{"return": {"status": "running", "running": true}}"#,
            r#"{"return": [{"capability": "x-ignore-shared", "state": false}]}"#,
            r#"{"return": [{"name": "pc-i440fx-7.2", "alias": "pc"}, {"name": "q35"}]}"#,
        ],
        vec![
            greeting,
            r#"{"return": {}}"#,
            r#"{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}"#,
            r#"{"error": {"class": "GenericError", "desc": "no"}}"#,
        ],
        vec![greeting, r#"{"return": {}}"#, "", r#"{"return": 5}"#, r#"{"return": {}}"#, r#"{"return": [{"alias": "pc"}]}"#],
    ];
    scripts.iter().map(|s| [vec![0u8], s.join("\n").into_bytes(), vec![b'\n']].concat()).collect()
}

pub(crate) fn run_qmp(input: &[u8]) -> bool {
    use std::io::Write;
    let (_, body) = mode(input);
    let Ok((mut ours, theirs)) = std::os::unix::net::UnixStream::pair() else { return false };
    // The whole script is in the socket before the client reads; then end of stream.
    if ours.write_all(body).is_err() || ours.shutdown(std::net::Shutdown::Write).is_err() {
        return false;
    }
    let Ok(mut qmp) = capsule_vmm_glue::qmp::Qmp::over_stream(theirs, "fuzz") else { return false };
    let a = qmp.run(capsule_vmm_glue::qmp::Command::QueryMigrate).is_ok();
    let b = qmp.migration_capabilities().is_ok();
    let c = qmp.resolve_machine("pc").is_ok();
    let d = qmp.balloon_actual().is_ok();
    let e = qmp.guest_available().is_some();
    drop(ours);
    a || b || c || d || e
}

pub(crate) fn qcow2_header(version: u32, backing: Option<&str>, exts: &[(u32, &[u8])]) -> Vec<u8> {
    let mut h = vec![0u8; 4096];
    h[..4].copy_from_slice(b"QFI\xfb");
    h[4..8].copy_from_slice(&version.to_be_bytes());
    h[20..24].copy_from_slice(&16u32.to_be_bytes());
    h[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
    let mut at = if version == 3 { 104 } else { 72 };
    if version == 3 {
        h[100..104].copy_from_slice(&104u32.to_be_bytes());
    }
    for (t, data) in exts {
        h[at..at + 4].copy_from_slice(&t.to_be_bytes());
        h[at + 4..at + 8].copy_from_slice(&(data.len() as u32).to_be_bytes());
        h[at + 8..at + 8 + data.len()].copy_from_slice(data);
        at += 8 + data.len().div_ceil(8) * 8;
    }
    if let Some(b) = backing {
        h[8..16].copy_from_slice(&1024u64.to_be_bytes());
        h[16..20].copy_from_slice(&(b.len() as u32).to_be_bytes());
        h[1024..1024 + b.len()].copy_from_slice(b.as_bytes());
    }
    h
}

pub(crate) fn seeds_qcow2() -> Vec<Vec<u8>> {
    vec![
        [vec![0u8], qcow2_header(3, Some("base.qcow2"), &[(0xe279_2aca, b"qcow2")])].concat(),
        [vec![0u8], qcow2_header(2, Some("/etc/passwd"), &[])].concat(),
        [vec![0u8], qcow2_header(3, None, &[(0x4441_5441, b"/etc/shadow"), (0x6803_f857, &[0; 48])])].concat(),
    ]
}

pub(crate) fn run_qcow2(input: &[u8]) -> bool {
    let (_, body) = mode(input);
    capsule_images::qcow2::parse_header(body).is_ok()
}

pub(crate) fn seeds_hints() -> Vec<Vec<u8>> {
    let texts = [
        "qemu.machine=pc-i440fx-7.2\nqemu.accel=tcg\nqemu.capabilities=x-ignore-shared\nqemu.append=console=ttyS0 quiet",
        r#"chv.config={"disks":[{"path":"@CAPSULE_MOUNT@/root.raw"}],"payload":{"kernel":"@CAPSULE_MOUNT@/vmlinux","cmdline":"root=/dev/vda"},"serial":{"mode":"File","file":"@CAPSULE_MOUNT@/serial"},"rng":{"src":"/dev/urandom"}}"#,
    ];
    texts.iter().map(|t| [vec![0u8], t.as_bytes().to_vec()].concat()).collect()
}

pub(crate) fn run_hints(input: &[u8]) -> bool {
    let (_, body) = mode(input);
    let text = String::from_utf8_lossy(body);
    let mut hints = BTreeMap::new();
    for line in text.lines() {
        if let Some((k, v)) = line.split_once('=') {
            hints.insert(k.to_string(), v.to_string());
        }
    }
    let mut ok = capsule_vmm_glue::qemu::QemuHints::parse(&hints).is_ok();
    if let Some(t) = hints.get(capsule_vmm_glue::cloud_hypervisor::CONFIG_HINT) {
        let mnt = Path::new("/run/capsule/runs/x/mnt");
        let cfg = capsule_vmm_glue::cloud_hypervisor::config_for_mount(t, mnt);
        ok &= serde_json::from_slice::<serde_json::Value>(&cfg).is_ok_and(|v| capsule_vmm_glue::cloud_hypervisor::check_config(&v, mnt).is_ok());
    }
    ok
}
