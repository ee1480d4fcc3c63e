//! Packs: the format, the store around them, their writer.

use super::*;

fn blocks(n: u8) -> Vec<(Hash, Vec<u8>)> {
    (0..n).map(|i| (Hash::of(&[i]), vec![i; 100 + usize::from(i)])).collect()
}

fn write_pack(dir: &Path, tmp: &Path, blocks: &[(Hash, Vec<u8>)]) -> Result<PathBuf> {
    let mut w = PackWriter::create(tmp)?;
    for (h, b) in blocks {
        w.add(h, b)?;
    }
    w.finish(dir)
}

#[test]
fn a_written_pack_reads_back_and_its_damage_is_named() {
    let d = tempfile::tempdir().unwrap();
    let path = write_pack(&d.path().join(DIR), &d.path().join("t"), &blocks(20)).unwrap();
    let packs = Packs::new(d.path());
    for (h, bytes) in blocks(20) {
        assert_eq!(packs.read(&h).unwrap().unwrap(), bytes);
    }
    assert!(packs.read(&Hash::of(b"absent")).is_none());

    // A flipped index byte fails the checksum; a truncated pack has no footer.
    let mut bytes = fs::read(&path).unwrap();
    let len = bytes.len();
    bytes[len - FOOTER as usize - 3] ^= 1;
    fs::write(&path, &bytes).unwrap();
    let err = Pack::open(&path).unwrap_err().to_string();
    assert!(err.contains("checksum") && err.contains(&path.display().to_string()), "{err}");
    fs::write(&path, &bytes[..len - 1]).unwrap();
    assert!(Pack::open(&path).unwrap_err().to_string().contains("footer"));
    let (ok, broken) = Packs::new(d.path()).all();
    assert!(ok.is_empty() && broken.len() == 1, "{broken:?}");
}

#[test]
fn a_footer_that_lies_about_its_index_is_refused_before_allocating() {
    let d = tempfile::tempdir().unwrap();
    let path = write_pack(&d.path().join(DIR), &d.path().join("t"), &blocks(3)).unwrap();
    let mut bytes = fs::read(&path).unwrap();
    let f = bytes.len() - FOOTER as usize;
    bytes[f + 8..f + 16].copy_from_slice(&u64::MAX.to_le_bytes());
    fs::write(&path, &bytes).unwrap();
    assert!(Pack::open(&path).unwrap_err().to_string().contains("entries"));
}

#[test]
fn a_pack_renamed_in_by_another_process_is_found_on_reload() {
    let d = tempfile::tempdir().unwrap();
    let packs = Packs::new(d.path());
    let (h, bytes) = blocks(1).remove(0);
    assert!(!packs.contains(&h));
    write_pack(&d.path().join(DIR), &d.path().join("t"), &blocks(1)).unwrap();
    packs.reload();
    assert_eq!(packs.read(&h).unwrap().unwrap(), bytes);
}

fn import(store: &Store, dir: &Path, name: &str, seeds: &[u8]) -> Hash {
    let disk = dir.join(format!("{name}.raw"));
    fs::write(&disk, seeds.iter().map(|&b| vec![b; 4096]).collect::<Vec<_>>().concat()).unwrap();
    let spec = crate::CapsuleSpec { name: name.into(), disks: vec![("root".into(), disk)], block_size_log2: Some(12), ..Default::default() };
    crate::import_capsule(store, &spec, &crate::NoProgress).unwrap().id
}

/// Store `DIR/s` holding capsule "a" of blocks 1, 2 and 3, packed, one of them damaged in
/// its pack: that block's entry, its sound raw bytes and the pack. No handle on the store
/// stays open.
fn import_and_damage_one_packed_block(dir: &Path) -> (IndexEntry, Vec<u8>, PathBuf) {
    let store = Store::open(dir.join("s")).unwrap();
    import(&store, dir, "a", &[1, 2, 3]);
    let (packs, _) = store.packs.all();
    let victim = packs[0].entries[1];
    let raw = (1..=3u8).map(|b| vec![b; 4096]).find(|r| Hash::of(r) == victim.hash).unwrap();
    let mut bytes = fs::read(packs[0].path()).unwrap();
    bytes[victim.offset as usize + 8] ^= 0x40;
    fs::write(packs[0].path(), &bytes).unwrap();
    (victim, raw, packs[0].path().to_path_buf())
}

fn loose_files(store: &Store) -> usize {
    store.list_dir_hashes("blocks").unwrap().len()
}

