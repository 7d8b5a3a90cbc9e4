//! `kubenet serve --host-resolver`: the host itself resolves the lab's names through kubenet
//! while it runs, and stops when it stops. The plan is data (unit-tested for both systems on
//! any host); only `apply` and the guard's drop touch the system.
//!
//! - macOS: a per-domain resolver file, `/etc/resolver/<domain>` (see `man 5 resolver`).
//! - Linux: systemd-resolved's per-link DNS: `resolvectl dns LINK ADDR` and
//!   `resolvectl domain LINK ~DOMAIN` on the link that holds the address kubenet serves, undone by
//!   `resolvectl revert LINK`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

pub use kubenet_cluster::Os;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Write `contents` to `path`; remove it on exit.
    ResolverFile { path: PathBuf, contents: String },
    /// Run each of `apply`; run `revert` on exit.
    Resolved { apply: Vec<Vec<String>>, revert: Vec<String> },
}

/// What to do for `domain` served at `dns` (the address kubenet listens on; for a wildcard
/// listen, `lab_address`, the host's address on the lab's network). `link` is the interface that
/// holds that address, needed on Linux.
pub fn plan(
    os: Os,
    domain: &str,
    dns: SocketAddr,
    lab_address: IpAddr,
    link: Option<&str>,
    resolver_dir: &Path,
) -> anyhow::Result<Plan> {
    match os {
        Os::MacOs => {
            // The host asks over loopback when kubenet listens everywhere.
            let server = if dns.ip().is_unspecified() { IpAddr::from([127, 0, 0, 1]) } else { dns.ip() };
            let contents = format!(
                "# Written by `kubenet serve --host-resolver`; removed when it stops.\ndomain {domain}\nnameserver {server}\nport {}\n",
                dns.port()
            );
            Ok(Plan::ResolverFile { path: resolver_dir.join(domain), contents })
        }
        Os::Linux => {
            let Some(link) = link else {
                bail!(
                    "no interface holds {lab_address}, so systemd-resolved has no link to route {domain} through: run kubenet serve with its bridge, or give the address to an interface"
                );
            };
            let server = if dns.ip().is_unspecified() { lab_address } else { dns.ip() };
            let addr =
                if dns.port() == 53 { server.to_string() } else { SocketAddr::new(server, dns.port()).to_string() };
            let argv = |args: &[&str]| args.iter().map(ToString::to_string).collect::<Vec<_>>();
            Ok(Plan::Resolved {
                apply: vec![
                    argv(&["resolvectl", "dns", link, &addr]),
                    argv(&["resolvectl", "domain", link, &format!("~{domain}")]),
                ],
                revert: argv(&["resolvectl", "revert", link]),
            })
        }
    }
}

/// Undoes the plan when dropped: on a clean stop, on an error, on Ctrl-C.
#[derive(Debug)]
pub struct Applied {
    plan: Plan,
}

