//! The agent's VMs: `kubenet serve` starts and stops QEMU for the user (on macOS vmnet-shared
//! needs root), with the command line always built from the lab definition, never taken from a
//! request. State lives in each VM's folder (pidfile, QMP socket, console log), so an agent that
//! restarts finds its running VMs again instead of killing or duplicating them.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kubenet_cluster::Lab;
use kubenet_vm::VmFiles;
use kubenet_vm::live::LiveOp;
use kubenet_vm::owner::Owner;
use kubenet_vm::process::Launched;
use kubenet_vm::qemu::{DropTo, HostProfile};

use crate::proto::{StartOutcome, StartResult, StopResult, VmState};

pub struct Supervisor {
    lab: Arc<Mutex<Lab>>,
    /// The host profile, or why there is none (no QEMU, no firmware, ...): VM requests get that
    /// reason, DHCP and DNS run regardless.
    profile: Result<HostProfile, String>,
    /// The user the lab belongs to: QEMU and every file in the VMs' folders are theirs.
    owner: Owner,
    /// Linux with `serve`'s bridge: each VM's tap is made sure of before QEMU opens it, so VMs a
    /// reload added get one too.
    bridged: bool,
}

/// The host profile for starting `owner`'s VMs, logged; or why there is none.
fn detect(lab: &Lab, owner: &Owner) -> Result<HostProfile, String> {
    match HostProfile::detect(lab, Some(owner)) {
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
                        tracing::debug!(%arch, qemu = %g.qemu.display(), firmware = ?g.firmware, drop_to, owner = %owner.name, "VM guest profile");
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
    }
}

impl Supervisor {
    /// Looks at the host once (accelerator, firmware, QEMU version) for `owner`, the user the
    /// lab belongs to (None: that user could not be resolved, and no VM starts, with `why`).
    pub fn new(lab: Arc<Mutex<Lab>>, owner: Result<Owner, String>, bridged: bool) -> Self {
        let profile = match &owner {
            Ok(o) => detect(&lab.lock().expect("lab lock"), o),
            Err(why) => {
                tracing::warn!("VMs cannot be started by this agent: {why}");
                Err(why.clone())
            }
        };
        Supervisor {
            lab,
            profile,
            owner: owner.unwrap_or_else(|_| Owner::root()),
            bridged: bridged && cfg!(target_os = "linux"),
        }
    }

    fn lab(&self) -> Lab {
        self.lab.lock().expect("lab lock").clone()
    }

    pub fn states(&self) -> Vec<VmState> {
        kubenet_vm::process::states(&self.lab())
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
            let (lab, vm, profile, owner) = (lab.clone(), (*vm).clone(), profile.clone(), self.owner.clone());
            tasks.spawn_blocking(move || {
                if let Some(w) = kubenet_vm::qemu::emulation_warning(&vm, profile.arch) {
                    tracing::warn!("{w}");
                }
                let outcome = match kubenet_vm::process::launch(&lab, &vm, &profile, &owner) {
                    Ok(Launched::Running(pid)) => StartOutcome::Running { pid },
                    Ok(Launched::Started(pid)) => {
                        tracing::info!(vm = %vm.name, pid, "VM started");
                        StartOutcome::Started { pid }
                    }
                    Err(e) => {
                        let error = e.to_string();
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
            if crate::agent::hostnet::attach_tap(&lab.network.bridge, &tap, self.owner.uid).await? {
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
            let Some(pid) = kubenet_vm::process::running(&files) else {
                return Err(format!("{} is not running", vm.name));
            };
            targets.push(kubenet_vm::live::Target { name: vm.name.clone(), qmp: files.qmp_socket(), pid });
        }
        let start = std::time::Instant::now();
        match kubenet_vm::live::run(op, tag, &targets).await {
            Ok(done) => {
                tracing::info!(?op, tag, vms = done.len(), secs = start.elapsed().as_secs_f64(), "live snapshot");
                Ok(done)
            }
            Err(kubenet_vm::live::Partial { error, done }) => {
                tracing::warn!(?op, tag, "live snapshot failed: {error}");
                if op == LiveOp::Save && !done.is_empty() {
                    let reached: Vec<_> = targets.into_iter().filter(|t| done.contains(&t.name)).collect();
                    if let Err(undo) = kubenet_vm::live::run(LiveOp::Delete, tag, &reached).await {
                        tracing::warn!(tag, "could not delete the failed snapshot again: {}", undo.error);
                    }
                }
                Err(error.to_string())
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
