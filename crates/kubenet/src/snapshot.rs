//! `kubenet snapshot save|list|restore|delete`: the whole lab (or `--vm` VMs) at one step of
//! the tutorial, and back to it. The work is [`kubenet_vm::snapshot::Store`]'s; here are the
//! checks against running VMs and `serve`, and what the user reads.

use std::io::Write;
use std::time::Instant;

use anyhow::Context;
use kubenet_cluster::{Lab, Vm};
use kubenet_vm::snapshot::{Manifest, Store, VmEntry};

use crate::cli::SnapshotAction;
use crate::lifecycle::{now, refuse_running, short};

pub fn run(lab: &Lab, action: &SnapshotAction, out: &mut impl Write) -> anyhow::Result<()> {
    let store = Store::new(lab);
    match action {
        SnapshotAction::Save { name, vms } => save(lab, &store, name, vms, out),
        SnapshotAction::List { json } => list(&store, *json, out),
        SnapshotAction::Restore { name, vms } => restore(lab, &store, name, vms, out),
        SnapshotAction::Delete { name, vms } => {
            let m = store.get(name)?;
            let targets = store.targets(&m, vms)?;
            let running: Vec<&Vm> = targets.iter().filter_map(|e| lab.vm_by_name(&e.name)).collect();
            refuse_running(lab, &running, &format!("delete snapshot {name}"))?;
            store.delete(&m, &targets, &mut |e| {
                let _ = writeln!(out, "{:<10} snapshot {name} deleted", e.name);
            })?;
            Ok(())
        }
    }
}

fn save(lab: &Lab, store: &Store, name: &str, names: &[String], out: &mut impl Write) -> anyhow::Result<()> {
    kubenet_vm::snapshot::check_name(name)?;
    let vms = lab.select(names).map_err(crate::cli::unknown_vm)?;
    refuse_running(lab, &vms, &format!("snapshot save {name}"))?;
    let start = Instant::now();
    let m = store
        .save(name, &vms, now(), &mut |e| {
            let _ = writeln!(out, "{:<10} saved ({} allocated)", e.name, size(e.disk_bytes));
        })
        .with_context(|| format!("snapshot {name} not taken, and nothing of it kept"))?;
    writeln!(out, "snapshot {name}: {} VMs in {:.2} s", m.vms.len(), start.elapsed().as_secs_f64())?;
    Ok(())
}

fn restore(lab: &Lab, store: &Store, name: &str, names: &[String], out: &mut impl Write) -> anyhow::Result<()> {
    let m = store.get(name)?;
    let targets = store.targets(&m, names)?;
    let vms: Vec<&Vm> = targets.iter().filter_map(|e| lab.vm_by_name(&e.name)).collect();
    refuse_running(lab, &vms, &format!("snapshot restore {name}"))?;
    // The lease file is serve's while it runs; the VMs' fixed addresses come back at their next
    // DHCP exchange either way.
    let serve = crate::control::request(&lab.state_dir, &serde_json::json!({"cmd": "status"})).is_ok();
    let start = Instant::now();
    store
        .restore(&m, &targets, names.is_empty(), !serve, &mut |e| {
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
    write!(out, "{}", crate::table::columns(&LIST_HEADER, &list_rows(&all, now())))?;
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
                memory(e),
            ]);
        }
    }
    rows
}

fn memory(e: &VmEntry) -> String {
    if e.state_bytes == 0 { "-".into() } else { size(e.state_bytes) }
}

/// "1.2G", "310M", "12K".
fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1}G", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{}M", b >> 20),
        b => format!("{}K", b.div_ceil(1024)),
    }
}

/// For `kubenet destroy`: the snapshots' folder (the snapshots themselves live in the disks).
pub fn folder(lab: &Lab) -> std::path::PathBuf {
    Store::new(lab).dir().to_path_buf()
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
