//! `kubenet status` (rows made by a pure [`status_rows`]).

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use kubenet_cluster::Lab;

use crate::proto::{Answer, FaultRow, LeaseRow, NetOp, Request, RunState, VmState};

use super::{now, short};

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
    /// The network faults `kubenet net` put on it ("cut off, delay 100ms"), if any.
    pub fault: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LeaseCell {
    pub ip: std::net::Ipv4Addr,
    pub expires: Option<u64>,
}

/// What the agent says of the lab: the VMs' states, the active leases and the network faults.
pub struct Seen {
    pub states: Vec<VmState>,
    pub leases: Vec<LeaseRow>,
    pub faults: Vec<FaultRow>,
}

/// The rows of `kubenet status` from what was seen (states by name: the agent's lab may be
/// older than this file), which VMs answer on port 22, and the time. Pure.
pub fn status_rows(lab: &Lab, seen: &Seen, ssh: &[bool], now: u64) -> Vec<StatusRow> {
    let Seen { states, leases, faults } = seen;
    lab.vms
        .iter()
        .zip(ssh)
        .map(|(vm, &ssh)| {
            let mac = vm.mac.to_string();
            let lease = leases.iter().find(|l| l.mac == mac && l.expires.is_none_or(|e| e > now));
            let run = states.iter().find(|s| s.name == vm.name).map_or(&RunState::Stopped, |s| &s.run);
            let (state, pid, since) = match *run {
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
                fault: faults.iter().find(|f| f.vm == vm.name).map(crate::commands::net::summary),
            }
        })
        .collect()
}

/// The VMs' states and the active leases: asked of `kubenet serve` when it runs (its own view,
/// the one it acts on), else read from the VM folders and the lease file, as the VMs outlive it.
/// A VM of this file that the agent does not know (added since its last reload) is read from its
/// folder. An agent that does not answer within 3 s counts as not running.
fn seen(lab: &Lab, now: u64) -> Seen {
    let ask = |req| crate::client::request_within(&lab.state_dir, &req, Some(Duration::from_secs(3)));
    let on_disk = || kubenet_vm::process::states(lab);
    if let (Ok(Answer::Vms(mut states)), Ok(Answer::Leases(leases))) = (ask(Request::Vms), ask(Request::Leases)) {
        if lab.vms.iter().any(|vm| !states.iter().any(|s| s.name == vm.name)) {
            let missing: Vec<VmState> =
                on_disk().into_iter().filter(|s| !states.iter().any(|a| a.name == s.name)).collect();
            states.extend(missing);
        }
        let faults = match ask(Request::Net { op: NetOp::Show }) {
            Ok(Answer::Net(rows)) => rows,
            _ => Vec::new(),
        };
        return Seen { states, leases, faults };
    }
    // No agent, no faults: they end with it.
    let table = kubenet_dhcp::lease::load(&lab.lease_file(), now).map(|(l, _)| l).unwrap_or_default();
    let leases = table.iter().filter(|l| l.active(now)).map(LeaseRow::from).collect();
    Seen { states: on_disk(), leases, faults: Vec::new() }
}

/// What `kubenet status` shows: the VMs' states and leases, and port 22 of each running VM.
/// Works whether or not `kubenet serve` runs.
fn read_status(lab: &Lab) -> Vec<StatusRow> {
    let t = now();
    let seen = seen(lab, t);
    let states = &seen.states;
    // Port 22 of every running VM at once: a busy guest (TCG, or a loaded host) may take a
    // second to answer, and seven of those one after another would make `status` slow.
    let ssh: Vec<bool> = std::thread::scope(|scope| {
        let probes: Vec<_> = lab
            .vms
            .iter()
            .map(|vm| {
                let running = states.iter().any(|s| s.name == vm.name && s.run.pid().is_some());
                let addr = SocketAddr::new(vm.ip.into(), 22);
                scope.spawn(move || running && TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok())
            })
            .collect();
        probes.into_iter().map(|p| p.join().unwrap_or(false)).collect()
    });
    status_rows(lab, &seen, &ssh, t)
}

pub fn status(lab: &Lab, json_out: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let rows = read_status(lab);
    if json_out {
        serde_json::to_writer_pretty(&mut *out, &rows).map_err(std::io::Error::from)?;
        writeln!(out)?;
        return Ok(());
    }
    let t = now();
    // The NET column only while some VM has a fault.
    let faulted = rows.iter().any(|r| r.fault.is_some());
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let lease = match &r.lease {
                None => "-".to_owned(),
                Some(LeaseCell { ip, expires: None }) => format!("{ip} (infinite)"),
                Some(LeaseCell { ip, expires: Some(e) }) => format!("{ip} ({} left)", short(e.saturating_sub(t))),
            };
            let mut cells = vec![
                r.name.clone(),
                r.role.clone(),
                r.state.to_owned(),
                r.pid.map_or("-".into(), |p| p.to_string()),
                r.mac.clone(),
                r.ip.to_string(),
                lease,
                if r.ssh { "yes".into() } else { "-".into() },
                r.uptime_secs.map_or("-".into(), short),
            ];
            if faulted {
                cells.push(r.fault.clone().unwrap_or_else(|| "-".into()));
            }
            cells
        })
        .collect();
    let mut header = vec!["NAME", "ROLE", "STATE", "PID", "MAC", "IP", "LEASE", "SSH", "UPTIME"];
    if faulted {
        header.push("NET");
    }
    if lab.source == kubenet_cluster::Source::Embedded.to_string() {
        eprintln!(
            "(the built-in reference lab, state in {}: no kubenet.toml here, no --config or ${})",
            lab.state_dir.display(),
            kubenet_cluster::CONFIG_ENV
        );
    }
    write!(out, "{}", crate::commands::table::columns(&header, &cells))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kubenet_cluster::Vm;
    use std::path::Path;

    #[test]
    fn status_rows_join_states_leases_and_ssh() {
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
        let lease = |vm: &Vm, expires| LeaseRow { ip: vm.ip, mac: vm.mac.to_string(), hostname: None, expires };
        let leases = [lease(&lab.vms[0], Some(1000)), lease(&lab.vms[1], Some(150))];
        let ssh: Vec<bool> = lab.vms.iter().map(|vm| vm.name == "gateway").collect();
        // By name: a state the agent no longer has (a VM since removed) is left out, and one
        // it lacks is stopped.
        let states: Vec<VmState> = states.into_iter().filter(|s| s.name != "worker2").collect();
        let faults = [crate::proto::FaultRow {
            vm: "control0".into(),
            partitioned_from: vec!["worker0".into()],
            ..Default::default()
        }];
        let seen = Seen { states, leases: leases.to_vec(), faults: faults.to_vec() };
        let rows = status_rows(&lab, &seen, &ssh, 200);
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
                fault: None,
            }
        );
        assert_eq!(rows[1].fault.as_deref(), Some("cut off"));
        // control0's lease ran out at 150: not shown at 200.
        assert_eq!((rows[1].state, rows[1].pid, rows[1].lease.clone(), rows[1].ssh), ("stopped", None, None, false));
        assert_eq!(rows.len(), 7);
        let json = serde_json::to_value(&rows[0]).unwrap();
        assert_eq!(json["lease"]["ip"], "192.168.1.10");
        assert_eq!(json["uptime_secs"], 100);
    }
}
