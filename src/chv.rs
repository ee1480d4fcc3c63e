//! `capsule run --hypervisor cloud-hypervisor`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Result};
use serde_json::Value;

use crate::run::RunArgs;

pub fn run(_args: &RunArgs, _mnt: &Path, _vm: &Value, _dir: &Path) -> Result<ExitCode> {
    bail!("cloud-hypervisor: not yet")
}
