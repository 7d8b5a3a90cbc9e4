//! `kubenet reset` (VMs' disks and seeds) and `kubenet destroy` (everything kubenet made).

use std::io::Write;
use std::path::Path;

use anyhow::{Context, bail};
use kubenet_cluster::{Lab, Vm};
use kubenet_vm::keys::{self};
use kubenet_vm::{LabFiles, VmFiles};

use super::{home, refuse_running, setup::ssh_include_line};

/// `kubenet reset NAME...`.
pub fn reset(lab: &Lab, names: &[String], out: &mut impl Write) -> anyhow::Result<()> {
    let vms = lab.select(names).map_err(crate::cli::unknown_vm)?;
    refuse_running(lab, &vms, "reset")?;
    for vm in vms {
        let files = VmFiles::new(lab, vm);
        if !files.disk().exists() && !files.seed().exists() {
            writeln!(out, "{:<10} nothing to reset: it was never set up (`kubenet up {}` makes it)", vm.name, vm.name)?;
            continue;
        }
        kubenet_vm::prepare::reset(lab, vm).with_context(|| format!("resetting {}", vm.name))?;
        writeln!(out, "{:<10} reset: a fresh disk and seed at its next `kubenet up`", vm.name)?;
    }
    Ok(())
}

/// `kubenet destroy`.
pub fn destroy(lab: &Lab, yes: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let all: Vec<&Vm> = lab.vms.iter().collect();
    refuse_running(lab, &all, "destroy")?;
    let files = LabFiles::new(lab);
    let mut doomed = files.made(lab);
    doomed.retain(|p| p.exists());
    if doomed.is_empty() {
        writeln!(out, "nothing to remove in {}", lab.state_dir.display())?;
        return Ok(());
    }
    if !yes {
        use std::io::IsTerminal;
        if !std::io::stdin().is_terminal() {
            bail!("destroy removes {} paths; run it on a terminal to confirm, or pass --yes", doomed.len());
        }
        eprintln!("This removes, in {}:", lab.state_dir.display());
        for p in &doomed {
            eprintln!("  {}", p.strip_prefix(&lab.state_dir).unwrap_or(p).display());
        }
        eprint!("Type `yes` to go on: ");
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if answer.trim() != "yes" {
            bail!("nothing removed");
        }
    }
    for p in &doomed {
        remove(p).with_context(|| format!("cannot remove {}", p.display()))?;
    }
    writeln!(out, "removed {} paths; base images and the lab definition are kept", doomed.len())?;
    let ssh_config = home()?.join(".ssh/config");
    if ssh_config.exists() {
        let line = ssh_include_line(&files)?;
        if keys::edit_locked(&ssh_config, |old| keys::remove_include(old, &line))? {
            writeln!(out, "removed `{line}` from {}", ssh_config.display())?;
        }
    }
    Ok(())
}

fn remove(p: &Path) -> std::io::Result<()> {
    if p.is_dir() { std::fs::remove_dir_all(p) } else { std::fs::remove_file(p) }
}
