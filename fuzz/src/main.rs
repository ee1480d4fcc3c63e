//! `capsule-fuzz [--target NAME]... [--inputs N] [--seed S] [--crash-dir DIR]`: runs each
//! target for N inputs (default 1,000,000) and prints one line per target; exits 1 if any
//! input panicked (3 on a hang). `--replay FILE --target NAME` feeds one saved input.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut names = Vec::new();
    let mut inputs: u64 = 1_000_000;
    let mut seed: u64 = 1;
    let mut crash_dir = PathBuf::from("target/fuzz-crashes");
    let mut replay = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |what: &str| args.next().unwrap_or_else(|| usage(&format!("{a} needs {what}")));
        match a.as_str() {
            "--target" => names.push(value("a target name")),
            "--inputs" => inputs = value("a count").parse().unwrap_or_else(|_| usage("--inputs: not a number")),
            "--seed" => seed = value("a number").parse().unwrap_or_else(|_| usage("--seed: not a number")),
            "--crash-dir" => crash_dir = value("a directory").into(),
            "--replay" => replay = Some(PathBuf::from(value("a file"))),
            "--list" => {
                for t in capsule_fuzz::targets() {
                    println!("{}", t.name);
                }
                return ExitCode::SUCCESS;
            }
            _ => usage(&format!("unknown argument {a}")),
        }
    }
    let all = capsule_fuzz::targets();
    for n in &names {
        if !all.iter().any(|t| t.name == n) {
            usage(&format!("no target {n} (see --list)"));
        }
    }
    let chosen: Vec<_> = all.into_iter().filter(|t| names.is_empty() || names.iter().any(|n| n == t.name)).collect();
    if let Some(file) = replay {
        let input = std::fs::read(&file).unwrap_or_else(|e| usage(&format!("{}: {e}", file.display())));
        for t in &chosen {
            println!("{}: accepted = {}", t.name, capsule_fuzz::replay(t, &input));
        }
        return ExitCode::SUCCESS;
    }
    println!("{:<14} {:>10} {:>10} {:>7} {:>11} {:>9} {:>11}", "target", "inputs", "accepted", "panics", "slowest", "time", "inputs/s");
    let mut failed = false;
    for t in &chosen {
        let r = capsule_fuzz::run_target(t, inputs, seed, &crash_dir);
        println!(
            "{:<14} {:>10} {:>10} {:>7} {:>9.1}ms {:>8.1}s {:>11.0}",
            t.name,
            r.inputs,
            r.accepted,
            r.panics,
            r.slowest.as_secs_f64() * 1e3,
            r.elapsed.as_secs_f64(),
            r.inputs as f64 / r.elapsed.as_secs_f64().max(1e-9)
        );
        if let Some(p) = &r.first_panic {
            println!("  first panic: {p}");
            failed = true;
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn usage(msg: &str) -> ! {
    eprintln!("capsule-fuzz: {msg}\nusage: capsule-fuzz [--target NAME]... [--inputs N] [--seed S] [--crash-dir DIR] [--replay FILE] [--list]");
    std::process::exit(2)
}
