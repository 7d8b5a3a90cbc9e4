//! The agent's VMs: `kubenet serve` starts and stops QEMU for the user (on macOS vmnet-shared
//! needs root), with the command line always built from the lab definition, never taken from a
//! request. State lives in each VM's folder (pidfile, QMP socket, console log), so an agent that
//! restarts finds its running VMs again instead of killing or duplicating them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use kubenet_cluster::Lab;
use kubenet_vm::VmFiles;
use kubenet_vm::live::LiveOp;
use kubenet_vm::qemu::{DropTo, HostProfile};

use crate::proto::{RunState, StartOutcome, StartResult, StopResult, VmState};

pub struct Supervisor {
    lab: Arc<Mutex<Lab>>,
    /// The host profile, or why there is none (no QEMU, no firmware, ...): VM requests get that
    /// reason, DHCP and DNS run regardless.
    profile: Result<HostProfile, String>,
    owner: (u32, u32),
    /// Linux with `serve`'s bridge: each VM's tap is made sure of before QEMU opens it, so VMs a
    /// reload added get one too.
    bridged: bool,
}

/// What each VM is doing, from its folder: running (pid, since when) or stopped.
pub fn states(lab: &Lab) -> Vec<VmState> {
    lab.vms
        .iter()
        .map(|vm| {
            let files = VmFiles::new(lab, vm);
            let run = match kubenet_vm::process::running(&files) {
                Some(pid) => {
                    let since = std::fs::metadata(files.pidfile())
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                        .map(|d| d.as_secs());
                    RunState::Running { pid, since }
                }
                None => RunState::Stopped,
            };
            VmState { name: vm.name.clone(), run }
        })
        .collect()
}

impl Supervisor {
    /// Looks at the host once (accelerator, firmware, QEMU version). QEMU drops root to the
    /// user who ran sudo when the agent runs as root for someone else.
    pub fn new(lab: Arc<Mutex<Lab>>, owner: (u32, u32), bridged: bool) -> Self {
        // SAFETY: geteuid cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        let user = (root && owner.0 != 0)
            .then(|| nix::unistd::User::from_uid(owner.0.into()).ok().flatten().map(|u| u.name))
            .flatten();
        let profile = {
            let lab = lab.lock().expect("lab lock");
            HostProfile::detect(&lab, user.as_deref())
        };
        let profile = match profile {
            Ok((p, warning)) => {
                if let Some(w) = warning {
                    tracing::warn!("{w}");
                }
                for (arch, guest) in &p.guests {
                    match guest {
                        Ok(g) => {
                            let drop_to = match &g.drop_to {
                                Some(DropTo::RunWith(u) | DropTo::Runas(u)) => u.as_str(),
                                None => "-",
                            };
                            tracing::debug!(%arch, qemu = %g.qemu.display(), firmware = ?g.firmware, drop_to, "VM guest profile");
                        }
                        Err(e) => tracing::debug!(%arch, "{arch} guests cannot run here: {e}"),
                    }
                }
                tracing::debug!(host = %p.arch, accel = %p.accel, "VM host profile");
                Ok(p)
            }
            Err(e) => {
                tracing::warn!("VMs cannot be started by this agent: {e}");
                Err(e.to_string())
            }
        };
        Supervisor { lab, profile, owner, bridged: bridged && cfg!(target_os = "linux") }
    }

    fn lab(&self) -> Lab {
        self.lab.lock().expect("lab lock").clone()
    }

    pub fn states(&self) -> Vec<VmState> {
        states(&self.lab())
    }

    /// Starts the named VMs (none: all) in parallel; one result per VM.
    pub async fn start(&self, names: &[String]) -> Result<Vec<StartResult>, String> {
        let profile = self.profile.clone()?;
        let lab = self.lab();
        let vms = lab.select(names)?;
        let mut taps = Vec::new();
        for vm in &vms {
            taps.push(self.tap(&lab, vm).await);
        }
        let mut tasks = tokio::task::JoinSet::new();
        for ((i, vm), tap) in vms.iter().enumerate().zip(taps) {
            if let Err(e) = tap {
                tracing::warn!(vm = %vm.name, "VM not started: {e:#}");
                let outcome = StartOutcome::Failed { error: format!("{e:#}") };
                tasks.spawn(std::future::ready((i, StartResult { name: vm.name.clone(), outcome })));
                continue;
            }
            let (lab, vm, profile, owner) = (lab.clone(), (*vm).clone(), profile.clone(), self.owner);
            tasks.spawn_blocking(move || {
                let files = VmFiles::new(&lab, &vm);
                if let Some(pid) = kubenet_vm::process::running(&files) {
                    return (i, StartResult { name: vm.name, outcome: StartOutcome::Running { pid } });
                }
                let r = profile.launch(&vm).map_err(|e| e.to_string()).and_then(|launch| {
                    if let Some(w) = kubenet_vm::qemu::emulation_warning(&vm, profile.arch) {
                        tracing::warn!("{w}");
                    }
                    let argv = kubenet_vm::qemu::argv(&lab, &vm, &profile).map_err(|e| e.to_string())?;
                    kubenet_vm::process::start(&vm.name, &argv, &files, &launch.guest.firmware)
                        .map_err(|e| e.to_string())
                });
                let outcome = match r {
                    Ok(pid) => {
                        give_to(&files, owner);
                        tracing::info!(vm = %vm.name, pid, "VM started");
                        StartOutcome::Started { pid }
                    }
                    Err(error) => {
                        tracing::warn!(vm = %vm.name, "VM did not start: {error}");
                        StartOutcome::Failed { error }
                    }
                };
                (i, StartResult { name: vm.name, outcome })
            });
        }
        Ok(collect(tasks).await)
    }

