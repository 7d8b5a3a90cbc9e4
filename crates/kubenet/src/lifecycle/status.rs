//! `kubenet status` (rows made by a pure [`status_rows`]) and `kubenet ssh`.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::bail;
use kubenet_cluster::Lab;
use kubenet_vm::LabFiles;

use crate::proto::RunState;

use super::{now, require_running, short};

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
    states: &[crate::proto::VmState],
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

#[cfg(test)]
mod tests {
    use super::*;
    use kubenet_cluster::Vm;
    use std::path::Path;

    #[test]
    fn status_rows_join_states_leases_and_ssh() {
        use crate::proto::VmState;
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
}
