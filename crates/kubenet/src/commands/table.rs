//! `kubenet config`'s human output: a summary of the network and one row per VM. Pure: it
//! renders to a String.

use std::fmt::Write;

use kubenet_cluster::{Arch, Lab};

/// The lab as seen from a host of architecture `host`: a guest of another architecture is
/// marked as emulated.
pub fn render(lab: &Lab, host: Arch) -> String {
    let n = &lab.network;
    let mut out = String::new();
    let upstream = if n.upstream.is_empty() {
        "the host's resolvers".to_string()
    } else {
        n.upstream.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    };
    let summary = [
        ("config", lab.source.clone()),
        ("state", lab.state_dir.display().to_string()),
        ("network", n.subnet.to_string()),
        ("host", format!("{} {}", n.host_name, n.host_address)),
        ("domain", n.domain.clone()),
        ("dhcp pool", format!("{} - {}, lease {}", n.dhcp_range.start, n.dhcp_range.end, n.lease_time)),
        ("upstream", upstream),
        ("accelerator", format!("{:?}", lab.accelerator).to_lowercase()),
        ("firmware", format!("{:?}", lab.firmware).to_lowercase()),
    ];
    for (k, v) in summary {
        let _ = writeln!(out, "{k:<12} {v}");
    }
    for h in &n.hosts {
        let _ = writeln!(out, "{:<12} {} {}", "host entry", h.name, h.address);
    }
    out.push('\n');

    let header = ["NAME", "ID", "ROLE", "MAC", "IP", "FQDN", "ARCH", "VCPUS", "MEMORY", "DISK"];
    let rows: Vec<Vec<String>> = lab
        .vms
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                v.id.to_string(),
                v.role.clone(),
                v.mac.to_string(),
                v.ip.to_string(),
                v.fqdn.clone(),
                match v.arch_on(host) {
                    a if a == host => a.to_string(),
                    a => format!("{a} (TCG)"),
                },
                v.vcpus.to_string(),
                v.memory.to_string(),
                v.disk.to_string(),
            ]
        })
        .collect();
    out.push_str(&columns(&header, &rows));
    out
}

/// Left-aligned columns, two spaces apart, with a header row.
pub fn columns(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut out = String::new();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut line = |cells: &[String]| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&header.iter().map(|h| h.to_string()).collect::<Vec<_>>());
    for r in rows {
        line(r);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_arch_column_marks_emulated_guests() {
        let text = kubenet_cluster::REFERENCE_CONFIG.replacen("arch = \"auto\"", "arch = \"aarch64\"", 1);
        let lab = kubenet_cluster::parse(&text, kubenet_cluster::Source::Embedded, "/lab".as_ref()).unwrap();
        let on_x86 = render(&lab, Arch::X86_64);
        assert!(on_x86.lines().any(|l| l.starts_with("gateway ") && l.contains(" aarch64 (TCG) ")), "{on_x86}");
        assert!(on_x86.lines().any(|l| l.starts_with("worker2 ") && l.contains(" x86_64 ")), "{on_x86}");
        let on_mac = render(&lab, Arch::Aarch64);
        assert!(
            on_mac.lines().any(|l| l.starts_with("gateway ") && l.contains(" aarch64 ") && !l.contains("TCG")),
            "{on_mac}"
        );
        assert!(on_mac.lines().any(|l| l.starts_with("worker2 ") && l.contains(" aarch64 ")), "{on_mac}");
    }
}
