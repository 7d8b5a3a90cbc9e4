//! The lab's lifecycle from the user's side: `setup`, `up`, `down`, `status`, `ssh`, `reset`,
//! `destroy`. These run as the user: files they make stay the user's, and what needs root
//! (starting QEMU, on macOS for vmnet) is asked of `kubenet serve` over its control socket.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kubenet_cluster::{Arch, Lab, Vm};
use kubenet_vm::keys::{self, LoginKey};
use kubenet_vm::{LabFiles, VmFiles};

use crate::cli::{DownArgs, SetupArgs, UpArgs};
use crate::control;
use crate::control::proto::{Answer, Request, RunState, StartOutcome};
use kubenet_vm::process::Stopped;

fn home() -> anyhow::Result<PathBuf> {
    std::env::home_dir().context("cannot tell your home directory (set HOME)")
}

pub(crate) use kubenet_cluster::state::unix_now as now;

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
        if keys::edit_locked(&path, |old| keys::add_include(old, &line))? {
            writeln!(out, "added `{line}` to {}: `ssh NAME` now reaches the lab", path.display())?;
        }
    }
    Ok(login)
}

/// The line `setup --ssh-include` adds to ~/.ssh/config and `destroy` takes out.
fn ssh_include_line(files: &LabFiles) -> anyhow::Result<String> {
    Ok(keys::include_line(&std::path::absolute(files.ssh_config())?))
}

/// `kubenet image pull [NAME...]`, with a progress bar on a terminal.
pub fn image_pull(lab: &Lab, names: &[String], out: &mut impl Write) -> anyhow::Result<()> {
    use kubenet_vm::image::{self, Pulled};
    for p in image::plan(lab, names, Arch::HOST)? {
        writeln!(out, "{} <- {}", p.path.display(), p.url)?;
        out.flush()?;
        let bar = indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                .expect("a valid template"),
        );
        let result = image::pull(&p, |done, total| {
            if let Some(t) = total {
                bar.set_length(t);
            }
            bar.set_position(done);
        });
        bar.finish_and_clear();
        match result? {
            Pulled::UpToDate => writeln!(out, "  up to date (SHA-256 matches)")?,
            Pulled::Downloaded { bytes, resumed_at: 0 } => {
                writeln!(out, "  downloaded {:.1} MiB, SHA-256 verified", mib(bytes))?
            }
            Pulled::Downloaded { bytes, resumed_at } => writeln!(
                out,
                "  downloaded {:.1} MiB (resumed at {:.1} MiB), SHA-256 verified",
                mib(bytes),
                mib(resumed_at)
            )?,
        }
    }
    Ok(())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

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

/// One row of `kubenet status` (and its `--json`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct StatusRow {
    pub name: String,
    pub role: String,
    /// "running" or "stopped".
    pub state: &'static str,
    pub pid: Option<u32>,
    pub mac: String,
    pub ip: std::net::Ipv4Addr,
    pub lease: Option<LeaseCell>,
    /// Port 22 answers.
    pub ssh: bool,
    pub uptime_secs: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LeaseCell {
    pub ip: std::net::Ipv4Addr,
    pub expires: Option<u64>,
}

/// The rows of `kubenet status` from the VMs' states, the lease table, which VMs answer on port
/// 22, and the time. Pure.
pub fn status_rows(
    lab: &Lab,
    states: &[crate::control::proto::VmState],
    leases: Option<&kubenet_dhcp::lease::LeaseTable>,
    ssh: &[bool],
    now: u64,
) -> Vec<StatusRow> {
    lab.vms
        .iter()
        .zip(states)
        .zip(ssh)
        .map(|((vm, s), &ssh)| {
            let lease = leases.and_then(|l| l.iter().find(|l| l.mac == vm.mac && l.active(now)));
            let (state, pid, since) = match s.run {
                RunState::Running { pid, since } => ("running", Some(pid), since),
                RunState::Stopped => ("stopped", None, None),
            };
            StatusRow {
                name: vm.name.clone(),
                role: vm.role.clone(),
                state,
                pid,
                mac: vm.mac.to_string(),
                ip: vm.ip,
                lease: lease.map(|l| LeaseCell { ip: l.ip, expires: l.expires }),
                ssh,
                uptime_secs: since.map(|since| now.saturating_sub(since)),
            }
        })
        .collect()
}

/// What `kubenet status` reads: the VM folders, the lease file and port 22 of each running VM.
/// Works whether or not `kubenet serve` runs.
fn read_status(lab: &Lab) -> Vec<StatusRow> {
    let t = now();
    let leases = kubenet_dhcp::lease::load(&lab.lease_file(), t).map(|(l, _)| l).ok();
    let states = crate::vms::states(lab);
    // Port 22 of every running VM at once: a busy guest (TCG, or a loaded host) may take a
    // second to answer, and seven of those one after another would make `status` slow.
    let ssh: Vec<bool> = std::thread::scope(|scope| {
        let probes: Vec<_> = states
            .iter()
            .zip(&lab.vms)
            .map(|(s, vm)| {
                let running = s.run.pid().is_some();
                let addr = SocketAddr::new(vm.ip.into(), 22);
                scope.spawn(move || running && TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok())
            })
            .collect();
        probes.into_iter().map(|p| p.join().unwrap_or(false)).collect()
    });
    status_rows(lab, &states, leases.as_ref(), &ssh, t)
}

