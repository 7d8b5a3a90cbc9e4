//! Linux host networking for the lab: what macOS's vmnet-shared gives for free. A bridge with
//! the host's lab address, one persistent tap per VM on it (owned by the user, so QEMU needs no
//! root to open it), and optionally IP forwarding and an nftables masquerade rule, so the VMs
//! reach the host's networks. Made when `kubenet serve` starts, removed when it stops. Linux only
//! (the module is compiled for Linux alone).
//!
//! [`plan`] and [`nat_ruleset`] are pure; [`HostNet::apply`] and [`HostNet::remove`] talk to the
//! kernel: netlink (rtnetlink) for links and addresses, the tun driver's ioctls for taps (netlink
//! cannot make them), `nft` for the rule.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use kubenet_cluster::Lab;

/// What to build for a lab.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub bridge: String,
    pub address: Ipv4Addr,
    pub subnet: Ipv4Net,
    pub taps: Vec<String>,
    /// The uid the taps belong to.
    pub owner: u32,
    pub nat: bool,
}

pub fn plan(lab: &Lab, owner: u32) -> Plan {
    Plan {
        bridge: lab.network.bridge.clone(),
        address: lab.network.host_address,
        subnet: lab.network.subnet,
        taps: lab.vms.iter().map(|vm| kubenet_vm::qemu::tap_name(lab, vm)).collect(),
        owner,
        nat: lab.network.nat,
    }
}

/// The nftables table name for a bridge.
pub fn nat_table(bridge: &str) -> String {
    format!("kubenet_{}", bridge.replace(|c: char| !c.is_ascii_alphanumeric(), "_"))
}

/// The masquerade rule: traffic from the lab to anywhere else leaves with the host's address.
pub fn nat_ruleset(plan: &Plan) -> String {
    let net = plan.subnet.trunc();
    format!(
        "table ip {t} {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    ip saddr {net} ip daddr != {net} masquerade\n  }}\n}}\n",
        t = nat_table(&plan.bridge)
    )
}

/// Whether `name` is a VM tap of `bridge`, as [`kubenet_vm::qemu::tap_of`] names them.
pub fn is_tap_of(name: &str, bridge: &str) -> bool {
    name.rsplit_once('-')
        .and_then(|(_, id)| id.parse::<u32>().ok())
        .is_some_and(|id| name == kubenet_vm::qemu::tap_of(bridge, id))
}

pub use linux::{HostNet, attach_tap};

mod linux {
    use std::os::fd::AsRawFd;

    use anyhow::{Context, bail};
    use futures_util::TryStreamExt;
    use rtnetlink::{Handle, LinkBridge, LinkUnspec};

    use super::{Plan, is_tap_of, nat_ruleset, nat_table};

    const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

    /// The lab's network as built; [`HostNet::remove`] takes it down.
    pub struct HostNet {
        plan: Plan,
        handle: Handle,
        /// ip_forward before we turned it on, to put back.
        forward_was: Option<String>,
    }

    impl HostNet {
        /// Builds the plan. An existing bridge or tap of the same name (left by VMs that
        /// outlived an earlier agent) is adopted, not an error.
        pub async fn apply(plan: Plan) -> anyhow::Result<HostNet> {
            let (conn, handle, _) = rtnetlink::new_connection().context("opening a netlink socket")?;
            tokio::spawn(conn);
            let mut net = HostNet { plan, handle, forward_was: None };
            if let Err(e) = net.build().await {
                net.remove().await;
                return Err(e);
            }
            Ok(net)
        }

        async fn build(&mut self) -> anyhow::Result<()> {
            let p = self.plan.clone();
            let h = &self.handle;
            let bridge = match index(h, &p.bridge).await? {
                Some(i) => i,
                None => {
                    h.link().add(LinkBridge::new(&p.bridge).build()).execute().await.with_context(|| {
                        format!(
                            "cannot create the bridge {} (kubenet serve needs root; --no-bridge skips it)",
                            p.bridge
                        )
                    })?;
                    index(h, &p.bridge).await?.context("the new bridge has no index")?
                }
            };
            let prefix = p.subnet.prefix_len();
            match h.address().add(bridge, p.address.into(), prefix).execute().await {
                Ok(()) => {}
                // EEXIST: the address is there already (an adopted bridge).
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot give {} address {}/{prefix}", p.bridge, p.address));
                }
            }
            h.link().set(LinkUnspec::new_with_index(bridge).up().build()).execute().await?;
            for tap in &p.taps {
                ensure_tap(h, &p.bridge, bridge, tap, p.owner).await?;
            }
            if p.nat {
                self.forward_was = Some(std::fs::read_to_string(IP_FORWARD).unwrap_or_default());
                std::fs::write(IP_FORWARD, "1\n").context("cannot turn on IP forwarding")?;
                nft(&nat_ruleset(&p)).context("cannot add the NAT rule (nat = false in [network] turns NAT off)")?;
            }
            tracing::info!(bridge = %p.bridge, address = %format!("{}/{prefix}", p.address), taps = p.taps.len(), nat = p.nat, "host network up");
            Ok(())
        }

