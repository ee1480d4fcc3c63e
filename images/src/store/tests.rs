//! The store's own tests: refs, blocks read and written, leftovers.

use super::*;

#[test]
fn refs_compare_and_swap() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (a, b) = (Hash([1; 32]), Hash([2; 32]));
    store.cas_ref("team/app", None, &a).unwrap();
    let err = store.cas_ref("team/app", None, &b).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);
    store.cas_ref("team/app", Some(&a), &b).unwrap();
    assert_eq!(store.read_ref("team/app").unwrap(), Some(b));
    assert_eq!(store.list_refs().unwrap(), vec![("team/app".to_string(), b)]);
    assert!(store.read_ref("../etc").is_err());
}

#[test]
fn blocks_are_verified_on_read() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let data = vec![9u8; 8192];
    let put = store.put_block(&data).unwrap();
    let Entry::Data(h) = put.entry else { panic!("not stored") };
    assert_eq!(store.get_block(&h).unwrap(), data);
    assert_eq!(store.put_block(&[0; 4096]).unwrap().entry, Entry::Zero);
    let path = store.block_path(&h);
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&path, bytes).unwrap();
    let err = store.get_block(&h).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert!(err.to_string().contains(&h.to_hex()), "{err}");
}

#[test]
fn a_dedup_hit_on_a_torn_block_file_writes_the_block_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let data: Vec<u8> = (0..65536u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let h = Hash::of(&data);
    // What a power loss can leave of a block renamed into place before a syncfs.
    fs::create_dir_all(store.block_path(&h).parent().unwrap()).unwrap();
    fs::write(store.block_path(&h), b"").unwrap();
    let put = store.put_block(&data).unwrap();
    assert!(put.new, "a torn file must not count as the block");
    assert_eq!(store.get_block(&h).unwrap(), data);
    assert!(!store.put_block(&data).unwrap().new, "a sound file is a dedup hit");
    // The same through the encoded paths (pull, push).
    let encoded = fs::read(store.block_path(&h)).unwrap();
    fs::write(store.block_path(&h), &encoded[..encoded.len() / 2]).unwrap();
    assert!(store.put_verified_block(&h, &encoded).unwrap());
    assert_eq!(store.get_block(&h).unwrap(), data);
    fs::write(store.block_path(&h), b"junk").unwrap();
    assert!(store.put_encoded_block(&h, &encoded).unwrap());
    assert_eq!(store.get_block(&h).unwrap(), data);
}

#[test]
fn leftover_tmp_files_are_cleared_when_alone() {
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open(dir.path()).unwrap());
    fs::write(dir.path().join("tmp/123-4"), b"partial").unwrap();
    let _store = Store::open(dir.path()).unwrap();
    assert!(!dir.path().join("tmp/123-4").exists());
}
