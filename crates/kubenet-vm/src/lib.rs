//! kubenet's VMs, from the lab definition to running QEMU processes.
//!
//! Layout:
//! - [`files`]: where each VM's disk, seed, host key, sockets and logs live (pure paths).
//! - [`qemu`]: the host profile (OS, architecture, accelerator, firmware) and the QEMU command
//!   line built from it as data, so both the macOS and the Linux profile are tested anywhere.
//! - [`image`]: `kubenet image pull`: base images downloaded and checked against SHA256SUMS.
//! - [`disk`]: the qcow2 overlay on the base image (`qemu-img create` as data, run by `create`).
//! - [`seed`]: the cloud-init NoCloud documents, rendered from serde values, and the `cidata`
//!   ISO 9660 image that carries them.
//! - [`keys`]: SSH host keys generated ahead of boot, the lab's `known_hosts` and `ssh_config`,
//!   the user's login key, and the live host-key check after boot.
//! - [`qmp`]: a minimal QMP client (graceful power-down, status).
//! - [`live`]: live snapshots over QMP: every VM paused, saved (or loaded), resumed.
//! - [`owner`]: the lab's owner, whose rights the root agent uses for the owner's files and QEMU.
//! - [`trust`]: whether a file root runs can be replaced by anyone but root.
//! - [`handover`]: the guest's files opened as the owner and its sockets bound as the owner,
//!   handed to a QEMU that starts as root (macOS) as descriptors; the lab's root-owned runtime directory.
//! - `tap` (Linux): the VM's tap, opened by the agent and handed to QEMU as a descriptor.
//! - [`process`]: starting a VM from its argv, finding it again by pidfile, stopping it.
//! - [`snapshot`]: lab snapshots, one name across the VMs' disks, all or nothing, with a manifest.
//!
//! Everything but `disk::create`, `seed::write`, `keys` file helpers, `qmp` and `process` is pure.

pub mod disk;
pub mod files;
pub mod handover;
pub mod image;
pub mod keys;
pub mod live;
pub mod owner;
pub mod prepare;
pub mod process;
pub mod qemu;
pub mod qmp;
pub mod seed;
pub mod snapshot;
#[cfg(target_os = "linux")]
pub mod tap;
pub mod trust;

pub use files::{LabFiles, VmFiles};