        /// Removes the NAT rule, the taps and the bridge, and puts ip_forward back.
        pub async fn remove(self) {
            let p = &self.plan;
            if p.nat {
                if let Err(e) = nft(&format!("delete table ip {}\n", nat_table(&p.bridge))) {
                    tracing::debug!("removing the NAT rule: {e:#}");
                }
                if let Some(was) = &self.forward_was
                    && let Err(e) = std::fs::write(IP_FORWARD, was)
                {
                    tracing::warn!("cannot restore {IP_FORWARD}: {e}");
                }
            }
            // The plan's taps, and those `attach_tap` added for VMs a reload brought.
            let mut names = p.taps.clone();
            let mut links = self.handle.link().get().execute();
            while let Ok(Some(l)) = links.try_next().await {
                for attr in l.attributes {
                    if let rtnetlink::packet_route::link::LinkAttribute::IfName(n) = attr
                        && is_tap_of(&n, &p.bridge)
                        && !names.contains(&n)
                    {
                        names.push(n);
                    }
                }
            }
            for name in names.iter().chain([&p.bridge]) {
                match index(&self.handle, name).await {
                    Ok(Some(i)) => {
                        if let Err(e) = self.handle.link().del(i).execute().await {
                            tracing::warn!("cannot remove {name}: {e}");
                        }
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!("cannot look up {name}: {e:#}"),
                }
            }
            tracing::info!(bridge = %p.bridge, "host network removed");
        }
    }

    /// Makes sure the tap `tap` exists (owned by `owner`), is a port of the bridge and is up.
    /// Returns whether it had to be created.
    async fn ensure_tap(h: &Handle, bridge: &str, bridge_index: u32, tap: &str, owner: u32) -> anyhow::Result<bool> {
        let created = index(h, tap).await?.is_none();
        if created {
            create_tap(tap, owner).with_context(|| format!("cannot create the tap {tap}"))?;
        }
        let i = index(h, tap).await?.with_context(|| format!("the tap {tap} has no index"))?;
        h.link()
            .set(LinkUnspec::new_with_index(i).controller(bridge_index).up().build())
            .execute()
            .await
            .with_context(|| format!("cannot attach {tap} to {bridge}"))?;
        Ok(created)
    }

    /// The tap of a VM the running agent did not plan for (added by a reload), made and put
    /// on the bridge before QEMU opens it. Returns whether it was created.
    pub async fn attach_tap(bridge: &str, tap: &str, owner: u32) -> anyhow::Result<bool> {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening a netlink socket")?;
        let conn = tokio::spawn(conn);
        let result = async {
            let b = index(&handle, bridge).await?.with_context(|| {
                format!("the bridge {bridge} does not exist (the lab's bridge changed? restart kubenet serve)")
            })?;
            ensure_tap(&handle, bridge, b, tap, owner).await
        }
        .await;
        conn.abort();
        result
    }

    async fn index(h: &Handle, name: &str) -> anyhow::Result<Option<u32>> {
        let mut links = h.link().get().match_name(name.to_owned()).execute();
        match links.try_next().await {
            Ok(l) => Ok(l.map(|l| l.header.index)),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot look up {name}")),
        }
    }

    /// A persistent tap owned by `owner` (ip tuntap add mode tap user UID).
    fn create_tap(name: &str, owner: u32) -> anyhow::Result<()> {
        let tun = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun").context("/dev/net/tun")?;
        // SAFETY: ifreq is plain old data; all-zero is valid.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        if name.len() >= req.ifr_name.len() {
            bail!("`{name}` is longer than 15 bytes");
        }
        for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        let fd = tun.as_raw_fd();
        // SAFETY: valid fd, a fully initialised ifreq, and integer arguments as the tun driver
        // expects.
        unsafe {
            if libc::ioctl(fd, libc::TUNSETIFF, &req) < 0
                || libc::ioctl(fd, libc::TUNSETOWNER, owner as libc::c_ulong) < 0
                || libc::ioctl(fd, libc::TUNSETPERSIST, 1 as libc::c_ulong) < 0
            {
                return Err(std::io::Error::last_os_error().into());
            }
        }
        Ok(())
    }

    fn nft(script: &str) -> anyhow::Result<()> {
        use std::io::Write;
        let mut child = std::process::Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("cannot run nft (install nftables)")?;
        child.stdin.take().expect("piped").write_all(script.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("nft: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_lab_gets_a_bridge_seven_taps_and_nat() {
        let lab =
            kubenet_cluster::parse(kubenet_cluster::REFERENCE_CONFIG, kubenet_cluster::Source::Embedded, "/".as_ref())
                .unwrap();
        let p = plan(&lab, 1000);
        assert_eq!(
            (p.bridge.as_str(), p.address, p.subnet.to_string().as_str()),
            ("kubenet0", Ipv4Addr::new(192, 168, 1, 1), "192.168.1.0/24")
        );
        assert_eq!(
            p.taps,
            ["kubenet0-0", "kubenet0-1", "kubenet0-2", "kubenet0-3", "kubenet0-4", "kubenet0-5", "kubenet0-6"]
        );
        assert!(p.nat);
        assert_eq!(
            nat_ruleset(&p),
            "table ip kubenet_kubenet0 {\n  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n    ip saddr 192.168.1.0/24 ip daddr != 192.168.1.0/24 masquerade\n  }\n}\n"
        );
        assert_eq!(nat_table("br-lab.1"), "kubenet_br_lab_1");
        assert!(p.taps.iter().all(|t| is_tap_of(t, "kubenet0")));
        assert!(is_tap_of("a-very-long--12", "a-very-long-bridge"), "cut to 15 bytes");
        assert!(!is_tap_of("a-very-long-b-12", "a-very-long-bridge"), "16 bytes: not a tap name");
        for other in ["kubenet0", "kubenet0-", "kubenet0-x", "kubenet1-0", "kp0"] {
            assert!(!is_tap_of(other, "kubenet0"), "{other}");
        }
    }
}
