//! Generators of valid encodings made by the real encoders (the targets' seeds), and the
//! containers whose checksums the harness fixes around mutated payloads (wrapped mode).

use std::collections::BTreeMap;

use capsule_images::envelope::{self, ObjectKind};
use capsule_images::{Hash, Image, Manifest};

pub(crate) fn seed_pair(encoded: Vec<u8>, payload: Vec<u8>) -> [Vec<u8>; 2] {
    let mut raw = vec![0u8];
    raw.extend(encoded);
    let mut wrapped = vec![1u8];
    wrapped.extend(payload);
    [raw, wrapped]
}

/// Splits an input into its mode (0 raw, 1 wrapped) and body.
pub(crate) fn mode(input: &[u8]) -> (bool, &[u8]) {
    match input.split_first() {
        Some((m, rest)) => (m & 1 == 1, rest),
        None => (false, input),
    }
}

pub(crate) fn h(n: u8) -> Hash {
    Hash(*blake3::hash(&[n]).as_bytes())
}

/// An envelope of `kind` around arbitrary payload bytes, with a valid checksum.
pub(crate) fn envelope_around(kind: ObjectKind, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 20);
    out.extend_from_slice(envelope::MAGIC);
    out.extend_from_slice(&envelope::VERSION.to_le_bytes());
    out.push(kind as u8);
    out.push(0);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    let sum = blake3::hash(&out);
    out.extend_from_slice(&sum.as_bytes()[..8]);
    out
}

pub(crate) fn envelope_seeds<T: serde::Serialize>(kind: ObjectKind, values: &[T]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for v in values {
        let Ok(encoded) = envelope::encode(kind, v) else { continue };
        let payload = postcard::to_stdvec(v).unwrap_or_default();
        out.extend(seed_pair(encoded, payload));
    }
    out
}

/// Raw mode: the envelope as given; wrapped: the body as its payload, checksum fixed.
pub(crate) fn envelope_input(kind: ObjectKind, input: &[u8]) -> Vec<u8> {
    let (wrapped, body) = mode(input);
    if wrapped {
        envelope_around(kind, body)
    } else {
        body.to_vec()
    }
}

pub(crate) fn image(size: u64, bs: u8, top: Option<u8>) -> Image {
    Image { size, block_size_log2: bs, top: top.map(h) }
}

pub(crate) fn sample_manifests() -> Vec<Manifest> {
    let mut hints = BTreeMap::new();
    hints.insert("qemu.machine".to_string(), "pc-i440fx-7.2".to_string());
    hints.insert("qemu.append".to_string(), "console=ttyS0 root=/dev/vda".to_string());
    let vm = capsule_images::VmDescription { cpus: 2, memory_mib: 256, hypervisor: Some("qemu".into()), hints };
    vec![
        Manifest {
            name: "team/guest".into(),
            parent: Some(h(1)),
            created_unix: 1_700_000_000,
            disks: vec![capsule_images::Disk { name: "root".into(), image: image(128 << 20, 16, Some(2)) }],
            memory: Some(image(256 << 20, 12, Some(3))),
            devstate: Some(image(70_000, 16, Some(4))),
            boot: Some(capsule_images::BootFiles {
                kernel: image(9 << 20, 16, Some(5)),
                initrd: Some(image(3 << 20, 16, Some(6))),
                cmdline: "console=ttyS0".into(),
            }),
            vm,
            sealing: None,
        },
        Manifest {
            name: "a".into(),
            parent: None,
            created_unix: 0,
            disks: vec![capsule_images::Disk { name: "d".into(), image: image(4096, 12, None) }],
            memory: None,
            devstate: None,
            boot: None,
            vm: capsule_images::VmDescription::default(),
            sealing: Some(capsule_images::Key::from_secrets([9; 32], None).sealing()),
        },
    ]
}

pub(crate) fn frame_around(t: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 16);
    out.extend_from_slice(capsule_net::frame::MAGIC);
    out.push(capsule_net::frame::VERSION);
    out.push(t);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    let sum = blake3::hash(&out);
    out.extend_from_slice(&sum.as_bytes()[..4]);
    out
}

pub(crate) fn sample_requests() -> Vec<capsule_net::proto::RequestHeader> {
    use capsule_net::proto::{Request, RequestHeader};
    let reqs = vec![
        Request::ListRefs { prefix: "team/".into() },
        Request::GetRef { name: "team/guest".into() },
        Request::GetObjects { ids: vec![h(1), h(2)] },
        Request::GetBlocks { hashes: vec![h(3); 5] },
        Request::MissingBlocks { hashes: vec![h(4)] },
        Request::MissingObjects { ids: vec![] },
        Request::PutObjects,
        Request::PutBlocks,
        Request::UpdateRef { name: "team/x".into(), old: Some(h(5)), new: h(6) },
        Request::ListProfiles { capsule: h(7) },
        Request::SetProfile { capsule: h(8), name: "boot".into(), id: h(9) },
    ];
    reqs.into_iter()
        .enumerate()
        .map(|(i, request)| RequestHeader { token: (i % 2 == 0).then(|| "capsule_0123456789abcdef".into()), priority: i as u8 % 3, request })
        .collect()
}

pub(crate) fn sample_responses() -> Vec<capsule_net::proto::Response> {
    use capsule_net::proto::Response;
    vec![
        Response::Refs(vec![("team/a".into(), h(1))]),
        Response::Ref(Some(h(2))),
        Response::Ref(None),
        Response::Profiles(vec![("boot".into(), h(3))]),
        Response::Missing(vec![h(4), h(5)]),
        Response::Stored { new: 7 },
        Response::Error { kind: capsule_net::ErrorKind::NotFound, message: "no such ref".into() },
    ]
}
