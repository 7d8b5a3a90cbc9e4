//! `kubenet snapshot save|list|restore|delete`: the whole lab (or `--vm` VMs) at one step of
//! the tutorial, and back to it. Stopped VMs are the work of [`kubenet_vm::snapshot::Store`]
//! (qemu-img on the disks); running VMs (`--live`) are `serve`'s, over QMP, since it owns their
//! QEMUs. Here: which path, the checks against running VMs and `serve`, progress, and the
//! guests' clocks after a live restore.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kubenet_cluster::{Lab, Vm};
use kubenet_vm::VmFiles;
use kubenet_vm::live::LiveOp;
use kubenet_vm::snapshot::{Manifest, Store, VmEntry};

use crate::cli::SnapshotAction;
use crate::client;
use crate::commands::lifecycle::{now, refuse_running, short};
use crate::proto::{Answer, Request, StartOutcome};

pub fn run(lab: &Lab, action: &SnapshotAction, out: &mut impl Write) -> anyhow::Result<()> {
    let store = Store::new(lab);
    match action {
        SnapshotAction::Save { name, vms, live: false } => save(lab, &store, name, vms, out),
        SnapshotAction::Save { name, vms, live: true } => save_live(lab, &store, name, vms, out),
        SnapshotAction::List { json } => list(&store, *json, out),
        SnapshotAction::Restore { name, vms } => restore(lab, &store, name, vms, out),
        SnapshotAction::Delete { name, vms } => delete(lab, &store, name, vms, out),
    }
}

fn save(lab: &Lab, store: &Store, name: &str, names: &[String], out: &mut impl Write) -> anyhow::Result<()> {
    kubenet_vm::snapshot::check_name(name)?;
    let vms = lab.select(names).map_err(crate::cli::unknown_vm)?;
    refuse_running(lab, &vms, &format!("snapshot save {name} (or keep them running and add --live)"))?;
    let start = Instant::now();
    let m = store
        .save(name, &vms, now(), &mut |e| {
            let _ = writeln!(out, "{:<10} saved ({} allocated)", e.name, size(e.disk_bytes));
        })
        .with_context(|| format!("snapshot {name} not taken, and nothing of it kept"))?;
    writeln!(out, "snapshot {name}: {} VMs in {:.2} s", m.vms.len(), start.elapsed().as_secs_f64())?;
    Ok(())
}

fn running(lab: &Lab, vm: &Vm) -> bool {
    kubenet_vm::process::running(&VmFiles::new(lab, vm)).is_some()
}

fn names(vms: &[&Vm]) -> Vec<String> {
    vms.iter().map(|vm| vm.name.clone()).collect()
}

/// `serve` answers on its control socket, or an error saying why `what` needs it.
fn require_serve(lab: &Lab, what: &str) -> anyhow::Result<()> {
    client::status(&lab.state_dir).with_context(|| format!("{what} needs kubenet serve"))?;
    Ok(())
}