#[test]
fn an_imported_capsule_is_packed_in_walk_order_and_gc_keeps_only_what_refs_reach() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(d.path().join("s")).unwrap();
    let a = import(&store, d.path(), "a", &[9, 3, 7, 1, 5]);
    assert_eq!(loose_files(&store), 0, "the capsule's block files were packed");
    assert_eq!(fs::read_to_string(d.path().join("s/format")).unwrap(), "capsule-store 2\n");
    let (_, order) = store.closure(&a).unwrap();
    let (packs, _) = store.packs.all();
    assert_eq!(packs.len(), 1);
    let mut by_offset = packs[0].entries.clone();
    by_offset.sort_by_key(|e| e.offset);
    assert_eq!(by_offset.iter().map(|e| e.hash).collect::<Vec<_>>(), order, "packed in the disk's order");
    for b in [9u8, 3, 7, 1, 5] {
        assert_eq!(store.get_block(&Hash::of(&[b; 4096])).unwrap(), vec![b; 4096]);
    }

    // A second capsule shares two blocks; once its ref is gone, gc drops its own three
    // from their pack and keeps the shared ones.
    import(&store, d.path(), "b", &[9, 3, 11, 12, 13]);
    assert_eq!(store.packs.all().0.len(), 2);
    store.delete_ref("b").unwrap();
    let stats = store.gc().unwrap();
    assert_eq!((stats.blocks_removed, stats.blocks_kept), (3, 5), "{stats:?}");
    for b in [11u8, 12, 13] {
        assert!(!store.has_block(&Hash::of(&[b; 4096])), "block {b} survived gc");
    }
    let report = crate::verify_store_files(&store).unwrap();
    assert!(report.problems.is_empty() && report.blocks_checked == 5, "{report:?}");
}

#[test]
fn a_damaged_packed_block_is_named_by_its_pack_and_never_returned() {
    let d = tempfile::tempdir().unwrap();
    let (victim, _, pack) = import_and_damage_one_packed_block(d.path());
    let store = Store::open(d.path().join("s")).unwrap();
    let err = store.get_block(&victim.hash).unwrap_err().to_string();
    assert!(err.contains(&pack.display().to_string()), "{err}");
    let report = crate::verify_store_files(&store).unwrap();
    assert_eq!((report.problems.len(), report.blocks_checked), (1, 2), "{report:?}");
}

#[test]
fn a_handle_that_looked_before_another_packed_still_reads_the_block() {
    let d = tempfile::tempdir().unwrap();
    let writer = Store::open(d.path().join("s")).unwrap();
    let h = writer.put_block(&[4u8; 4096]).unwrap().entry;
    let crate::map::Entry::Data(h) = h else { panic!("a data block") };
    let reader = Store::open(d.path().join("s")).unwrap();
    assert!(reader.has_block(&h), "its file");
    let stats = writer.pack_loose([h], false).unwrap();
    assert_eq!((stats.blocks, loose_files(&writer)), (1, 0));
    assert_eq!(reader.get_block(&h).unwrap(), vec![4u8; 4096], "found in the new pack on a miss");

    // Another pack within the same second: `has_block` must not trust the directory's
    // time, which a coarse clock may not have moved (set back here, as such a clock would).
    let dir = d.path().join("s").join(DIR);
    let stamp = fs::metadata(&dir).unwrap().modified().unwrap().duration_since(std::time::UNIX_EPOCH).unwrap();
    let crate::map::Entry::Data(h2) = writer.put_block(&[6u8; 4096]).unwrap().entry else { panic!("a data block") };
    writer.pack_loose([h2], false).unwrap();
    let t = rustix::fs::Timespec { tv_sec: stamp.as_secs() as i64, tv_nsec: i64::from(stamp.subsec_nanos()) };
    rustix::fs::utimensat(rustix::fs::CWD, &dir, &rustix::fs::Timestamps { last_access: t, last_modification: t }, rustix::fs::AtFlags::empty()).unwrap();
    assert!(reader.has_block(&h2), "a block packed since the last listing is reported missing");
}

#[test]
fn a_damaged_block_file_is_not_packed_and_stays() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(d.path().join("s")).unwrap();
    let crate::map::Entry::Data(good) = store.put_block(&[1u8; 4096]).unwrap().entry else { panic!("a data block") };
    let crate::map::Entry::Data(bad) = store.put_block(&[2u8; 4096]).unwrap().entry else { panic!("a data block") };
    fs::write(store.block_path(&bad), b"torn").unwrap();
    let stats = store.pack_loose([good, bad], false).unwrap();
    assert_eq!(stats.blocks, 1, "only the sound block is packed");
    assert!(store.block_path(&bad).exists(), "the damaged file was removed");
    assert!(!store.block_path(&good).exists());
    let report = crate::verify_store_files(&store).unwrap();
    assert!(report.problems.len() == 1 && report.problems[0].contains(&bad.to_hex()), "{report:?}");
}

