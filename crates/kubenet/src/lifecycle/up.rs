//! `kubenet up` and its wait until every VM answers SSH by name; `kubenet down`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kubenet_cluster::{Arch, Lab, Vm};
use kubenet_vm::keys::{self};
use kubenet_vm::process::Stopped;
use kubenet_vm::{LabFiles, VmFiles};

use crate::cli::{DownArgs, UpArgs};
use crate::control;
use crate::proto::{Answer, Request, StartOutcome};

use super::{now, setup};

/// `kubenet up`.
pub fn up(lab: &Lab, args: &UpArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let vms = lab.select(&args.setup.names).map_err(crate::cli::unknown_vm)?;
    if args.dry_run {
        let (profile, warning) = kubenet_vm::qemu::HostProfile::detect(lab, None)?;
        if let Some(w) = warning {
            eprintln!("warning: {w}");
        }
        for vm in &vms {
            if let Some(w) = kubenet_vm::qemu::emulation_warning(vm, profile.arch) {
                eprintln!("warning: {w}");
            }
            writeln!(out, "{}", kubenet_vm::qemu::shell_line(&kubenet_vm::qemu::argv(lab, vm, &profile)?))?;
        }
        return Ok(());
    }
    for w in vms.iter().filter_map(|vm| kubenet_vm::qemu::emulation_warning(vm, Arch::HOST)) {
        eprintln!("warning: {w}");
    }
    if let Some(host) = crate::doctor::host_memory() {
        for w in crate::doctor::memory_warnings(&vms, host) {
            eprintln!("warning: {w}");
        }
    }
    setup(lab, &args.setup, out)?;
    let names: Vec<&str> = vms.iter().map(|v| v.name.as_str()).collect();
    let started = Instant::now();
    let vms_asked = names.iter().map(|n| (*n).to_owned()).collect();
    let results = match control::request(&lab.state_dir, &Request::Start { vms: vms_asked })? {
        Answer::Started(r) => r,
        other => return Err(control::unexpected(other)),
    };
    let mut failed = Vec::new();
    for r in results {
        let name = r.name;
        match r.outcome {
            StartOutcome::Started { pid } => writeln!(out, "{name:<10} started (pid {pid})")?,
            StartOutcome::Running { pid } => writeln!(out, "{name:<10} running (pid {pid})")?,
            StartOutcome::Failed { error } => {
                writeln!(out, "{name:<10} failed: {error}")?;
                failed.push(name);
            }
        }
    }
    let waiting: Vec<&Vm> = vms.iter().copied().filter(|v| !failed.contains(&v.name)).collect();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let deadline = started + Duration::from_secs(args.timeout);
    let results = rt.block_on(wait_all(lab, &waiting, started, deadline, out))?;
    // Per VM that is not ready: why (grouped in the error's first line) and what to look at.
    let timed_out = format!("not ready after {} s", args.timeout);
    let console = |name: &str| {
        let vm = lab.vm_by_name(name).expect("a VM of the lab");
        let tail = kubenet_vm::process::console_tail(&VmFiles::new(lab, vm), 15);
        let (arch, image) = (vm.arch_on(Arch::HOST), kubenet_vm::files::base_image(lab, vm, Arch::HOST));
        format!("\n--- {name} (an {arch} guest, image {}): last console lines ---\n{tail}\n", image.display())
    };
    let mut problems: Vec<(String, &str, String)> =
        failed.iter().map(|name| (name.clone(), "did not start", console(name))).collect();
    for (vm, r) in waiting.iter().zip(results) {
        let name = vm.name.clone();
        match r {
            Readiness::Ready => {}
            Readiness::Late => problems.push((name.clone(), &timed_out, console(&name))),
            Readiness::Exited => {
                let log = std::fs::read_to_string(VmFiles::new(lab, vm).qemu_log()).unwrap_or_default();
                let detail = format!("{}--- {name}: qemu.log ---\n{}\n", console(&name), log.trim_end());
                problems.push((name, "QEMU exited", detail));
            }
            Readiness::NothingToBoot => {
                let arch = vm.arch_on(Arch::HOST);
                let image = kubenet_vm::files::base_image(lab, vm, Arch::HOST);
                let detail = format!(
                    "{}{name}: the {arch} firmware found nothing to boot: is {} an {arch} image? (its group says arch = \"{}\"; `kubenet down {name}` stops it)\n",
                    console(&name),
                    image.display(),
                    vm.arch.map_or("auto".into(), |a| a.to_string()),
                );
                problems.push((name, "found nothing to boot", detail));
            }
            Readiness::CloudInitFailed(status) => {
                let detail = format!("\n--- {name}: cloud-init status --long ---\n{}\n", status.trim_end());
                problems.push((name, "cloud-init reported errors", detail));
            }
        }
    }
    if problems.is_empty() {
        writeln!(out, "all {} VMs ready in {:.1} s: `kubenet ssh NAME`", vms.len(), started.elapsed().as_secs_f64())?;
        return Ok(());
    }
    let mut why: Vec<(&str, Vec<&str>)> = Vec::new();
    for (name, reason, _) in &problems {
        match why.iter_mut().find(|(r, _)| r == reason) {
            Some((_, names)) => names.push(name),
            None => why.push((reason, vec![name])),
        }
    }
    let why: Vec<String> = why.iter().map(|(r, names)| format!("{r}: {}", names.join(", "))).collect();
    let report: String = problems.iter().map(|(_, _, detail)| detail.as_str()).collect();
    bail!("{} of {} VMs {}{report}", problems.len(), vms.len(), why.join("; "))
}

