//! The lab's lifecycle from the user's side: `setup`, `up`, `down`, `status`, `ssh`, `reset`,
//! `destroy`. These run as the user: files they make stay the user's, and what needs root
//! (starting QEMU, on macOS for vmnet) is asked of `kubenet serve` over its control socket.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use kubenet_cluster::{Lab, Vm};
use kubenet_vm::keys::{self, LoginKey};
use kubenet_vm::{LabFiles, VmFiles};
use serde_json::{Value, json};

use crate::cli::{DownArgs, SetupArgs, UpArgs};
use crate::control;

fn home() -> anyhow::Result<PathBuf> {
    std::env::home_dir().context("cannot tell your home directory (set HOME)")
}

fn now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `kubenet setup`: prepares the VMs and writes the lab's SSH files. Returns the login key.
pub fn setup(lab: &Lab, args: &SetupArgs, out: &mut impl Write) -> anyhow::Result<LoginKey> {
    let vms = lab.select(&args.names).map_err(anyhow::Error::msg)?;
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
    for p in image::plan(lab, names, image::host_arch())? {
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
            Pulled::Downloaded(n) => writeln!(out, "  downloaded {:.1} MiB, SHA-256 verified", n as f64 / 1048576.0)?,
        }
    }
    Ok(())
}

/// `kubenet up`.
pub fn up(lab: &Lab, args: &UpArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let vms = lab.select(&args.setup.names).map_err(anyhow::Error::msg)?;
    if args.dry_run {
        let (profile, warning) = kubenet_vm::qemu::HostProfile::detect(lab, None)?;
        if let Some(w) = warning {
            eprintln!("warning: {w}");
        }
        for vm in &vms {
            writeln!(out, "{}", kubenet_vm::qemu::shell_line(&kubenet_vm::qemu::argv(lab, vm, &profile)))?;
        }
        return Ok(());
    }
    setup(lab, &args.setup, out)?;
    let names: Vec<&str> = vms.iter().map(|v| v.name.as_str()).collect();
    let started = Instant::now();
    let answer = control::request(&lab.state_dir, &json!({"cmd": "start", "vms": names}))?;
    let mut failed = Vec::new();
    for v in answer["vms"].as_array().into_iter().flatten() {
        let name = v["name"].as_str().unwrap_or("?");
        match (v["result"].as_str(), v["error"].as_str()) {
            (Some(r), _) => writeln!(out, "{name:<10} {r} (pid {})", v["pid"])?,
            (None, e) => {
                writeln!(out, "{name:<10} failed: {}", e.unwrap_or("?"))?;
                failed.push(name.to_owned());
            }
        }
    }
    let waiting: Vec<&Vm> = vms.iter().copied().filter(|v| !failed.contains(&v.name)).collect();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let late = rt.block_on(wait_ready(lab, &waiting, started, Duration::from_secs(args.timeout), out))?;
    if failed.is_empty() && late.is_empty() {
        writeln!(out, "all {} VMs ready in {:.1} s: `kubenet ssh NAME`", vms.len(), started.elapsed().as_secs_f64())?;
        return Ok(());
    }
    let mut report = String::new();
    for name in late.iter().chain(&failed) {
        let vm = lab.vm_by_name(name).expect("a VM of the lab");
        let tail = kubenet_vm::process::console_tail(&VmFiles::new(lab, vm), 15);
        report.push_str(&format!("\n--- {name}: last console lines ---\n{tail}\n"));
    }
    bail!(
        "{} of {} VMs not ready after {} s: {}{report}",
        late.len() + failed.len(),
        vms.len(),
        args.timeout,
        late.iter().chain(&failed).cloned().collect::<Vec<_>>().join(", ")
    )
}