#[test]
fn a_batch_is_invisible_until_it_finishes_and_nothing_if_dropped() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(d.path().join("s")).unwrap();
    let (h, bytes) = (Hash::of(&[5u8; 4096]), crate::block::encode_with_level(&[5u8; 4096], 1).unwrap());
    let mut dropped = store.pack_batch();
    dropped.add(&h, &bytes).unwrap();
    drop(dropped);
    assert_eq!(fs::read_dir(d.path().join("s/tmp")).unwrap().count(), 0, "the dropped batch's file stayed in tmp/");
    let mut batch = store.pack_batch();
    batch.add(&h, &bytes).unwrap();
    assert!(!store.has_block(&h), "visible before the batch finished");
    let stats = batch.finish().unwrap();
    assert_eq!((stats.blocks, stats.packs), (1, 1));
    assert_eq!(store.get_block(&h).unwrap(), vec![5u8; 4096]);
    assert_eq!(store.packs.all().0.len(), 1, "the dropped batch left no pack");
    assert_eq!(loose_files(&store), 0);
}

#[test]
fn small_packs_are_merged_while_another_handle_reads_on() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(d.path().join("s")).unwrap();
    let raws: Vec<Vec<u8>> = (0..MERGE_SMALL_AT as u8 + 2).map(|i| vec![i + 1; 4096]).collect();
    for raw in &raws {
        let mut batch = store.pack_batch();
        batch.add(&Hash::of(raw), &crate::block::encode_with_level(raw, 1).unwrap()).unwrap();
        batch.finish().unwrap();
    }
    // Another handle (another process's, say) that listed the packs before the merge.
    let reader = Store::open(d.path().join("s")).unwrap();
    assert!(raws.iter().all(|r| reader.get_block(&Hash::of(r)).is_ok()));
    assert_eq!(store.packs.all().0.len(), raws.len());
    store.merge_small_packs().unwrap();
    assert_eq!(store.packs.all().0.len(), 1, "merged into one");
    for raw in &raws {
        assert_eq!(&reader.get_block(&Hash::of(raw)).unwrap(), raw, "the older handle lost a block");
        assert!(reader.has_block(&Hash::of(raw)));
    }
    let fresh = Store::open(d.path().join("s")).unwrap();
    assert!(raws.iter().all(|r| fresh.get_block(&Hash::of(r)).is_ok()));
    assert_eq!(fs::read_dir(d.path().join("s/tmp")).unwrap().count(), 0);
}

#[test]
fn verify_names_a_damaged_block_file_beside_a_sound_packed_copy() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(d.path().join("s")).unwrap();
    let crate::map::Entry::Data(h) = store.put_block(&[3u8; 4096]).unwrap().entry else { panic!("a data block") };
    let sound = fs::read(store.block_path(&h)).unwrap();
    store.pack_loose([h], false).unwrap();
    // A copy of the block as a file again, damaged: the pack's copy must not stand in for it.
    fs::create_dir_all(store.block_path(&h).parent().unwrap()).unwrap();
    fs::write(store.block_path(&h), &sound[..sound.len() / 2]).unwrap();
    let report = crate::verify_store_files(&store).unwrap();
    assert!(report.problems.len() == 1 && report.problems[0].contains(&store.block_path(&h).display().to_string()), "{report:?}");
}

#[test]
fn a_damaged_packed_block_is_stored_again_by_the_next_put_and_gc_drops_the_damaged_copy() {
    let d = tempfile::tempdir().unwrap();
    let (victim, raw, _) = import_and_damage_one_packed_block(d.path());

    let store = Store::open(d.path().join("s")).unwrap();
    assert!(store.has_block(&victim.hash), "not known damaged before a read");
    assert!(store.get_block(&victim.hash).is_err());
    // Once read damaged, the copy no longer counts: a server reports it missing and a
    // put (a pull, a push, a fetch into a cache) writes it again, where it reads sound.
    assert!(!store.has_block(&victim.hash) && store.missing_blocks([victim.hash]) == [victim.hash]);
    assert!(store.put_block(&raw).unwrap().new, "the put was taken for a duplicate");
    assert_eq!(store.get_block(&victim.hash).unwrap(), raw);
    assert_eq!(crate::verify_store_files(&store).unwrap().problems.len(), 1, "the damaged copy is still named");

    drop(store);
    let store = Store::open(d.path().join("s")).unwrap();
    store.gc().unwrap();
    let report = crate::verify_store_files(&store).unwrap();
    assert!(report.problems.is_empty() && report.blocks_checked == 3, "{report:?}");
    assert_eq!(store.get_block(&victim.hash).unwrap(), raw);
}