/// How one VM's wait ended.
#[derive(Debug, PartialEq)]
enum Readiness {
    Ready,
    /// The deadline came first.
    Late,
    /// Its QEMU is gone (crashed, killed, or the guest powered off).
    Exited,
    /// The firmware gave up: no bootloader it can run (an image of another architecture).
    NothingToBoot,
    /// cloud-init ended with errors; its `status --long` text.
    CloudInitFailed(String),
}

/// Waits for every VM at once, printing each step as it happens. A wrong host key is an error
/// at once.
async fn wait_all(
    lab: &Lab,
    vms: &[&Vm],
    started: Instant,
    deadline: Instant,
    out: &mut impl Write,
) -> anyhow::Result<Vec<Readiness>> {
    let config = LabFiles::new(lab).ssh_config();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let mut expected = Vec::new();
    for vm in vms {
        let path = VmFiles::new(lab, vm).host_key();
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let key = russh::keys::PrivateKey::from_openssh(text).with_context(|| format!("{}", path.display()))?;
        expected.push(key.public_key().clone());
    }
    let work = futures_util::future::try_join_all(vms.iter().zip(&expected).map(|(vm, key)| {
        let say = tx.clone();
        let config = &config;
        async move {
            let say = |step: String| {
                let _ = say.send(format!("{:<10} {step} ({:.1} s)", vm.name, started.elapsed().as_secs_f64()));
            };
            wait_one(lab, vm, key, config, deadline, say).await
        }
    }));
    drop(tx);
    tokio::pin!(work);
    loop {
        tokio::select! {
            Some(line) = rx.recv() => writeln!(out, "{line}")?,
            done = &mut work => {
                while let Ok(line) = rx.try_recv() {
                    writeln!(out, "{line}")?;
                }
                return done;
            }
        }
    }
}

