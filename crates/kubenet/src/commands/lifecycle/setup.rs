//! `kubenet setup`: the VMs' disks, seeds and host keys, and the lab's SSH files.

use std::io::Write;

use kubenet_cluster::Lab;
use kubenet_vm::LabFiles;
use kubenet_vm::keys::{self, LoginKey};

use crate::cli::SetupArgs;

use super::home;

/// `kubenet setup`: prepares the VMs and writes the lab's SSH files. Returns the login key.
pub fn setup(lab: &Lab, args: &SetupArgs, out: &mut impl Write) -> anyhow::Result<LoginKey> {
    let vms = lab.select(&args.names).map_err(crate::cli::unknown_vm)?;
    // Every VM's disk can be made (its base image is there and fits) before anything is made:
    // a failed setup leaves no host keys, lab key or folders behind.
    for vm in &vms {
        kubenet_vm::disk::check(lab, vm)?;
    }
    let login = keys::login_key(lab, &home()?)?;
    for vm in &vms {
        let made = kubenet_vm::prepare::vm(lab, vm, &login)?;
        let mut said = Vec::new();
        if made.host_key {
            said.push("host key made");
        }
        said.push(if made.disk { "disk created" } else { "disk kept" });
        said.push("seed written");
        writeln!(out, "{:<10} {}", vm.name, said.join(", "))?;
    }
    kubenet_vm::prepare::lab_files(lab, &login)?;
    let files = LabFiles::new(lab);
    writeln!(out, "wrote {} and {}", files.known_hosts().display(), files.ssh_config().display())?;
    if args.update_known_hosts {
        let path = home()?.join(".ssh/known_hosts");
        let entries = keys::lab_host_keys(lab)?;
        let names: Vec<String> = entries.iter().flat_map(|(vm, _)| keys::host_names(vm)).collect();
        keys::update_known_hosts(&path, &names, &keys::known_hosts(&entries)?)?;
        writeln!(out, "updated {} for {} VMs", path.display(), entries.len())?;
    }
    if args.ssh_include {
        let path = home()?.join(".ssh/config");
        let line = ssh_include_line(&files)?;
        if let crate::commands::ssh::Installed::Added { .. } = crate::commands::ssh::install_include(&path, &line)? {
            writeln!(out, "added `{line}` to {}: `ssh NAME` now reaches the lab", path.display())?;
        }
    }
    Ok(login)
}

/// The line `ssh-config --install` (and `setup --ssh-include`) adds to ~/.ssh/config and `destroy` takes out.
pub(crate) fn ssh_include_line(files: &LabFiles) -> anyhow::Result<String> {
    Ok(keys::include_line(&std::path::absolute(files.ssh_config())?))
}
