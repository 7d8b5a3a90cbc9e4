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
use crate::client;
use crate::proto::{Answer, Request, StartOutcome};

use super::{now, setup};

/// `kubenet up`.
pub fn up(lab: &Lab, args: &UpArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let vms = lab.select(&args.setup.names).map_err(crate::cli::unknown_vm)?;
    if args.dry_run {
        return dry_run(lab, &vms, out);
    }
    for w in vms.iter().filter_map(|vm| kubenet_vm::qemu::emulation_warning(vm, Arch::HOST)) {
        eprintln!("warning: {w}");
    }
    if let Some(host) = crate::commands::doctor::host_memory() {
        for w in crate::commands::doctor::memory_warnings(&vms, host) {
            eprintln!("warning: {w}");
        }
    }
    setup(lab, &args.setup, out)?;
    let started = Instant::now();
    let failed = start(lab, &vms, out)?;
    let waiting: Vec<&Vm> = vms.iter().copied().filter(|v| !failed.contains(&v.name)).collect();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let deadline = started + Duration::from_secs(args.timeout);
    let results = rt.block_on(wait_all(lab, &waiting, started, deadline, out))?;
    let ends = failed
        .iter()
        .map(|name| (lab.vm_by_name(name).expect("a VM of the lab"), End::DidNotStart))
        .chain(waiting.iter().copied().zip(results).map(|(vm, r)| (vm, End::Waited(r))));
    let troubles: Vec<Trouble> =
        ends.filter_map(|(vm, end)| trouble(vm, end, &Evidence::of(lab, vm), args.timeout)).collect();
    match failure_report(vms.len(), &troubles) {
        None => {
            writeln!(
                out,
                "all {} VMs ready in {:.1} s: `kubenet ssh NAME`",
                vms.len(),
                started.elapsed().as_secs_f64()
            )?;
            Ok(())
        }
        Some(report) => bail!("{report}"),
    }
}

/// `kubenet up --dry-run`: each VM's QEMU command line, started by nothing.
fn dry_run(lab: &Lab, vms: &[&Vm], out: &mut impl Write) -> anyhow::Result<()> {
    let (profile, warning) = kubenet_vm::qemu::HostProfile::detect(lab, None)?;
    if let Some(w) = warning {
        eprintln!("warning: {w}");
    }
    for vm in vms {
        if let Some(w) = kubenet_vm::qemu::emulation_warning(vm, profile.arch) {
            eprintln!("warning: {w}");
        }
        writeln!(out, "{}", kubenet_vm::qemu::shell_line(&kubenet_vm::qemu::argv(lab, vm, &profile)?))?;
    }
    Ok(())
}