/// `save --live`: the lab as it is. `serve` pauses every running VM, saves each one's disk and
/// memory into its disk, and resumes them all (a bar follows the bytes landing in the disks
/// against the guests' memory); the stopped VMs' disks are saved as `save` does. All or
/// nothing.
fn save_live(lab: &Lab, store: &Store, name: &str, names_asked: &[String], out: &mut impl Write) -> anyhow::Result<()> {
    kubenet_vm::snapshot::check_name(name)?;
    let asked = lab.select(names_asked).map_err(crate::cli::unknown_vm)?;
    // A VM never set up (`kubenet up gateway control0` prepares those two alone) has no disk
    // to save: the lab as it is has none of it.
    let (vms, unmade): (Vec<&Vm>, Vec<&Vm>) =
        asked.iter().partition(|vm| running(lab, vm) || VmFiles::new(lab, vm).disk().exists());
    if vms.is_empty() {
        bail!("no VM of these has a disk yet: `kubenet up` (or `kubenet setup`) makes them");
    }
    let (up, down): (Vec<&Vm>, Vec<&Vm>) = vms.iter().partition(|vm| running(lab, vm));
    if !up.is_empty() {
        require_serve(lab, "a live snapshot")?;
    }
    store.begin(name, &vms)?;
    let disks: Vec<PathBuf> = up.iter().map(|vm| VmFiles::new(lab, vm).disk()).collect();
    let before = allocated(&disks);
    let memory: u64 = up.iter().map(|vm| vm.memory.0).sum();
    let start = Instant::now();
    let saved = if up.is_empty() {
        Ok(Answer::Snapshot(Vec::new()))
    } else {
        let req = Request::Snapshot { op: LiveOp::Save, tag: name.to_owned(), vms: names(&up) };
        with_progress(
            Some(memory),
            || allocated(&disks).saturating_sub(before),
            || client::request(&lab.state_dir, &req),
        )
    };
    let took = start.elapsed();
    let written = allocated(&disks).saturating_sub(before);
    let mut stopped_done: Vec<&Vm> = Vec::new();
    let m = match saved.and_then(|_| record(store, name, &vms, &up, &mut stopped_done)) {
        Ok(m) => m,
        Err(e) => {
            // serve already took back a save that failed; one that worked but cannot be recorded
            // goes too, and so do the stopped disks' snapshots.
            if !up.is_empty() {
                let req = Request::Snapshot { op: LiveOp::Delete, tag: name.to_owned(), vms: names(&up) };
                let _ = client::request(&lab.state_dir, &req);
            }
            store.abandon(name, &stopped_done);
            return Err(e.context(format!("snapshot {name} not taken, and nothing of it kept")));
        }
    };
    for e in &m.vms {
        if m.is_live(e) {
            let (memory, disk) = (size(e.state_bytes), size(e.disk_bytes));
            writeln!(out, "{:<10} saved live (memory {memory}, disk {disk} allocated)", e.name)?;
        } else {
            writeln!(out, "{:<10} saved stopped (disk {} allocated)", e.name, size(e.disk_bytes))?;
        }
    }
    for vm in &unmade {
        writeln!(out, "{:<10} not set up: no disk to save", vm.name)?;
    }
    if up.is_empty() {
        writeln!(out, "snapshot {name}: {} VMs, none running: their disks (a stopped snapshot)", down.len())?;
        return Ok(());
    }
    let secs = took.as_secs_f64();
    let stopped_note = match down.len() {
        0 => String::new(),
        n => format!(" and {n} stopped"),
    };
    writeln!(
        out,
        "snapshot {name}: {} VMs live{stopped_note} in {secs:.1} s (paused meanwhile), {} written ({:.0} MiB/s)",
        up.len(),
        size(written),
        written as f64 / (1 << 20) as f64 / secs.max(0.001)
    )?;
    Ok(())
}

/// After the live part of `save --live`: the stopped VMs' disks saved (each pushed on `done`
/// first, so a failure undoes it too), every VM's entry, and the manifest, which makes the
/// snapshot exist. Nothing running makes it a stopped snapshot, which restores without serve.
fn record<'a>(
    store: &Store,
    name: &str,
    vms: &[&'a Vm],
    up: &[&Vm],
    done: &mut Vec<&'a Vm>,
) -> anyhow::Result<Manifest> {
    let leases = store.leases()?;
    let mut entries = Vec::new();
    for vm in vms {
        let live = up.iter().any(|u| u.name == vm.name);
        if !live {
            done.push(vm);
            store.img(vm, kubenet_vm::snapshot::Op::Create, name)?;
        }
        entries.push(store.entry(vm, name, live, &leases)?);
    }
    let m = store.manifest(name, now(), !up.is_empty(), entries);
    store.finish(&m)?;
    Ok(m)
}

/// The disks' allocated bytes, summed.
fn allocated(disks: &[PathBuf]) -> u64 {
    use std::os::unix::fs::MetadataExt;
    disks.iter().filter_map(|d| std::fs::metadata(d).ok()).map(|m| m.blocks() * 512).sum()
}