/// Waits until each VM has its lease and presents the host key kubenet gave it. Returns the
/// names that were not ready in time; a wrong host key is an error at once.
async fn wait_ready(
    lab: &Lab,
    vms: &[&Vm],
    started: Instant,
    timeout: Duration,
    out: &mut impl Write,
) -> anyhow::Result<Vec<String>> {
    let mut expected = Vec::new();
    for vm in vms {
        let path = VmFiles::new(lab, vm).host_key();
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let key = russh::keys::PrivateKey::from_openssh(text).with_context(|| format!("{}", path.display()))?;
        expected.push(key.public_key().clone());
    }
    let mut leased = vec![false; vms.len()];
    let mut ready = vec![false; vms.len()];
    let deadline = started + timeout;
    while ready.iter().any(|r| !r) && Instant::now() < deadline {
        let leases = kubenet_dhcp::lease::load(&lab.lease_file(), now()).map(|(t, _)| t).ok();
        for (i, vm) in vms.iter().enumerate() {
            if !leased[i]
                && let Some(t) = &leases
                && t.iter().any(|l| l.mac == vm.mac && l.ip == vm.ip && l.active(now()))
            {
                leased[i] = true;
                writeln!(out, "{:<10} lease {} ({:.1} s)", vm.name, vm.ip, started.elapsed().as_secs_f64())?;
            }
            if leased[i] && !ready[i] {
                let addr = SocketAddr::new(vm.ip.into(), 22);
                if let Ok(key) = keys::fetch_host_key(addr, Duration::from_secs(5)).await {
                    if key.key_data() != expected[i].key_data() {
                        bail!(
                            "{}: the SSH server at {addr} presents a host key kubenet did not give it ({}): \
                             another machine has this address, or the VM was not set up by kubenet",
                            vm.name,
                            key.fingerprint(Default::default())
                        );
                    }
                    ready[i] = true;
                    writeln!(out, "{:<10} ssh ready ({:.1} s)", vm.name, started.elapsed().as_secs_f64())?;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(vms.iter().zip(&ready).filter(|(_, r)| !**r).map(|(v, _)| v.name.clone()).collect())
}

/// `kubenet down`.
pub fn down(lab: &Lab, args: &DownArgs, out: &mut impl Write) -> anyhow::Result<()> {
    lab.select(&args.names).map_err(anyhow::Error::msg)?;
    let answer =
        control::request(&lab.state_dir, &json!({"cmd": "stop", "vms": args.names, "grace_secs": args.grace}))?;
    for v in answer["vms"].as_array().into_iter().flatten() {
        let how = match v["result"].as_str() {
            Some("notrunning") => "not running",
            Some("powerdown") => "powered off",
            Some("terminated") => "stopped (SIGTERM after the grace time)",
            Some("killed") => "killed",
            _ => "?",
        };
        writeln!(out, "{:<10} {how}", v["name"].as_str().unwrap_or("?"))?;
    }
    Ok(())
}

/// One row of `kubenet status`, read from the VM's folder and the lease file: works whether or
/// not `kubenet serve` runs.
pub fn status_rows(lab: &Lab) -> Vec<Value> {
    let t = now();
    let leases = kubenet_dhcp::lease::load(&lab.lease_file(), t).map(|(l, _)| l).ok();
    crate::vms::states(lab)
        .into_iter()
        .zip(&lab.vms)
        .map(|(mut s, vm)| {
            let lease = leases.as_ref().and_then(|l| l.iter().find(|l| l.mac == vm.mac && l.active(t)).cloned());
            let running = s["state"] == "running";
            let ssh = running
                && TcpStream::connect_timeout(&SocketAddr::new(vm.ip.into(), 22), Duration::from_millis(300)).is_ok();
            let uptime = s["since"].as_u64().map(|since| t.saturating_sub(since));
            s["role"] = vm.role.clone().into();
            s["mac"] = vm.mac.to_string().into();
            s["ip"] = vm.ip.to_string().into();
            s["lease"] = match &lease {
                None => Value::Null,
                Some(l) => json!({"ip": l.ip, "expires": l.expires}),
            };
            s["ssh"] = ssh.into();
            s["uptime_secs"] = uptime.into();
            if let Value::Object(m) = &mut s {
                m.remove("since");
            }
            s
        })
        .collect()
}

pub fn status(lab: &Lab, json_out: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let rows = status_rows(lab);
    if json_out {
        serde_json::to_writer_pretty(&mut *out, &rows).map_err(std::io::Error::from)?;
        writeln!(out)?;
        return Ok(());
    }
    let t = now();
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap_or("-").to_owned();
            let lease = match &r["lease"] {
                Value::Null => "-".to_owned(),
                l => match l["expires"].as_u64() {
                    None => format!("{} (infinite)", l["ip"].as_str().unwrap_or("?")),
                    Some(e) => format!("{} ({} left)", l["ip"].as_str().unwrap_or("?"), short(e.saturating_sub(t))),
                },
            };
            vec![
                s("name"),
                s("role"),
                s("state"),
                r["pid"].as_u64().map_or("-".into(), |p| p.to_string()),
                s("mac"),
                s("ip"),
                lease,
                if r["ssh"] == true { "yes".into() } else { "-".into() },
                r["uptime_secs"].as_u64().map_or("-".into(), short),
            ]
        })
        .collect();
    let header = ["NAME", "ROLE", "STATE", "PID", "MAC", "IP", "LEASE", "SSH", "UPTIME"];
    write!(out, "{}", crate::table::columns(&header, &cells))?;
    Ok(())
}

/// "3h12m", "4m05s", "9s".
fn short(secs: u64) -> String {
    match secs {
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

/// `kubenet ssh NAME [-- CMD]`: replaces this process with ssh using the lab's ssh_config.
pub fn ssh(lab: &Lab, name: &str, command: &[String]) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let vm = lab.select(&[name.to_owned()]).map_err(anyhow::Error::msg)?[0];
    let config = LabFiles::new(lab).ssh_config();
    if !config.exists() {
        bail!("{} does not exist: run `kubenet setup` (or `kubenet up`) first", config.display());
    }
    let err = std::process::Command::new("ssh").arg("-F").arg(&config).arg(&vm.name).args(command).exec();
    Err(anyhow::Error::new(err).context("cannot run ssh"))
}

fn refuse_running(lab: &Lab, vms: &[&Vm], what: &str) -> anyhow::Result<()> {
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
    let vms = lab.select(names).map_err(anyhow::Error::msg)?;
    refuse_running(lab, &vms, "reset")?;
    for vm in vms {
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
