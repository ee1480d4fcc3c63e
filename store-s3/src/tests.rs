//! Unit tests on an in-memory object store; the real store (a Garage cluster) is in the
//! root crate's tests/scale.rs.

use std::sync::{Arc, Barrier};

use capsule_images::{CapsuleSpec, NoProgress, Store};
use object_store::memory::InMemory;

use super::*;

fn backend(os: Arc<dyn ObjectStore>) -> S3Backend {
    S3Backend::with_store(os, "team", 8 << 20, "s3://test/team".into()).unwrap()
}

fn net_kind(e: &capsule_net::Error) -> capsule_net::ErrorKind {
    e.kind()
}

#[test]
fn url_parsing() {
    let c = S3Config::parse_url("s3://capsules/site-a/v1/").unwrap();
    assert_eq!((c.bucket.as_str(), c.prefix.as_str()), ("capsules", "site-a/v1"));
    assert_eq!(S3Config::parse_url("s3://capsules").unwrap().prefix, "");
    for bad in ["capsules", "s3://", "s3://Caps", "s3://ok-bucket/../x", "s3://ok-bucket/a//b"] {
        assert_eq!(S3Config::parse_url(bad).unwrap_err().kind(), ErrorKind::InvalidInput, "{bad}");
    }
}

#[test]
fn refs_compare_and_swap() {
    let b = backend(Arc::new(InMemory::new()));
    let refs = refs::Refs::new("team");
    let (x, y, z) = (Hash([1; 32]), Hash([2; 32]), Hash([3; 32]));
    let cas = |old: Option<&Hash>, new: &Hash| b.run(refs.compare_and_swap(b.os.as_ref(), "app/web", old, new));
    cas(None, &x).unwrap();
    assert_eq!(cas(None, &y).unwrap_err().kind(), ErrorKind::Conflict);
    cas(Some(&x), &y).unwrap();
    cas(Some(&y), &z).unwrap();
    assert_eq!(b.read_ref("app/web").unwrap(), Some(z));
    assert_eq!(b.read_ref("app").unwrap(), None);
    assert_eq!(b.list_refs().unwrap(), vec![("app/web".to_string(), z)]);
    // Old generations are pruned: the newest commit and the one below it stay.
    let keys: Vec<String> = b.run(b.os.list(None).map_ok(|m| m.location.to_string()).try_collect()).unwrap();
    assert_eq!(keys.iter().filter(|k| k.contains("/.c")).count(), 2, "{keys:?}");
    assert!(!keys.iter().any(|k| k.contains("/.p")), "proposals left: {keys:?}");
    assert!(b.read_ref("../x").is_err());
}

#[test]
fn racing_writers_one_wins_the_others_are_told() {
    let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let writers = 6;
    let barrier = Arc::new(Barrier::new(writers));
    let threads: Vec<_> = (0..writers)
        .map(|i| {
            let (os, barrier) = (os.clone(), barrier.clone());
            std::thread::spawn(move || {
                let b = backend(os);
                barrier.wait();
                let target = Hash([i as u8 + 1; 32]);
                (target, b.run(refs::Refs::new("team").compare_and_swap(b.os.as_ref(), "app", None, &target)))
            })
        })
        .collect();
    let outcomes: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let winners: Vec<Hash> = outcomes.iter().filter(|(_, r)| r.is_ok()).map(|(h, _)| *h).collect();
    assert_eq!(winners.len(), 1, "{outcomes:?}");
    for (_, r) in &outcomes {
        if let Err(e) = r {
            assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
        }
    }
    assert_eq!(backend(os).read_ref("app").unwrap(), Some(winners[0]));
}

#[test]
fn a_dead_writers_proposal_blocks_until_it_expires() {
    let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let b = backend(os.clone());
    // A proposal for generation 1 from a writer that never came back.
    let stale = Path::from(format!("team/refs/app/.p{:020}/deadbeef", 1));
    b.run(os.put(&stale, PutPayload::from_static(b"00 0\n"))).unwrap();
    let err = b.run(refs::Refs::new("team").compare_and_swap(os.as_ref(), "app", None, &Hash([7; 32]))).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert!(err.to_string().contains("at the same time"), "{err}");
    assert_eq!(b.read_ref("app").unwrap(), None);
}

#[test]
fn blocks_objects_and_ref_completeness() {
    let dir = tempfile::tempdir().unwrap();
    let local = Store::open(dir.path().join("store")).unwrap();
    let disk = dir.path().join("disk.raw");
    let bytes: Vec<u8> = (0..(1u32 << 20)).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(&disk, &bytes).unwrap();
    capsule_images::import_capsule(&local, &CapsuleSpec { name: "app".into(), disks: vec![("root".into(), disk)], ..Default::default() }, &NoProgress).unwrap();
    let id = local.read_ref("app").unwrap().unwrap();
    let (objects, blocks) = local.closure(&id).unwrap();
    assert!(blocks.len() > 2);

    let b = backend(Arc::new(InMemory::new()));
    for o in &objects {
        let bytes = local.read_object(o).unwrap();
        let kind = envelope::peek_kind(&bytes).unwrap();
        assert!(b.put_encoded_object(kind, o, &bytes).unwrap());
        // A damaged object is refused before it is stored.
        let mut bad = bytes.clone();
        bad[bytes.len() / 2] ^= 1;
        assert_eq!(net_kind(&b.put_encoded_object(kind, o, &bad).unwrap_err()), capsule_net::ErrorKind::Corrupt);
    }
    for h in &blocks[1..] {
        b.put_encoded_block(h, &local.read_encoded_block(h).unwrap()).unwrap();
    }
    // One block short: no ref may name the capsule.
    let err = b.update_ref("app", None, &id).unwrap_err();
    assert_eq!(net_kind(&err), capsule_net::ErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains(&blocks[0].to_hex()), "{err}");
    assert!(!b.has_block(&blocks[0]));
    let encoded = local.read_encoded_block(&blocks[0]).unwrap();
    let mut bad = encoded.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert_eq!(net_kind(&b.put_encoded_block(&blocks[0], &bad).unwrap_err()), capsule_net::ErrorKind::Corrupt);
    b.put_encoded_block(&blocks[0], &encoded).unwrap();
    b.update_ref("app", None, &id).unwrap();
    assert_eq!(b.read_ref("app").unwrap(), Some(id));
    assert_eq!(b.read_encoded_block(&blocks[0]).unwrap(), encoded);
    assert!(b.has_object(&id) && b.has_block(&blocks[1]));
}