/// Asks `serve` to start the VMs, printing each one's outcome; returns those that failed.
fn start(lab: &Lab, vms: &[&Vm], out: &mut impl Write) -> anyhow::Result<Vec<String>> {
    let asked = vms.iter().map(|v| v.name.clone()).collect();
    let results = match client::request(&lab.state_dir, &Request::Start { vms: asked })? {
        Answer::Started(r) => r,
        other => return Err(client::unexpected(other)),
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
    Ok(failed)
}

/// How `up` ended for one VM.
#[derive(Debug, PartialEq)]
enum End {
    DidNotStart,
    Waited(Readiness),
}

/// What `up` shows of a VM that is not ready, read from its folder.
#[derive(Debug, Default)]
struct Evidence {
    console_tail: String,
    qemu_log: String,
    arch: Option<Arch>,
    image: std::path::PathBuf,
}

impl Evidence {
    fn of(lab: &Lab, vm: &Vm) -> Self {
        let files = VmFiles::new(lab, vm);
        Evidence {
            console_tail: kubenet_vm::process::console_tail(&files, 15),
            qemu_log: std::fs::read_to_string(files.qemu_log()).unwrap_or_default(),
            arch: Some(vm.arch_on(Arch::HOST)),
            image: kubenet_vm::files::base_image(lab, vm, Arch::HOST),
        }
    }
}

/// A VM that is not ready: the reason (grouped in the error's first line) and what to look at.
#[derive(Debug, PartialEq)]
struct Trouble {
    name: String,
    reason: String,
    detail: String,
}

/// Why `vm` is not ready, with the evidence that tells the user what to do; None when it is.
fn trouble(vm: &Vm, end: End, ev: &Evidence, timeout_secs: u64) -> Option<Trouble> {
    let name = &vm.name;
    let arch = ev.arch.map_or_else(|| "host".to_owned(), |a| a.to_string());
    let console = format!(
        "\n--- {name} (an {arch} guest, image {}): last console lines ---\n{}\n",
        ev.image.display(),
        ev.console_tail
    );
    let (reason, detail) = match end {
        End::Waited(Readiness::Ready) => return None,
        End::DidNotStart => ("did not start".to_owned(), console),
        End::Waited(Readiness::Late) => (format!("not ready after {timeout_secs} s"), console),
        End::Waited(Readiness::Exited) => {
            ("QEMU exited".to_owned(), format!("{console}--- {name}: qemu.log ---\n{}\n", ev.qemu_log.trim_end()))
        }
        End::Waited(Readiness::NothingToBoot) => (
            "found nothing to boot".to_owned(),
            format!(
                "{console}{name}: the {arch} firmware found nothing to boot: is {} an {arch} image? (its group says arch = \"{}\"; `kubenet down {name}` stops it)\n",
                ev.image.display(),
                vm.arch.map_or("auto".into(), |a| a.to_string()),
            ),
        ),
        End::Waited(Readiness::CloudInitFailed(status)) => (
            "cloud-init reported errors".to_owned(),
            format!("\n--- {name}: cloud-init status --long ---\n{}\n", status.trim_end()),
        ),
    };
    Some(Trouble { name: name.clone(), reason, detail })
}

/// The error `up` ends with when VMs are not ready: how many of `total`, the reasons with the
/// VMs each (first line), then each VM's evidence. None when nothing is wrong.
fn failure_report(total: usize, troubles: &[Trouble]) -> Option<String> {
    if troubles.is_empty() {
        return None;
    }
    let mut why: Vec<(&str, Vec<&str>)> = Vec::new();
    for t in troubles {
        match why.iter_mut().find(|(r, _)| *r == t.reason) {
            Some((_, names)) => names.push(&t.name),
            None => why.push((&t.reason, vec![&t.name])),
        }
    }
    let why: Vec<String> = why.iter().map(|(r, names)| format!("{r}: {}", names.join(", "))).collect();
    let report: String = troubles.iter().map(|t| t.detail.as_str()).collect();
    Some(format!("{} of {total} VMs {}{report}", troubles.len(), why.join("; ")))
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
    let watch = Watch { files: VmFiles::new(lab, vm), deadline };
    if let Some(end) = wait_for_lease(lab, vm, &watch, &say).await {
        return Ok(end);
    }
    if let Some(end) = wait_for_ssh(vm, expected, &watch, &say).await? {
        return Ok(end);
    }
    Ok(wait_for_cloud_init(vm, ssh_config, &watch, &say).await)
}

/// What every step of a VM's wait watches besides its own goal.
struct Watch {
    files: VmFiles,
    deadline: Instant,
}

const PAUSE: Duration = Duration::from_millis(500);

impl Watch {
    /// Its QEMU is gone.
    fn gone(&self) -> bool {
        kubenet_vm::process::running(&self.files).is_none()
    }

    /// The firmware says it found nothing to boot.
    fn stuck(&self) -> bool {
        let console = std::fs::read(self.files.console_log()).unwrap_or_default();
        kubenet_vm::process::found_nothing_to_boot(&String::from_utf8_lossy(&console))
    }

    fn left(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }
}

/// Until the lease file holds the VM's address for its MAC. None: go on; else how it ended.
async fn wait_for_lease(lab: &Lab, vm: &Vm, watch: &Watch, say: &impl Fn(String)) -> Option<Readiness> {
    for round in 0u64.. {
        if watch.gone() {
            return Some(Readiness::Exited);
        }
        // Before its lease a guest prints little: the firmware's and the kernel's lines.
        if round % 10 == 9 && watch.stuck() {
            return Some(Readiness::NothingToBoot);
        }
        let leases = kubenet_dhcp::lease::load(&lab.lease_file(), now()).map(|(t, _)| t).ok();
        if leases.is_some_and(|t| t.iter().any(|l| l.mac == vm.mac && l.ip == vm.ip && l.active(now()))) {
            say(format!("lease {}", vm.ip));
            return None;
        }
        if watch.left() <= PAUSE {
            return Some(Readiness::Late);
        }
        tokio::time::sleep(PAUSE).await;
    }
    Some(Readiness::Late)
}

/// Until the VM's SSH server presents the host key kubenet gave it; another key is an error.
async fn wait_for_ssh(
    vm: &Vm,
    expected: &russh::keys::PublicKey,
    watch: &Watch,
    say: &impl Fn(String),
) -> anyhow::Result<Option<Readiness>> {
    let addr = SocketAddr::new(vm.ip.into(), 22);
    loop {
        let left = watch.left();
        if left.is_zero() {
            return Ok(Some(Readiness::Late));
        }
        if watch.gone() {
            return Ok(Some(Readiness::Exited));
        }
        // Firmware that found nothing on the disk may still have leased an address for a
        // network boot (edk2's PXE) before it gave up.
        if watch.stuck() {
            return Ok(Some(Readiness::NothingToBoot));
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
            return Ok(None);
        }
        tokio::time::sleep(PAUSE).await;
    }
}

/// Until cloud-init has ended, asked over SSH.
async fn wait_for_cloud_init(vm: &Vm, ssh_config: &Path, watch: &Watch, say: &impl Fn(String)) -> Readiness {
    loop {
        let left = watch.left();
        if left.is_zero() {
            return Readiness::Late;
        }
        let mut ssh = tokio::process::Command::new("ssh");
        ssh.arg("-F")
            .arg(ssh_config)
            .args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=5", &vm.name])
            .args(["cloud-init", "status", "--wait", "--long"])
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let verdict = match tokio::time::timeout(left, ssh.output()).await {
            Err(_) => return Readiness::Late,
            Ok(Err(e)) => CloudInit::Unknown(format!("cannot run ssh: {e}")),
            Ok(Ok(o)) => cloud_init_verdict(
                o.status.code(),
                &String::from_utf8_lossy(&o.stdout),
                &String::from_utf8_lossy(&o.stderr),
            ),
        };
        match verdict {
            CloudInit::Done => say("cloud-init done".into()),
            CloudInit::Degraded => {
                say(format!("cloud-init done with warnings (`kubenet ssh {} -- cloud-init status --long`)", vm.name))
            }
            CloudInit::Failed(detail) => {
                say("cloud-init failed".into());
                return Readiness::CloudInitFailed(detail);
            }
            CloudInit::Unknown(why) => say(format!("not waiting for cloud-init: {why}")),
            CloudInit::Retry if watch.gone() => return Readiness::Exited,
            CloudInit::Retry => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        }
        return Readiness::Ready;
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
    let results = match client::request(&lab.state_dir, &req)? {
        Answer::Stopped(r) => r,
        other => return Err(client::unexpected(other)),
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

    fn lab() -> Lab {
        kubenet_cluster::load(&kubenet_cluster::Choice::Embedded, Path::new("/lab")).unwrap()
    }

    fn evidence() -> Evidence {
        Evidence {
            console_tail: "BdsDxe: No bootable option".into(),
            qemu_log: "qemu: terminating on signal 15\n".into(),
            arch: Some(Arch::Aarch64),
            image: "/lab/images/x.img".into(),
        }
    }

    #[test]
    fn each_way_a_vm_fails_says_why_and_shows_what_to_look_at() {
        let lab = lab();
        let vm = lab.vm_by_name("worker1").unwrap();
        let ev = evidence();
        assert_eq!(trouble(vm, End::Waited(Readiness::Ready), &ev, 600), None);
        let t = |end| trouble(vm, end, &ev, 600).unwrap();
        let late = t(End::Waited(Readiness::Late));
        assert_eq!(late.reason, "not ready after 600 s");
        assert!(
            late.detail
                .contains("--- worker1 (an aarch64 guest, image /lab/images/x.img): last console lines ---\nBdsDxe")
        );
        assert!(
            t(End::Waited(Readiness::Exited))
                .detail
                .contains("--- worker1: qemu.log ---\nqemu: terminating on signal 15\n")
        );
        let boot = t(End::Waited(Readiness::NothingToBoot));
        assert_eq!(boot.reason, "found nothing to boot");
        assert!(
            boot.detail.contains("is /lab/images/x.img an aarch64 image? (its group says arch = \"auto\""),
            "{}",
            boot.detail
        );
        let ci = t(End::Waited(Readiness::CloudInitFailed("status: error\n".into())));
        assert_eq!(
            (ci.reason.as_str(), ci.detail.as_str()),
            ("cloud-init reported errors", "\n--- worker1: cloud-init status --long ---\nstatus: error\n")
        );
        assert_eq!(t(End::DidNotStart).reason, "did not start");
    }

    #[test]
    fn the_report_groups_reasons_in_its_first_line() {
        assert_eq!(failure_report(7, &[]), None);
        let t = |name: &str, reason: &str| Trouble {
            name: name.into(),
            reason: reason.into(),
            detail: format!("[{name}]"),
        };
        let report = failure_report(
            7,
            &[t("worker0", "not ready after 9 s"), t("worker1", "QEMU exited"), t("worker2", "not ready after 9 s")],
        )
        .unwrap();
        assert_eq!(
            report,
            "3 of 7 VMs not ready after 9 s: worker0, worker2; QEMU exited: worker1[worker0][worker1][worker2]"
        );
    }

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