pub fn apply(plan: Plan) -> anyhow::Result<Applied> {
    match &plan {
        Plan::ResolverFile { path, contents } => {
            let dir = path.parent().context("resolver file has no directory")?;
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            if path.exists() && !std::fs::read_to_string(path).unwrap_or_default().contains("kubenet serve") {
                bail!("{} exists and is not kubenet's; remove it or run without --host-resolver", path.display());
            }
            let tmp = path.with_extension("kubenet-tmp");
            std::fs::write(&tmp, contents)
                .and_then(|()| std::fs::rename(&tmp, path))
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        Plan::Resolved { apply, .. } => {
            for argv in apply {
                run(argv).with_context(|| "systemd-resolved must run for --host-resolver on Linux")?;
            }
        }
    }
    tracing::info!("host resolver: {}", describe(&plan));
    Ok(Applied { plan })
}

fn run(argv: &[String]) -> anyhow::Result<()> {
    // Root runs it: by a path only root can change, whatever PATH says.
    let program = kubenet_vm::trust::program(&argv[0]).map_err(|e| anyhow::anyhow!("cannot run {}: {e}", argv[0]))?;
    let out =
        Command::new(program).args(&argv[1..]).output().with_context(|| format!("cannot run {}", argv.join(" ")))?;
    if !out.status.success() {
        bail!("{} failed: {}", argv.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn describe(plan: &Plan) -> String {
    match plan {
        Plan::ResolverFile { path, .. } => format!("wrote {}", path.display()),
        Plan::Resolved { apply, .. } => apply.iter().map(|a| a.join(" ")).collect::<Vec<_>>().join("; "),
    }
}

impl Drop for Applied {
    fn drop(&mut self) {
        let r = match &self.plan {
            Plan::ResolverFile { path, .. } => std::fs::remove_file(path).map_err(anyhow::Error::from),
            Plan::Resolved { revert, .. } => run(revert),
        };
        match r {
            Ok(()) => tracing::info!("host resolver: undone ({})", describe(&self.plan)),
            Err(e) => tracing::warn!("host resolver: could not undo ({}): {e:#}", describe(&self.plan)),
        }
    }
}

/// The interface that holds `addr`, if any.
pub fn link_holding(addr: IpAddr) -> Option<String> {
    kubenet_udp::addresses().into_iter().find(|a| a.address == addr).map(|a| a.interface)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAB: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 168, 1, 1));

    #[test]
    fn macos_writes_a_per_domain_resolver_file() {
        let p =
            plan(Os::MacOs, "kubevms", "0.0.0.0:53".parse().unwrap(), LAB, None, Path::new("/etc/resolver")).unwrap();
        let Plan::ResolverFile { path, contents } = p else { panic!("{p:?}") };
        assert_eq!(path, Path::new("/etc/resolver/kubevms"));
        assert!(contents.contains("\ndomain kubevms\nnameserver 127.0.0.1\nport 53\n"), "{contents}");
        let p = plan(Os::MacOs, "lab.test", "192.168.1.1:5353".parse().unwrap(), LAB, None, Path::new("/etc/resolver"))
            .unwrap();
        assert!(
            matches!(p, Plan::ResolverFile { contents, .. } if contents.contains("nameserver 192.168.1.1\nport 5353\n"))
        );
    }

    #[test]
    fn linux_sets_per_link_dns_and_a_routing_domain() {
        let p = plan(Os::Linux, "kubevms", "0.0.0.0:53".parse().unwrap(), LAB, Some("kubenet0"), Path::new("/unused"))
            .unwrap();
        let Plan::Resolved { apply, revert } = p else { panic!() };
        assert_eq!(
            apply,
            [
                vec!["resolvectl", "dns", "kubenet0", "192.168.1.1"],
                vec!["resolvectl", "domain", "kubenet0", "~kubevms"]
            ]
        );
        assert_eq!(revert, ["resolvectl", "revert", "kubenet0"]);
        let p = plan(Os::Linux, "kubevms", "0.0.0.0:5353".parse().unwrap(), LAB, Some("br0"), Path::new("/unused"))
            .unwrap();
        assert!(matches!(p, Plan::Resolved { apply, .. } if apply[0][3] == "192.168.1.1:5353"));
        let e = plan(Os::Linux, "kubevms", "0.0.0.0:53".parse().unwrap(), LAB, None, Path::new("/unused")).unwrap_err();
        assert!(e.to_string().contains("no interface holds 192.168.1.1"), "{e}");
    }

    #[test]
    fn the_resolver_file_lives_exactly_as_long_as_the_guard() {
        let dir = tempfile::tempdir().unwrap();
        let p = plan(Os::MacOs, "kubevms", "127.0.0.1:53".parse().unwrap(), LAB, None, dir.path()).unwrap();
        let file = dir.path().join("kubevms");
        let guard = apply(p.clone()).unwrap();
        assert!(std::fs::read_to_string(&file).unwrap().contains("nameserver 127.0.0.1"));
        drop(guard);
        assert!(!file.exists());
        // A file that is not kubenet's is left alone.
        std::fs::write(&file, "nameserver 10.0.0.53\n").unwrap();
        assert!(apply(p).unwrap_err().to_string().contains("is not kubenet's"));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "nameserver 10.0.0.53\n");
    }
}