/// Runs `work` on a thread of its own while a bar on standard error (a terminal only) shows
/// `done()` against `total`, or a spinner with the time when there is no total.
fn with_progress<T: Send>(total: Option<u64>, done: impl Fn() -> u64, work: impl FnOnce() -> T + Send) -> T {
    let bar = indicatif::ProgressBar::with_draw_target(total, indicatif::ProgressDrawTarget::stderr());
    let template = if total.is_some() {
        "{bar:40} {bytes}/~{total_bytes} {bytes_per_sec} {elapsed}"
    } else {
        "{spinner} {elapsed}"
    };
    bar.set_style(indicatif::ProgressStyle::with_template(template).expect("a valid template"));
    let result = std::thread::scope(|s| {
        let worker = s.spawn(work);
        while !worker.is_finished() {
            bar.set_position(done());
            bar.tick();
            std::thread::sleep(Duration::from_millis(200));
        }
        worker.join().expect("the request thread does not panic")
    });
    bar.finish_and_clear();
    result
}

fn restore(lab: &Lab, store: &Store, name: &str, names_asked: &[String], out: &mut impl Write) -> anyhow::Result<()> {
    let m = store.get(name)?;
    let targets = store.targets(&m, names_asked)?;
    if m.live {
        return restore_live(lab, store, &m, &targets, names_asked.is_empty(), out);
    }
    let vms: Vec<&Vm> = targets.iter().filter_map(|e| lab.vm_by_name(&e.name)).collect();
    refuse_running(lab, &vms, &format!("snapshot restore {name}"))?;
    // The lease file is serve's while it runs; the VMs' fixed addresses come back at their next
    // DHCP exchange either way.
    let serve = client::status(&lab.state_dir).is_ok();
    let start = Instant::now();
    store
        .restore(&m, &targets, names_asked.is_empty(), !serve, &mut |e| {
            let _ = writeln!(out, "{:<10} restored", e.name);
        })
        .with_context(|| format!("snapshot {name} not restored: every disk is as it was"))?;
    writeln!(
        out,
        "snapshot {name} (taken {} ago) restored on {} VMs in {:.2} s{}",
        short(now().saturating_sub(m.taken)),
        targets.len(),
        start.elapsed().as_secs_f64(),
        if serve { "; leases left to the running kubenet serve" } else { "" }
    )?;
    Ok(())
}

/// How long a VM saved stopped gets to power off when a live restore stops it.
const COLD_GRACE_SECS: u64 = 20;