pub fn status(lab: &Lab, json_out: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let rows = read_status(lab);
    if json_out {
        serde_json::to_writer_pretty(&mut *out, &rows).map_err(std::io::Error::from)?;
        writeln!(out)?;
        return Ok(());
    }
    let t = now();
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let lease = match &r.lease {
                None => "-".to_owned(),
                Some(LeaseCell { ip, expires: None }) => format!("{ip} (infinite)"),
                Some(LeaseCell { ip, expires: Some(e) }) => format!("{ip} ({} left)", short(e.saturating_sub(t))),
            };
            vec![
                r.name.clone(),
                r.role.clone(),
                r.state.to_owned(),
                r.pid.map_or("-".into(), |p| p.to_string()),
                r.mac.clone(),
                r.ip.to_string(),
                lease,
                if r.ssh { "yes".into() } else { "-".into() },
                r.uptime_secs.map_or("-".into(), short),
            ]
        })
        .collect();
    let header = ["NAME", "ROLE", "STATE", "PID", "MAC", "IP", "LEASE", "SSH", "UPTIME"];
    if lab.source == kubenet_cluster::Source::Embedded.to_string() {
        eprintln!(
            "(the built-in reference lab, state in {}: no kubenet.toml here, no --config or ${})",
            lab.state_dir.display(),
            kubenet_cluster::CONFIG_ENV
        );
    }
    write!(out, "{}", crate::table::columns(&header, &cells))?;
    Ok(())
}

/// "3h12m", "4m05s", "9s".
pub(crate) fn short(secs: u64) -> String {
    match secs {
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

/// `kubenet ssh NAME [-- CMD]`: replaces this process with ssh using the lab's ssh_config.
pub fn ssh(lab: &Lab, name: &str, command: &[String]) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let vm = lab.select(&[name.to_owned()]).map_err(crate::cli::unknown_vm)?[0];
    require_running(lab, vm)?;
    let config = LabFiles::new(lab).ssh_config();
    if !config.exists() {
        bail!("{} does not exist: run `kubenet setup` (or `kubenet up`) first", config.display());
    }
    let err = std::process::Command::new("ssh").arg("-F").arg(&config).arg(&vm.name).args(command).exec();
    Err(anyhow::Error::new(err).context("cannot run ssh"))
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
    let mut doomed: Vec<PathBuf> = lab.vms.iter().map(|vm| lab.vm_dir(vm)).collect();
    doomed.extend([
        lab.lease_file(),
        files.known_hosts(),
        files.ssh_config(),
        files.lab_key(),
        files.lab_key().with_extension("pub"),
        crate::snapshot::folder(lab),
    ]);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_rows_join_states_leases_and_ssh() {
        use crate::control::proto::VmState;
        let lab = kubenet_cluster::load(&kubenet_cluster::Choice::Embedded, Path::new("/lab")).unwrap();
        let states: Vec<VmState> = lab
            .vms
            .iter()
            .map(|vm| VmState {
                name: vm.name.clone(),
                run: if vm.name == "gateway" {
                    RunState::Running { pid: 42, since: Some(100) }
                } else {
                    RunState::Stopped
                },
            })
            .collect();
        let mut leases = kubenet_dhcp::lease::LeaseTable::default();
        let lease = |vm: &Vm, expires| kubenet_dhcp::lease::Lease {
            ip: vm.ip,
            mac: vm.mac,
            client_id: None,
            hostname: None,
            expires,
        };
        leases.insert(lease(&lab.vms[0], Some(1000)));
        leases.insert(lease(&lab.vms[1], Some(150)));
        let ssh: Vec<bool> = lab.vms.iter().map(|vm| vm.name == "gateway").collect();
        let rows = status_rows(&lab, &states, Some(&leases), &ssh, 200);
        assert_eq!(
            rows[0],
            StatusRow {
                name: "gateway".into(),
                role: "gateway".into(),
                state: "running",
                pid: Some(42),
                mac: "52:52:52:00:00:00".into(),
                ip: "192.168.1.10".parse().unwrap(),
                lease: Some(LeaseCell { ip: "192.168.1.10".parse().unwrap(), expires: Some(1000) }),
                ssh: true,
                uptime_secs: Some(100),
            }
        );
        // control0's lease ran out at 150: not shown at 200.
        assert_eq!((rows[1].state, rows[1].pid, rows[1].lease.clone(), rows[1].ssh), ("stopped", None, None, false));
        assert_eq!(rows.len(), 7);
        let json = serde_json::to_value(&rows[0]).unwrap();
        assert_eq!(json["lease"]["ip"], "192.168.1.10");
        assert_eq!(json["uptime_secs"], 100);
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
