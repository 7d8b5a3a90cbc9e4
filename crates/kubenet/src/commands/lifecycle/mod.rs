//! The lab's lifecycle from the user's side: `setup`, `up`, `down`, `status`, `ssh`, `reset`,
//! `destroy`, `image pull`. These run as the user: files they make stay the user's, and what needs
//! root (starting QEMU, on macOS for vmnet) is asked of `kubenet serve` over its control socket.
//!
//! Layout, one module per command family: `setup`, `up` (with its wait, and `down`), `status`, `destroy` (and `reset`), `image`. What several of them share is here.

mod destroy;
mod image;
mod setup;
mod status;
mod up;

use std::path::PathBuf;

use anyhow::{Context, bail};
use kubenet_cluster::{Lab, Vm};
use kubenet_vm::VmFiles;

pub use destroy::{destroy, reset};
pub use image::image_pull;
pub use setup::setup;
pub(crate) use setup::ssh_include_line;
pub use status::status;
pub use up::{down, up};

pub(crate) fn home() -> anyhow::Result<PathBuf> {
    std::env::home_dir().context("cannot tell your home directory (set HOME)")
}

pub(crate) use kubenet_cluster::state::unix_now as now;

/// "3h12m", "4m05s", "9s".
pub(crate) fn short(secs: u64) -> String {
    match secs {
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

/// The VM's QEMU pid, or an error saying it is not running and how to start it (before ssh or
/// the console try a connection that can only fail).
pub fn require_running(lab: &Lab, vm: &Vm) -> anyhow::Result<u32> {
    kubenet_vm::process::running(&VmFiles::new(lab, vm))
        .with_context(|| format!("{} is not running: start it with `kubenet up {}`", vm.name, vm.name))
}

pub(crate) fn refuse_running(lab: &Lab, vms: &[&Vm], what: &str) -> anyhow::Result<()> {
    let running: Vec<&str> = vms
        .iter()
        .filter(|vm| kubenet_vm::process::running(&VmFiles::new(lab, vm)).is_some())
        .map(|vm| vm.name.as_str())
        .collect();
    if !running.is_empty() {
        bail!(
            "{} still running: stop first with `kubenet down {}`, then {what}",
            running.join(", "),
            running.join(" ")
        );
    }
    Ok(())
}