/// A live snapshot puts each VM back as it was: the ones saved running, running from that
/// moment (`serve` starts those stopped now, then pauses them all, loads, resumes; then each
/// guest's clock, which stood still since the save, is set to the host's over SSH); the ones
/// saved stopped, stopped (`serve` stops those running now), with their disks put back as a
/// plain restore does. Those go first, so that nothing of today's lab runs beside the restored
/// one.
fn restore_live(
    lab: &Lab,
    store: &Store,
    m: &Manifest,
    targets: &[&VmEntry],
    whole: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let name = &m.name;
    require_serve(lab, &format!("restoring the live snapshot {name}"))?;
    store.check_restorable(m, targets, whole)?;
    let (live, cold): (Vec<&VmEntry>, Vec<&VmEntry>) = targets.iter().copied().partition(|e| m.is_live(e));
    let vms_of =
        |entries: &[&VmEntry]| -> Vec<&Vm> { entries.iter().filter_map(|e| lab.vm_by_name(&e.name)).collect() };
    let (vms, cold_vms) = (vms_of(&live), vms_of(&cold));
    let start = Instant::now();
    // The VMs saved stopped go first: stopped (a short grace, as their disks are about to go
    // back), then their disks restored, all or nothing. Only then do the others resume from the
    // snapshot, so no VM still running on today's state talks to them (an etcd member with a
    // newer log would win them over).
    let cold_running: Vec<&Vm> = cold_vms.iter().copied().filter(|vm| running(lab, vm)).collect();
    if !cold_running.is_empty() {
        let req = Request::Stop { vms: names(&cold_running), grace_secs: Some(COLD_GRACE_SECS) };
        match client::request(&lab.state_dir, &req)? {
            Answer::Stopped(_) => {}
            other => return Err(client::unexpected(other)),
        }
        refuse_running(lab, &cold_running, &format!("snapshot restore {name}"))?;
    }
    if !cold.is_empty() {
        store
            .restore(m, &cold, false, false, &mut |e| {
                let _ = writeln!(out, "{:<10} restored stopped", e.name);
            })
            .with_context(|| format!("snapshot {name} not restored: every disk is as it was"))?;
    }
    load_running(lab, name, &vms).map_err(|e| {
        if cold.is_empty() {
            e
        } else {
            e.context(format!(
                "snapshot {name} restored only in part: {} are back as they were saved (stopped), the running ones are not",
                names(&cold_vms).join(", ")
            ))
        }
    })?;
    let loaded = start.elapsed();
    let config = kubenet_vm::LabFiles::new(lab).ssh_config();
    let clocks: Vec<(String, Result<i64, String>)> = std::thread::scope(|s| {
        let tasks: Vec<_> = vms.iter().map(|vm| (vm.name.clone(), s.spawn(|| set_clock(&config, &vm.name)))).collect();
        tasks.into_iter().map(|(n, t)| (n, t.join().expect("no panic"))).collect()
    });
    for (vm, clock) in clocks {
        match clock {
            Ok(behind) => writeln!(out, "{vm:<10} restored live; its clock was {behind} s behind, now the host's")?,
            Err(e) => writeln!(
                out,
                "{vm:<10} restored live; its clock is behind and could not be set ({e}): `kubenet ssh {vm} -- sudo date -s @$(date +%s)`"
            )?,
        }
    }
    writeln!(
        out,
        "snapshot {name} (taken {} ago, live) restored on {} VMs in {:.1} s",
        short(now().saturating_sub(m.taken)),
        vms.len() + cold.len(),
        loaded.as_secs_f64()
    )?;
    Ok(())
}

/// The VMs of a live restore that were saved running: those stopped now started, then all
/// paused, loaded and resumed by `serve`.
fn load_running(lab: &Lab, name: &str, vms: &[&Vm]) -> anyhow::Result<()> {
    let stopped: Vec<&Vm> = vms.iter().copied().filter(|vm| !running(lab, vm)).collect();
    if !stopped.is_empty() {
        let results = match client::request(&lab.state_dir, &Request::Start { vms: names(&stopped) })? {
            Answer::Started(r) => r,
            other => return Err(client::unexpected(other)),
        };
        for r in results {
            if let StartOutcome::Failed { error } = r.outcome {
                bail!("{}: {error}", r.name);
            }
        }
    }
    if !vms.is_empty() {
        let req = Request::Snapshot { op: LiveOp::Load, tag: name.to_owned(), vms: names(vms) };
        with_progress(None, || 0, || client::request(&lab.state_dir, &req))
            .with_context(|| format!("snapshot {name} not restored"))?;
    }
    Ok(())
}

/// Sets `vm`'s clock to the host's over SSH; how many seconds behind it was. The guest says
/// when it is ready, so the time sent is the host's at that moment, not before the handshake.
fn set_clock(config: &std::path::Path, vm: &str) -> Result<i64, String> {
    use std::process::{Command, Stdio};
    let script = r#"echo ready; read t; before=$(date +%s); sudo -n date -u -s "@$t" >/dev/null && echo "$before""#;
    let mut child = Command::new("ssh")
        .arg("-F")
        .arg(config)
        .args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=20", vm, script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run ssh: {e}"))?;
    let mut lines = std::io::BufReader::new(child.stdout.take().expect("piped")).lines();
    let ready = lines.next().and_then(Result::ok);
    let host = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let before = if ready.as_deref() == Some("ready") {
        let mut stdin = child.stdin.take().expect("piped");
        let _ = writeln!(stdin, "{}.{:03}", host.as_secs(), host.subsec_millis());
        drop(stdin);
        lines.next().and_then(Result::ok)
    } else {
        None
    };
    let done = child.wait_with_output().map_err(|e| e.to_string())?;
    match before.and_then(|b| b.trim().parse::<i64>().ok()) {
        Some(b) => Ok(host.as_secs() as i64 - b),
        None => Err(String::from_utf8_lossy(&done.stderr).trim().lines().last().unwrap_or("ssh failed").to_owned()),
    }
}