    /// The VM's tap on the lab bridge, created if a reload brought the VM after the bridge was
    /// built (Linux with the bridge only).
    async fn tap(&self, lab: &Lab, vm: &kubenet_cluster::Vm) -> anyhow::Result<()> {
        #[cfg(target_os = "linux")]
        if self.bridged {
            let tap = kubenet_vm::qemu::tap_name(lab, vm);
            if crate::hostnet::attach_tap(&lab.network.bridge, &tap, self.owner.0).await? {
                tracing::info!(vm = %vm.name, tap, "tap created for a VM added since serve started");
            }
        }
        let _ = (lab, vm, self.bridged);
        Ok(())
    }

    /// Stops the named VMs (none: all) in parallel: ACPI power-down, then after `grace`
    /// SIGTERM, then SIGKILL.
    pub async fn stop(&self, names: &[String], grace: Duration) -> Result<Vec<StopResult>, String> {
        let lab = self.lab();
        let vms = lab.select(names)?;
        let mut tasks = tokio::task::JoinSet::new();
        for (i, vm) in vms.iter().enumerate() {
            let (files, name) = (VmFiles::new(&lab, vm), vm.name.clone());
            tasks.spawn(async move {
                let how = kubenet_vm::process::stop(&files, grace).await;
                if how != kubenet_vm::process::Stopped::NotRunning {
                    tracing::info!(vm = %name, how = ?how, "VM stopped");
                }
                (i, StopResult { name, result: how })
            });
        }
        Ok(collect(tasks).await)
    }
}

impl Supervisor {
    /// A live snapshot operation on the named running VMs (none: all): see
    /// [`kubenet_vm::live::run`]. A save that fails is deleted again from the VMs it reached.
    pub async fn snapshot(&self, op: LiveOp, tag: &str, names: &[String]) -> Result<Vec<String>, String> {
        kubenet_vm::snapshot::check_name(tag).map_err(|e| e.to_string())?;
        let lab = self.lab();
        let mut targets = Vec::new();
        for vm in lab.select(names)? {
            let files = VmFiles::new(&lab, vm);
            if kubenet_vm::process::running(&files).is_none() {
                return Err(format!("{} is not running", vm.name));
            }
            targets.push((vm.name.clone(), files.qmp_socket()));
        }
        let start = std::time::Instant::now();
        match kubenet_vm::live::run(op, tag, &targets).await {
            Ok(done) => {
                tracing::info!(?op, tag, vms = done.len(), secs = start.elapsed().as_secs_f64(), "live snapshot");
                Ok(done)
            }
            Err((e, done)) => {
                tracing::warn!(?op, tag, "live snapshot failed: {e}");
                if op == LiveOp::Save && !done.is_empty() {
                    let reached: Vec<_> = targets.into_iter().filter(|(n, _)| done.contains(n)).collect();
                    if let Err((undo, _)) = kubenet_vm::live::run(LiveOp::Delete, tag, &reached).await {
                        tracing::warn!(tag, "could not delete the failed snapshot again: {undo}");
                    }
                }
                Err(e)
            }
        }
    }
}

async fn collect<T: 'static>(mut tasks: tokio::task::JoinSet<(usize, T)>) -> Vec<T> {
    let mut out = Vec::new();
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(v) => out.push(v),
            Err(e) => tracing::error!("VM task failed: {e}"),
        }
    }
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, v)| v).collect()
}

/// The user gets the VM's runtime files QEMU made as root: the console socket and log
/// (`kubenet console`, `kubenet up`'s error report), the pidfile and the UEFI variables.
fn give_to(files: &VmFiles, (uid, gid): (u32, u32)) {
    for p in [files.serial_socket(), files.console_log(), files.qemu_log(), files.pidfile(), files.efi_vars()] {
        if p.exists()
            && let Err(e) = std::os::unix::fs::chown(&p, Some(uid), Some(gid))
        {
            tracing::debug!("cannot give {} to uid {uid}: {e}", p.display());
        }
    }
}