#[test]
fn repair_sets_damaged_copies_aside_so_a_new_handle_reports_them_missing_and_a_put_heals() {
    let d = tempfile::tempdir().unwrap();
    let (victim, raw, pack_path) = import_and_damage_one_packed_block(d.path());
    let store = Store::open(d.path().join("s")).unwrap();
    // A damaged block file beside it, with no other copy.
    let crate::map::Entry::Data(torn) = store.put_block(&[7u8; 4096]).unwrap().entry else { panic!("a data block") };
    fs::write(store.block_path(&torn), b"torn").unwrap();
    let damaged_record = store.packs.all().0[0].read(&victim).unwrap();

    let report = crate::verify_store_files(&store).unwrap();
    assert_eq!(report.damaged_blocks.len(), 2, "{report:?}");
    let done = store.set_aside_damaged(&report.damaged_blocks).unwrap();
    assert_eq!((done.copies, done.packs_rewritten), (2, 1), "{done:?}");
    let mut expect = vec![victim.hash, torn];
    expect.sort();
    assert_eq!(done.now_missing, expect);
    assert!(!pack_path.exists(), "the damaged pack is still in place");
    let aside = d.path().join("s").join(crate::store::repair::DAMAGED_DIR);
    let pack_name = pack_path.file_name().unwrap().to_string_lossy();
    assert_eq!(fs::read(aside.join(format!("{}.{pack_name}", victim.hash))).unwrap(), damaged_record, "the damaged bytes were not kept");
    assert_eq!(fs::read(aside.join(format!("{torn}.file"))).unwrap(), b"torn");
    drop(store);

    // A new process knows nothing of earlier reads: the blocks are missing, the others
    // read as before, and a put stores them again.
    let store = Store::open(d.path().join("s")).unwrap();
    assert_eq!(store.missing_blocks([victim.hash, torn]), [victim.hash, torn]);
    for b in (1..=3u8).map(|b| vec![b; 4096]).filter(|r| Hash::of(r) != victim.hash) {
        assert_eq!(store.get_block(&Hash::of(&b)).unwrap(), b);
    }
    assert!(store.put_block(&raw).unwrap().new && store.put_block(&[7u8; 4096]).unwrap().new);
    let report = crate::verify_store_files(&store).unwrap();
    assert!(report.problems.is_empty() && report.blocks_checked == 4, "{report:?}");
}

#[test]
fn repair_moves_only_damaged_copies_and_empties_an_all_damaged_pack() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(d.path().join("s")).unwrap();
    let crate::map::Entry::Data(sound) = store.put_block(&[4u8; 4096]).unwrap().entry else { panic!("a data block") };
    let crate::map::Entry::Data(other) = store.put_block(&[5u8; 4096]).unwrap().entry else { panic!("a data block") };
    // A block listed whose copy is sound (damaged at the verify, restored since) stays.
    let done = store.set_aside_damaged(&[sound]).unwrap();
    assert_eq!(done.copies, 0);
    assert_eq!(store.get_block(&sound).unwrap(), vec![4u8; 4096]);

    // A pack whose every record is damaged goes, its records kept aside.
    store.pack_loose([sound, other], false).unwrap();
    let (packs, _) = store.packs.all();
    let path = packs[0].path().to_path_buf();
    let mut bytes = fs::read(&path).unwrap();
    for e in &packs[0].entries {
        bytes[e.offset as usize + 8] ^= 0x40;
    }
    fs::write(&path, &bytes).unwrap();
    drop(packs);
    let report = crate::verify_store_files(&store).unwrap();
    let done = store.set_aside_damaged(&report.damaged_blocks).unwrap();
    assert_eq!((done.copies, done.packs_rewritten, done.now_missing.len()), (2, 1, 2), "{done:?}");
    assert!(!path.exists() && store.packs.all().0.is_empty());
    assert_eq!(fs::read_dir(&done.dir).unwrap().count(), 2);
}