fn delete(lab: &Lab, store: &Store, name: &str, names_asked: &[String], out: &mut impl Write) -> anyhow::Result<()> {
    let m = store.get(name)?;
    let targets = store.targets(&m, names_asked)?;
    // Running QEMUs hold their disks: serve deletes there, qemu-img elsewhere.
    let running_now: Vec<String> = targets
        .iter()
        .filter_map(|e| lab.vm_by_name(&e.name))
        .filter(|vm| running(lab, vm))
        .map(|vm| vm.name.clone())
        .collect();
    if !running_now.is_empty() {
        require_serve(lab, &format!("deleting snapshot {name} from running VMs ({})", running_now.join(", ")))?;
        let req = Request::Snapshot { op: LiveOp::Delete, tag: name.to_owned(), vms: running_now };
        client::request(&lab.state_dir, &req)?;
    }
    store.delete(&m, &targets, &mut |e| {
        let _ = writeln!(out, "{:<10} snapshot {name} deleted", e.name);
    })?;
    Ok(())
}

fn list(store: &Store, json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let all = store.list()?;
    if json {
        serde_json::to_writer_pretty(&mut *out, &all).map_err(std::io::Error::from)?;
        writeln!(out)?;
        return Ok(());
    }
    if all.is_empty() {
        writeln!(out, "no snapshots yet: `kubenet snapshot save NAME` takes one")?;
        return Ok(());
    }
    write!(out, "{}", crate::commands::table::columns(&LIST_HEADER, &list_rows(&all, now())))?;
    Ok(())
}

const LIST_HEADER: [&str; 6] = ["NAME", "TAKEN", "KIND", "VM", "DISK", "MEMORY"];

/// One row per VM of each snapshot; the snapshot's own columns only on its first row.
fn list_rows(all: &[Manifest], now: u64) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for m in all {
        for (i, e) in m.vms.iter().enumerate() {
            let first = i == 0;
            let cell = |s: String| if first { s } else { String::new() };
            rows.push(vec![
                cell(m.name.clone()),
                cell(format!("{} ago", short(now.saturating_sub(m.taken)))),
                cell(if m.live { "live" } else { "stopped" }.into()),
                e.name.clone(),
                size(e.disk_bytes),
                if e.state_bytes == 0 { "-".into() } else { size(e.state_bytes) },
            ]);
        }
    }
    rows
}

/// "1.2G", "310M", "12K".
fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1}G", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{}M", b >> 20),
        b => format!("{}K", b.div_ceil(1024)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_shows_each_vm_under_its_snapshot() {
        let entry = |name: &str, disk, state| VmEntry {
            name: name.into(),
            mac: String::new(),
            ip: std::net::Ipv4Addr::UNSPECIFIED,
            disk_bytes: disk,
            state_bytes: state,
            efi_vars: false,
            leases: String::new(),
            live: None,
        };
        let m = |name: &str, taken, live, vms| Manifest { name: name.into(), taken, live, lab_vms: vec![], vms };
        let all = [
            m("s1", 1000, false, vec![entry("gateway", 300 << 20, 0), entry("worker0", 3 << 29, 0)]),
            m("etcd", 4000, true, vec![entry("control0", 5000, 2 << 30)]),
        ];
        let rows = list_rows(&all, 4600);
        assert_eq!(
            rows,
            [
                ["s1", "1h00m ago", "stopped", "gateway", "300M", "-"],
                ["", "", "", "worker0", "1.5G", "-"],
                ["etcd", "10m00s ago", "live", "control0", "5K", "2.0G"],
            ]
        );
    }
}
