//! The short pass `make test` runs: every target for a few thousand inputs (`make fuzz`
//! runs a million each). Zero panics; hangs end the process (the harness's watchdog).

#[test]
fn every_decoder_survives_a_short_fuzz_pass() {
    let inputs = std::env::var("CAPSULE_FUZZ_INPUTS").ok().and_then(|v| v.parse().ok()).unwrap_or(3000);
    let dir = std::env::temp_dir().join(format!("capsule-fuzz-{}", std::process::id()));
    let mut failures = Vec::new();
    for t in capsule_fuzz::targets() {
        let r = capsule_fuzz::run_target(&t, inputs, 7, &dir);
        eprintln!("{:<14} {:>7} inputs {:>7} accepted {:>3} panics {:>8.1} ms slowest", t.name, r.inputs, r.accepted, r.panics, r.slowest.as_secs_f64() * 1e3);
        assert_eq!(r.inputs, inputs);
        // The seeds are valid encodings: a target that accepts nothing tests nothing.
        assert!(r.accepted > 0, "{}: no input accepted", t.name);
        if let Some(p) = r.first_panic {
            failures.push(format!("{}: {} panics, first: {p}", t.name, r.panics));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(failures.is_empty(), "{failures:#?}");
}
