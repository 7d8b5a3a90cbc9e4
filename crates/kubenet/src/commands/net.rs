//! `kubenet net`: the lab's network faults, asked of `kubenet serve` (which alone may change the
//! host's network) through the control socket, and the table of what is in force. The table
//! and the one-word summary `status` shows ([`summary`]) are pure.

use std::io::Write;

use kubenet_cluster::Lab;

use crate::cli::NetAction;
use crate::proto::{Answer, FaultRow, NetOp, Request};

/// `kubenet net ACTION`.
pub fn net(lab: &Lab, action: &NetAction, out: &mut impl Write) -> anyhow::Result<()> {
    let (op, json) = match action {
        NetAction::Partition { vm, from } => (NetOp::Partition { vm: vm.clone(), from: from.clone() }, false),
        NetAction::Delay { vm, delay, jitter } => (
            NetOp::Delay {
                vm: vm.clone(),
                delay_us: delay.as_micros() as u64,
                jitter_us: jitter.map_or(0, |j| j.as_micros() as u64),
            },
            false,
        ),
        NetAction::Loss { vm, loss } => (NetOp::Loss { vm: vm.clone(), ppm: *loss }, false),
        NetAction::Rate { vm, rate } => (NetOp::Rate { vm: vm.clone(), bps: *rate }, false),
        NetAction::Heal { vms } => (NetOp::Heal { vms: vms.clone() }, false),
        NetAction::Show { json } => (NetOp::Show, *json),
    };
    let rows = match crate::client::request(&lab.state_dir, &Request::Net { op })? {
        Answer::Net(rows) => rows,
        other => return Err(crate::client::unexpected(other)),
    };
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
    } else if rows.is_empty() {
        writeln!(out, "no network faults: the lab's network is whole")?;
    } else {
        write!(out, "{}", table(&rows))?;
    }
    Ok(())
}

/// The faults in force, one row per VM.
pub fn table(rows: &[FaultRow]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let or_dash = |s: String| if s.is_empty() { "-".to_owned() } else { s };
            vec![
                r.vm.clone(),
                or_dash(r.partitioned_from.join(",")),
                or_dash(delay(r)),
                or_dash(if r.loss_ppm > 0 { percent(r.loss_ppm) } else { String::new() }),
                or_dash(if r.rate_bps > 0 { rate(r.rate_bps) } else { String::new() }),
            ]
        })
        .collect();
    crate::commands::table::columns(&["VM", "CUT OFF FROM", "DELAY", "LOSS", "RATE"], &cells)
}

/// What `status` says of a VM's faults, in a word or three: "cut off, delay 100ms".
pub fn summary(row: &FaultRow) -> String {
    let mut parts = Vec::new();
    if !row.partitioned_from.is_empty() {
        parts.push("cut off".to_owned());
    }
    if row.delay_us > 0 {
        parts.push(format!("delay {}", delay(row)));
    }
    if row.loss_ppm > 0 {
        parts.push(format!("loss {}", percent(row.loss_ppm)));
    }
    if row.rate_bps > 0 {
        parts.push(format!("rate {}", rate(row.rate_bps)));
    }
    parts.join(", ")
}

fn delay(r: &FaultRow) -> String {
    let d = |us: u64| humane_us(us);
    match (r.delay_us, r.jitter_us) {
        (0, _) => String::new(),
        (delay, 0) => d(delay),
        (delay, jitter) => format!("{}+-{}", d(delay), d(jitter)),
    }
}

/// "100ms", "1.5s", "250us".
fn humane_us(us: u64) -> String {
    match us {
        u if u >= 1_000_000 && u % 1_000_000 == 0 => format!("{}s", u / 1_000_000),
        u if u >= 1_000_000 => format!("{}ms", u / 1000),
        u if u % 1000 == 0 => format!("{}ms", u / 1000),
        u => format!("{u}us"),
    }
}

fn percent(ppm: u32) -> String {
    let s = format!("{}.{:04}", ppm / 10_000, ppm % 10_000);
    format!("{}%", s.trim_end_matches('0').trim_end_matches('.'))
}

fn rate(bps: u64) -> String {
    match bps {
        b if b % 1_000_000_000 == 0 => format!("{}gbit", b / 1_000_000_000),
        b if b % 1_000_000 == 0 => format!("{}mbit", b / 1_000_000),
        b if b % 1_000 == 0 => format!("{}kbit", b / 1_000),
        b => format!("{b}bit"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_and_the_status_word_say_what_is_in_force() {
        let rows = [
            FaultRow {
                vm: "control0".into(),
                partitioned_from: vec!["control1".into(), "control2".into()],
                ..Default::default()
            },
            FaultRow {
                vm: "worker1".into(),
                delay_us: 100_000,
                jitter_us: 10_000,
                loss_ppm: 5_000,
                rate_bps: 10_000_000,
                ..Default::default()
            },
        ];
        assert_eq!(
            table(&rows),
            "VM        CUT OFF FROM       DELAY        LOSS  RATE\n\
             control0  control1,control2  -            -     -\n\
             worker1   -                  100ms+-10ms  0.5%  10mbit\n"
        );
        assert_eq!(summary(&rows[0]), "cut off");
        assert_eq!(summary(&rows[1]), "delay 100ms+-10ms, loss 0.5%, rate 10mbit");
        assert_eq!(humane_us(2_000_000), "2s");
        assert_eq!(humane_us(1_500_000), "1500ms");
        assert_eq!(humane_us(250), "250us");
        assert_eq!(percent(50_000), "5%");
        assert_eq!(rate(512_000), "512kbit");
    }
}
