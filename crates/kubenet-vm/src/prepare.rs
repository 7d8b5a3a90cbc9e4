//! `kubenet setup`: everything a VM needs before its first boot, made once and kept (the
//! tutorial's vmsetup.sh): the host key, the disk overlay, the cloud-init seed; and for the lab,
//! `known_hosts` and `ssh_config`. Runs as the user, so every file stays theirs. I/O.
//!
//! A VM's folder holds secrets: its private host key, and the seed that carries that key to the
//! guest. Anyone who reads them can pose as the VM to the lab's strict SSH. So the folder is
//! 0700 and the key, the seed and the disk (whatever the guest writes) are 0600, made so and,
//! for a lab made before, set so at every `setup` (and so every `up`).

use kubenet_cluster::{Lab, Vm};

use crate::files::{LabFiles, VmFiles};
use crate::keys::{self, LoginKey};

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(transparent)]
    Key(#[from] keys::KeyError),
    #[error(transparent)]
    Disk(#[from] crate::disk::DiskError),
    #[error(transparent)]
    Seed(#[from] crate::seed::SeedError),
    #[error("{path}: {source}")]
    Io { path: std::path::PathBuf, source: std::io::Error },
}

/// Owner-only modes: the VM's folder, and its disk (the keys and the seed get 0600 from their
/// writers).
const PRIVATE_DIR: u32 = 0o700;
const PRIVATE_FILE: u32 = 0o600;

/// Sets `path`'s permission bits to `mode`.
fn set_mode(path: &std::path::Path, mode: u32) -> Result<(), PrepareError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|source| PrepareError::Io { path: path.to_path_buf(), source })
}

/// What [`vm`] made (false: it was there already).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Made {
    pub host_key: bool,
    pub disk: bool,
    pub seed: bool,
}

/// Prepares one VM. The seed is rewritten every time (it is cheap, and a changed login key or
/// user-data reaches the VM at its next first boot); the key and the disk only when missing.
pub fn vm(lab: &Lab, vm: &Vm, login: &LoginKey) -> Result<Made, PrepareError> {
    let files = VmFiles::new(lab, vm);
    std::fs::create_dir_all(&files.dir).map_err(|source| PrepareError::Io { path: files.dir.clone(), source })?;
    set_mode(&files.dir, PRIVATE_DIR)?;
    let key_path = files.host_key();
    let host_key = !key_path.exists();
    let key = keys::load_or_create(&key_path, &format!("root@{}", vm.fqdn))?;
    let disk = crate::disk::create(lab, vm)?;
    set_mode(&files.disk(), PRIVATE_FILE)?;
    let seed = crate::seed::documents(lab, vm, &login.public, &key)?;
    let had_seed = files.seed().exists();
    // (A new seed gets 0600 from its writer; an old one is replaced, mode and all.)
    crate::seed::write(&files.seed(), &seed)?;
    Ok(Made { host_key, disk, seed: !had_seed })
}

/// Writes the lab's known_hosts and ssh_config from the host keys that exist.
pub fn lab_files(lab: &Lab, login: &LoginKey) -> Result<(), PrepareError> {
    let files = LabFiles::new(lab);
    let entries = keys::lab_host_keys(lab)?;
    let io = |path: std::path::PathBuf| move |source| keys::KeyError::Io { path, source };
    std::fs::create_dir_all(&files.dir).map_err(io(files.dir.clone()))?;
    kubenet_cluster::state::write_atomic(&files.known_hosts(), keys::known_hosts(&entries)?.as_bytes(), 0o644)
        .map_err(io(files.known_hosts()))?;
    let config = keys::ssh_config(lab, login.identity.as_deref());
    kubenet_cluster::state::write_atomic(&files.ssh_config(), config.as_bytes(), 0o644)
        .map_err(io(files.ssh_config()))?;
    Ok(())
}

/// Removes what makes a VM: disk, seed, UEFI variables and console log, so the next
/// `setup`/`up` starts it fresh and cloud-init runs again. The host key stays, so the lab's
/// known_hosts stays right.
pub fn reset(lab: &Lab, vm: &Vm) -> std::io::Result<()> {
    let files = VmFiles::new(lab, vm);
    for p in [files.disk(), files.seed(), files.efi_vars(), files.console_log()] {
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}