/// One VM's way to ready: its lease; its SSH server presenting the host key kubenet gave it;
/// then the end of cloud-init, asked over SSH with the lab's ssh_config. Until cloud-init ends
/// the guest is still changing itself (it restarts sshd when it edits sshd_config, for one), so
/// `up` returning before that would hand the user a VM that may refuse the next connection.
async fn wait_one(
    lab: &Lab,
    vm: &Vm,
    expected: &russh::keys::PublicKey,
    ssh_config: &Path,
    deadline: Instant,
    say: impl Fn(String),
) -> anyhow::Result<Readiness> {
    let pause = Duration::from_millis(500);
    let files = VmFiles::new(lab, vm);
    let gone = || kubenet_vm::process::running(&files).is_none();
    let stuck = || {
        let console = std::fs::read(files.console_log()).unwrap_or_default();
        kubenet_vm::process::found_nothing_to_boot(&String::from_utf8_lossy(&console))
    };
    for round in 0.. {
        if gone() {
            return Ok(Readiness::Exited);
        }
        // Before its lease a guest prints little: the firmware's and the kernel's lines.
        if round % 10 == 9 && stuck() {
            return Ok(Readiness::NothingToBoot);
        }
        let leases = kubenet_dhcp::lease::load(&lab.lease_file(), now()).map(|(t, _)| t).ok();
        if leases.is_some_and(|t| t.iter().any(|l| l.mac == vm.mac && l.ip == vm.ip && l.active(now()))) {
            say(format!("lease {}", vm.ip));
            break;
        }
        if Instant::now() + pause >= deadline {
            return Ok(Readiness::Late);
        }
        tokio::time::sleep(pause).await;
    }
    let addr = SocketAddr::new(vm.ip.into(), 22);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Readiness::Late);
        }
        if gone() {
            return Ok(Readiness::Exited);
        }
        // Firmware that found nothing on the disk may still have leased an address for a
        // network boot (edk2's PXE) before it gave up.
        if stuck() {
            return Ok(Readiness::NothingToBoot);
        }
        if let Ok(key) = keys::fetch_host_key(addr, left.min(Duration::from_secs(5))).await {
            if key.key_data() != expected.key_data() {
                bail!(
                    "{}: the SSH server at {addr} presents a host key kubenet did not give it ({}): \
                     another machine has this address, or the VM was not set up by kubenet",
                    vm.name,
                    key.fingerprint(Default::default())
                );
            }
            say("ssh ready".into());
            break;
        }
        tokio::time::sleep(pause).await;
    }
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Readiness::Late);
        }
        let mut ssh = tokio::process::Command::new("ssh");
        ssh.arg("-F")
            .arg(ssh_config)
            .args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=5", &vm.name])
            .args(["cloud-init", "status", "--wait", "--long"])
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let verdict = match tokio::time::timeout(left, ssh.output()).await {
            Err(_) => return Ok(Readiness::Late),
            Ok(Err(e)) => CloudInit::Unknown(format!("cannot run ssh: {e}")),
            Ok(Ok(o)) => cloud_init_verdict(
                o.status.code(),
                &String::from_utf8_lossy(&o.stdout),
                &String::from_utf8_lossy(&o.stderr),
            ),
        };
        match verdict {
            CloudInit::Done => {
                say("cloud-init done".into());
                return Ok(Readiness::Ready);
            }
            CloudInit::Degraded => {
                say(format!("cloud-init done with warnings (`kubenet ssh {} -- cloud-init status --long`)", vm.name));
                return Ok(Readiness::Ready);
            }
            CloudInit::Failed(detail) => {
                say("cloud-init failed".into());
                return Ok(Readiness::CloudInitFailed(detail));
            }
            CloudInit::Unknown(why) => {
                say(format!("not waiting for cloud-init: {why}"));
                return Ok(Readiness::Ready);
            }
            CloudInit::Retry if gone() => return Ok(Readiness::Exited),
            CloudInit::Retry => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

/// What one `ssh VM cloud-init status --wait --long` said.
#[derive(Debug, PartialEq)]
enum CloudInit {
    Done,
    /// Done with recoverable errors (exit 2, cloud-init 23.4 and later).
    Degraded,
    /// Ended with errors (exit 1): the status text.
    Failed(String),
    /// The connection failed (sshd not up yet, or restarting): ask again.
    Retry,
    /// Cannot be told without a prompt: readiness stops at SSH.
    Unknown(String),
}

/// Reads the exit of `ssh ... cloud-init status --wait --long`: 255 is ssh's own failure, where
/// an authentication refusal will not mend itself (a key with a passphrase and no agent) but a
/// refused or dropped connection will; 127 is a guest without cloud-init; the rest is
/// cloud-init's (0 done, 1 error, 2 recoverable errors).
fn cloud_init_verdict(code: Option<i32>, stdout: &str, stderr: &str) -> CloudInit {
    match code {
        Some(0) => CloudInit::Done,
        Some(2) => CloudInit::Degraded,
        Some(255) if stderr.contains("Permission denied") => CloudInit::Unknown(format!(
            "ssh cannot log in without a prompt ({}); a key with a passphrase needs ssh-agent",
            stderr.trim()
        )),
        Some(255) if stderr.contains("Host key verification failed") => CloudInit::Unknown(stderr.trim().to_owned()),
        Some(255) | None => CloudInit::Retry,
        Some(127) => CloudInit::Unknown("the guest has no `cloud-init` command".into()),
        Some(_) => CloudInit::Failed(format!("{stdout}{stderr}")),
    }
}

/// `kubenet down`.
pub fn down(lab: &Lab, args: &DownArgs, out: &mut impl Write) -> anyhow::Result<()> {
    lab.select(&args.names).map_err(crate::cli::unknown_vm)?;
    let req = Request::Stop { vms: args.names.clone(), grace_secs: Some(args.grace) };
    let results = match control::request(&lab.state_dir, &req)? {
        Answer::Stopped(r) => r,
        other => return Err(control::unexpected(other)),
    };
    for r in results {
        let how = match r.result {
            Stopped::NotRunning => "not running",
            Stopped::Powerdown => "powered off",
            Stopped::Terminated => "stopped (SIGTERM after the grace time)",
            Stopped::Killed => "killed",
        };
        writeln!(out, "{:<10} {how}", r.name)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloud_init_status_exits_are_read() {
        assert_eq!(cloud_init_verdict(Some(0), "status: done\n", ""), CloudInit::Done);
        assert_eq!(cloud_init_verdict(Some(2), "status: done\n", ""), CloudInit::Degraded);
        let failed = cloud_init_verdict(Some(1), "status: error\nerrors:\n\t- runcmd failed\n", "");
        assert_eq!(failed, CloudInit::Failed("status: error\nerrors:\n\t- runcmd failed\n".into()));
        // sshd restarting or not up yet: ask again.
        let refused = "ssh: connect to host 192.168.1.14 port 22: Connection refused\n";
        assert_eq!(cloud_init_verdict(Some(255), "", refused), CloudInit::Retry);
        assert_eq!(cloud_init_verdict(Some(255), "", "Connection closed by 192.168.1.14 port 22\n"), CloudInit::Retry);
        assert_eq!(cloud_init_verdict(None, "", ""), CloudInit::Retry);
        // Will not mend by waiting.
        let denied = "worker0@192.168.1.14: Permission denied (publickey).\n";
        let CloudInit::Unknown(why) = cloud_init_verdict(Some(255), "", denied) else { panic!() };
        assert!(why.contains("Permission denied (publickey)") && why.contains("ssh-agent"), "{why}");
        let CloudInit::Unknown(why) = cloud_init_verdict(Some(255), "", "Host key verification failed.\n") else {
            panic!()
        };
        assert_eq!(why, "Host key verification failed.");
        let CloudInit::Unknown(why) = cloud_init_verdict(Some(127), "", "sh: cloud-init: not found\n") else {
            panic!()
        };
        assert!(why.contains("no `cloud-init`"), "{why}");
    }
}
