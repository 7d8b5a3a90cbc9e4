//! Linux host networking for the lab: what macOS's vmnet-shared gives for free. A bridge with
//! the host's lab address, one persistent tap per VM on it (owned by the user, so QEMU needs no
//! root to open it), and optionally IP forwarding, a forward filter and an nftables masquerade
//! rule, so the VMs reach the host's networks. Made when `kubenet serve` starts, removed when it
//! stops. Linux only (the module is compiled for Linux alone).
//!
//! Root touches only interfaces it made: each link kubenet creates carries its [`mark`] as the
//! link's alias (IFLA_IFALIAS), and an existing interface of the bridge's or a tap's name is
//! adopted only when it carries that mark, and removed only then. A subnet that overlaps a
//! network already on one of the host's interfaces is refused ([`overlap`]).
//!
//! [`plan`], [`bridge_verdict`], [`tap_verdict`], [`overlap`] and [`nat_ruleset`] are pure;
//! [`HostNet::apply`] and [`HostNet::remove`] talk to the kernel: netlink (rtnetlink) for links
//! and addresses, the tun driver's ioctls for taps (netlink cannot make them), `nft` for the
//! rules.

use std::net::Ipv4Addr;
use std::path::Path;

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
    /// The alias the bridge and taps carry: [`mark`] of the lab's state directory.
    pub mark: String,
}

pub fn plan(lab: &Lab, owner: u32) -> Plan {
    Plan {
        bridge: lab.network.bridge.clone(),
        address: lab.network.host_address,
        subnet: lab.network.subnet,
        taps: lab.vms.iter().map(|vm| kubenet_vm::qemu::tap_name(lab, vm)).collect(),
        owner,
        nat: lab.network.nat,
        mark: mark(&lab.state_dir),
    }
}

/// What every kubenet mark starts with.
pub const MARK_PREFIX: &str = "kubenet:";

/// The alias kubenet gives the links it makes for the lab whose state lives in `state_dir`:
/// "kubenet:" and that path, cut to the kernel's limit (IFALIASZ, 256 with the NUL).
pub fn mark(state_dir: &Path) -> String {
    let mut m = format!("{MARK_PREFIX}{}", state_dir.display());
    let mut end = m.len().min(255);
    while !m.is_char_boundary(end) {
        end -= 1;
    }
    m.truncate(end);
    m
}

/// Why `serve` will not build the lab's network on this host.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{name} exists and is not a bridge kubenet made: pick another network.bridge")]
    NotOurBridge { name: String },
    #[error("{name} is the bridge of another kubenet lab ({mark}): pick another network.bridge")]
    OtherLab { name: String, mark: String },
    #[error("{name} exists and is not a tap kubenet made for this lab: remove it, or pick another network.bridge")]
    NotOurTap { name: String },
    #[error("the lab's {lab} overlaps {interface}'s {theirs}: pick another subnet")]
    Overlap { lab: Ipv4Net, interface: String, theirs: Ipv4Net },
    #[error("`{name}` cannot be named in an nftables rule: use letters, digits, '.', '_' and '-' in network.bridge")]
    UnsafeName { name: String },
}

/// What the kernel says about an existing link of a wanted name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkFacts {
    pub kind: LinkKind,
    /// IFLA_IFALIAS, if set.
    pub alias: Option<String>,
}

/// The kinds of link kubenet makes (IFLA_INFO_KIND "bridge" and "tun"), and the rest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkKind {
    Bridge,
    Tap,
    Other,
}

/// What to do about the bridge's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Take {
    /// Nothing has the name: make it (and mark it).
    Create,
    /// kubenet's own for this lab, left by an earlier agent (VMs outlived it, or a crash).
    Adopt,
}

/// The bridge's name is free, or this lab's marked bridge; anything else is someone's
/// interface (a typo of `eth0`, a libvirt or docker bridge, another lab's) and is refused.
pub fn bridge_verdict(name: &str, existing: Option<&LinkFacts>, mark: &str) -> Result<Take, Refusal> {
    match existing {
        None => Ok(Take::Create),
        Some(l) if l.kind == LinkKind::Bridge && l.alias.as_deref() == Some(mark) => Ok(Take::Adopt),
        Some(l) if l.kind == LinkKind::Bridge && l.alias.as_deref().is_some_and(|a| a.starts_with(MARK_PREFIX)) => {
            Err(Refusal::OtherLab { name: name.into(), mark: l.alias.clone().unwrap_or_default() })
        }
        Some(_) => Err(Refusal::NotOurBridge { name: name.into() }),
    }
}

/// A tap's name: free, or a tap carrying this lab's mark.
pub fn tap_verdict(name: &str, existing: Option<&LinkFacts>, mark: &str) -> Result<Take, Refusal> {
    match existing {
        None => Ok(Take::Create),
        Some(l) if l.kind == LinkKind::Tap && l.alias.as_deref() == Some(mark) => Ok(Take::Adopt),
        Some(_) => Err(Refusal::NotOurTap { name: name.into() }),
    }
}

/// The first of the host's networks (`host`: interface and address with its prefix) that
/// shares an address with the lab's subnet: two routes for one network, and the lab's DHCP
/// and DNS answering on a LAN. The caller leaves out the lab's own (adopted) bridge.
pub fn overlap(lab: Ipv4Net, host: &[(String, Ipv4Net)]) -> Option<Refusal> {
    let lab = lab.trunc();
    host.iter().find_map(|(interface, net)| {
        let theirs = net.trunc();
        (lab.contains(&theirs.network()) || theirs.contains(&lab.network())).then(|| Refusal::Overlap {
            lab,
            interface: interface.clone(),
            theirs,
        })
    })
}

/// The host's IPv4 networks, by interface, but `except` (the lab's own bridge).
pub fn host_networks(except: &str) -> Vec<(String, Ipv4Net)> {
    kubenet_udp::addresses()
        .into_iter()
        .filter(|a| a.interface != except)
        .filter_map(|a| match a.address {
            std::net::IpAddr::V4(v4) => Some((a.interface, Ipv4Net::new(v4, a.prefix.unwrap_or(32)).ok()?)),
            std::net::IpAddr::V6(_) => None,
        })
        .collect()
}

/// The nftables table name for a bridge (family ip; the faults' table has it in family bridge).
pub fn nat_table(bridge: &str) -> String {
    crate::agent::faults::table_name(bridge)
}

/// kubenet's nftables table, as libvirt's NAT networks have it:
/// - `forward`: the lab's subnet leaves from the bridge, answers come back to it, and nothing
///   else is forwarded to or from the bridge. With `isolate` (`serve` turned ip_forward on
///   itself) the policy is drop, so that switch makes the host a router for the lab alone and
///   not between its other interfaces; otherwise the rest of the host's forwarding is left to
///   whoever turned it on.
/// - `postrouting`: traffic from the lab to anywhere else leaves with the host's address.
///
/// Loaded with `nft -f`, which applies the script in one transaction.
pub fn nat_ruleset(plan: &Plan, isolate: bool) -> Result<String, Refusal> {
    let b = &plan.bridge;
    // Quoted in the script: a name with a quote or a brace would be a rule of its own.
    crate::agent::faults::safe_name(b).map_err(|_| Refusal::UnsafeName { name: b.clone() })?;
    let net = plan.subnet.trunc();
    let policy = if isolate { "drop" } else { "accept" };
    // The table made and deleted first, then written whole, in one transaction: an earlier
    // agent's table (kept for VMs that outlived it) is replaced, not added to.
    Ok(format!(
        "table ip {t}
delete table ip {t}
table ip {t} {{
  chain forward {{
    type filter hook forward priority filter; policy {policy};
    iifname \"{b}\" ip saddr {net} accept
    oifname \"{b}\" ip daddr {net} ct state established,related accept
    iifname \"{b}\" drop
    oifname \"{b}\" drop
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {net} ip daddr != {net} masquerade
  }}
}}
",
        t = nat_table(b)
    ))
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
    use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
    use rtnetlink::{Handle, LinkBridge, LinkUnspec};

    use super::{
        LinkFacts, LinkKind, MARK_PREFIX, Plan, Take, bridge_verdict, host_networks, is_tap_of, nat_ruleset, nat_table,
        overlap, tap_verdict,
    };

    const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

    /// The lab's network as built; [`HostNet::remove`] takes it down.
    pub struct HostNet {
        plan: Plan,
        handle: Handle,
        /// ip_forward before we turned it on, to put back.
        forward_was: Option<String>,
        /// Whether this agent loaded kubenet's nftables table, so that removing it takes no
        /// table of another agent's.
        nat_loaded: bool,
    }

    /// What [`HostNet::check`] found: how to take the bridge, and the NAT script with the
    /// ip_forward value it was made for.
    struct Checked {
        take: Take,
        bridge_index: Option<u32>,
        nat: Option<(String, String)>,
    }

    impl HostNet {
        /// Builds the plan. This lab's marked bridge or taps (left by VMs that outlived an
        /// earlier agent) are adopted; any other interface of those names, or a subnet that
        /// overlaps one of the host's networks, is refused and left as it was.
        pub async fn apply(plan: Plan) -> anyhow::Result<HostNet> {
            let (conn, handle, _) = rtnetlink::new_connection().context("opening a netlink socket")?;
            tokio::spawn(conn);
            let mut net = HostNet { plan, handle, forward_was: None, nat_loaded: false };
            // A refusal comes before anything is made: nothing to undo, and nothing of anyone
            // else's (a running lab's bridge included) is taken down for it.
            let checked = net.check().await?;
            if let Err(e) = net.build(checked).await {
                net.remove().await;
                return Err(e);
            }
            Ok(net)
        }

        /// The refusals: a bridge or tap name that is not this lab's, a subnet the host has.
        async fn check(&self) -> anyhow::Result<Checked> {
            let p = &self.plan;
            let h = &self.handle;
            let existing = link(h, &p.bridge).await?;
            let take = bridge_verdict(&p.bridge, existing.as_ref().map(|(_, f)| f), &p.mark)?;
            // Every network on the host but the lab's own bridge; checked before anything is
            // made, so a refusal changes nothing.
            if let Some(refusal) = overlap(p.subnet, &host_networks(&p.bridge)) {
                return Err(refusal.into());
            }
            for tap in &p.taps {
                tap_verdict(tap, link(h, tap).await?.as_ref().map(|(_, f)| f), &p.mark)?;
            }
            let nat = if p.nat {
                let was = std::fs::read_to_string(IP_FORWARD).unwrap_or_default();
                Some((nat_ruleset(p, was.trim() == "0")?, was))
            } else {
                None
            };
            Ok(Checked { take, bridge_index: existing.map(|(i, _)| i), nat })
        }

        async fn build(&mut self, checked: Checked) -> anyhow::Result<()> {
            let p = self.plan.clone();
            let h = &self.handle;
            let Checked { take, bridge_index, nat } = checked;
            let bridge = match (take, bridge_index) {
                (Take::Adopt, Some(i)) => i,
                _ => {
                    h.link().add(LinkBridge::new(&p.bridge).build()).execute().await.with_context(|| {
                        format!(
                            "cannot create the bridge {} (kubenet serve needs root; --no-bridge skips it)",
                            p.bridge
                        )
                    })?;
                    let i = index(h, &p.bridge).await?.context("the new bridge has no index")?;
                    set_mark(h, i, &p.bridge, &p.mark).await?;
                    i
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
                ensure_tap(h, &p.bridge, bridge, tap, p.owner, &p.mark).await?;
            }
            if let Some((rules, was)) = nat {
                self.forward_was = Some(was);
                std::fs::write(IP_FORWARD, "1\n").context("cannot turn on IP forwarding")?;
                self.nat_loaded = true;
                nft(&rules).context("cannot add the NAT rule (nat = false in [network] turns NAT off)")?;
            }
            tracing::info!(bridge = %p.bridge, address = %format!("{}/{prefix}", p.address), taps = p.taps.len(), nat = p.nat, adopted = (take == Take::Adopt), "host network up");
            Ok(())
        }

        /// Removes the NAT rules, this lab's marked taps and bridge, and puts ip_forward back.
        /// A link of those names without the lab's mark is someone else's and stays.
        pub async fn remove(self) {
            let p = &self.plan;
            if self.nat_loaded {
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
                    if let LinkAttribute::IfName(n) = attr
                        && is_tap_of(&n, &p.bridge)
                        && !names.contains(&n)
                    {
                        names.push(n);
                    }
                }
            }
            let mut removed = 0;
            for name in names.iter().chain([&p.bridge]) {
                match link(&self.handle, name).await {
                    Ok(Some((i, facts))) if facts.alias.as_deref() == Some(p.mark.as_str()) => {
                        match self.handle.link().del(i).execute().await {
                            Ok(()) => removed += 1,
                            Err(e) => tracing::warn!("cannot remove {name}: {e}"),
                        }
                    }
                    Ok(Some(_)) => tracing::debug!("left {name} alone: not marked as this lab's"),
                    Ok(None) => {}
                    Err(e) => tracing::warn!("cannot look up {name}: {e:#}"),
                }
            }
            tracing::info!(bridge = %p.bridge, removed, "host network removed");
        }
    }

    /// Makes sure the tap `tap` exists (owned by `owner`, marked `mark`), is a port of the
    /// bridge and is up. A tap of that name without the mark is refused, not taken over.
    /// Returns whether it had to be created.
    async fn ensure_tap(
        h: &Handle,
        bridge: &str,
        bridge_index: u32,
        tap: &str,
        owner: u32,
        mark: &str,
    ) -> anyhow::Result<bool> {
        let take = tap_verdict(tap, link(h, tap).await?.as_ref().map(|(_, f)| f), mark)?;
        let created = take == Take::Create;
        if created {
            create_tap(tap, owner).with_context(|| format!("cannot create the tap {tap}"))?;
        }
        let i = index(h, tap).await?.with_context(|| format!("the tap {tap} has no index"))?;
        if created {
            set_mark(h, i, tap, mark).await?;
        }
        h.link()
            .set(LinkUnspec::new_with_index(i).controller(bridge_index).up().build())
            .execute()
            .await
            .with_context(|| format!("cannot attach {tap} to {bridge}"))?;
        Ok(created)
    }

    /// The tap of a VM the running agent did not plan for (added by a reload), made and put
    /// on the bridge before QEMU opens it. Only onto a bridge kubenet marked, and the tap gets
    /// that bridge's mark. Returns whether it was created.
    pub async fn attach_tap(bridge: &str, tap: &str, owner: u32) -> anyhow::Result<bool> {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening a netlink socket")?;
        let conn = tokio::spawn(conn);
        let result = async {
            let (b, facts) = link(&handle, bridge).await?.with_context(|| {
                format!("the bridge {bridge} does not exist (the lab's bridge changed? restart kubenet serve)")
            })?;
            let mark = match facts.alias {
                Some(m) if facts.kind == LinkKind::Bridge && m.starts_with(MARK_PREFIX) => m,
                _ => bail!("{bridge} is not a bridge kubenet made: no tap goes onto it"),
            };
            ensure_tap(&handle, bridge, b, tap, owner, &mark).await
        }
        .await;
        conn.abort();
        result
    }

    /// A link's index and what kubenet judges it by: whether it is a bridge or a tap (the tun
    /// driver's kind), and its alias.
    async fn link(h: &Handle, name: &str) -> anyhow::Result<Option<(u32, LinkFacts)>> {
        let mut links = h.link().get().match_name(name.to_owned()).execute();
        match links.try_next().await {
            Ok(Some(l)) => Ok(Some((l.header.index, facts(&l)))),
            Ok(None) => Ok(None),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot look up {name}")),
        }
    }

    fn facts(l: &LinkMessage) -> LinkFacts {
        let mut f = LinkFacts { kind: LinkKind::Other, alias: None };
        for a in &l.attributes {
            match a {
                LinkAttribute::IfAlias(s) if !s.is_empty() => f.alias = Some(s.clone()),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        match i {
                            LinkInfo::Kind(InfoKind::Bridge) => f.kind = LinkKind::Bridge,
                            LinkInfo::Kind(InfoKind::Tun) => f.kind = LinkKind::Tap,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        f
    }

    /// Marks a link kubenet just made as its own (IFLA_IFALIAS, as `ip link set NAME alias`).
    async fn set_mark(h: &Handle, index: u32, name: &str, mark: &str) -> anyhow::Result<()> {
        h.link()
            .set(LinkUnspec::new_with_index(index).alias(mark).build())
            .execute()
            .await
            .with_context(|| format!("cannot mark {name} as kubenet's"))
    }

    async fn index(h: &Handle, name: &str) -> anyhow::Result<Option<u32>> {
        Ok(link(h, name).await?.map(|(i, _)| i))
    }

    /// A persistent tap owned by `owner` (ip tuntap add mode tap user UID).
    fn create_tap(name: &str, owner: u32) -> anyhow::Result<()> {
        let tun = kubenet_vm::tap::open(name, 0).with_context(|| format!("cannot make the tap {name}"))?;
        let fd = tun.as_raw_fd();
        // SAFETY: a valid tun descriptor and integer arguments, as the tun driver expects.
        unsafe {
            if libc::ioctl(fd, libc::TUNSETOWNER, owner as libc::c_ulong) < 0
                || libc::ioctl(fd, libc::TUNSETPERSIST, 1 as libc::c_ulong) < 0
            {
                return Err(std::io::Error::last_os_error().into());
            }
        }
        Ok(())
    }

    fn nft(script: &str) -> anyhow::Result<()> {
        use std::io::Write;
        let nft =
            kubenet_vm::trust::program("nft").map_err(|e| anyhow::anyhow!("cannot run nft: {e} (install nftables)"))?;
        let mut child = std::process::Command::new(nft)
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
        assert_eq!(p.mark, "kubenet:/", "the reference lab keeps its state in its base directory");
        assert_eq!(nat_table("br-lab.1"), "kubenet_br_2dlab_2e1", "one table name per bridge name");
        assert!(p.taps.iter().all(|t| is_tap_of(t, "kubenet0")));
        assert!(is_tap_of("a-very-long--12", "a-very-long-bridge"), "cut to 15 bytes");
        assert!(!is_tap_of("a-very-long-b-12", "a-very-long-bridge"), "16 bytes: not a tap name");
        for other in ["kubenet0", "kubenet0-", "kubenet0-x", "kubenet1-0", "kp0"] {
            assert!(!is_tap_of(other, "kubenet0"), "{other}");
        }
    }

    fn reference() -> Plan {
        let lab =
            kubenet_cluster::parse(kubenet_cluster::REFERENCE_CONFIG, kubenet_cluster::Source::Embedded, "/".as_ref())
                .unwrap();
        plan(&lab, 1000)
    }

    #[test]
    fn the_ruleset_forwards_the_lab_alone_and_masquerades_it() {
        let p = reference();
        let with_policy = |policy: &str| {
            format!(
                "table ip kubenet_kubenet0
delete table ip kubenet_kubenet0
table ip kubenet_kubenet0 {{
  chain forward {{
    type filter hook forward priority filter; policy {policy};
    iifname \"kubenet0\" ip saddr 192.168.1.0/24 accept
    oifname \"kubenet0\" ip daddr 192.168.1.0/24 ct state established,related accept
    iifname \"kubenet0\" drop
    oifname \"kubenet0\" drop
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr 192.168.1.0/24 ip daddr != 192.168.1.0/24 masquerade
  }}
}}
"
            )
        };
        // Forwarding was on already: someone else routes through this host, and keeps doing so.
        assert_eq!(nat_ruleset(&p, false).unwrap(), with_policy("accept"));
        // serve turned it on: the host forwards for the lab and nothing else.
        assert_eq!(nat_ruleset(&p, true).unwrap(), with_policy("drop"));
        for bad in ["lan\"0", "a{b", "a;b", ""] {
            let q = Plan { bridge: bad.into(), ..p.clone() };
            assert_eq!(nat_ruleset(&q, true), Err(Refusal::UnsafeName { name: bad.into() }), "{bad}");
        }
    }

    #[test]
    fn only_this_labs_marked_bridge_and_taps_are_taken() {
        let m = "kubenet:/home/ann/lab/.kubenet";
        let facts = |kind, alias: Option<&str>| LinkFacts { kind, alias: alias.map(str::to_owned) };
        assert_eq!(bridge_verdict("kubenet0", None, m), Ok(Take::Create));
        assert_eq!(bridge_verdict("kubenet0", Some(&facts(LinkKind::Bridge, Some(m))), m), Ok(Take::Adopt));
        let refused = |f: LinkFacts| bridge_verdict("lan0", Some(&f), m).unwrap_err().to_string();
        let not_ours = "lan0 exists and is not a bridge kubenet made: pick another network.bridge";
        assert_eq!(refused(facts(LinkKind::Other, None)), not_ours, "a veth or NIC");
        assert_eq!(refused(facts(LinkKind::Other, Some(m))), not_ours, "the mark on something else");
        assert_eq!(refused(facts(LinkKind::Bridge, None)), not_ours, "docker's or libvirt's bridge");
        assert_eq!(refused(facts(LinkKind::Bridge, Some("uplink"))), not_ours);
        assert_eq!(refused(facts(LinkKind::Tap, Some(m))), not_ours, "one of our taps is not a bridge");
        assert_eq!(
            refused(facts(LinkKind::Bridge, Some("kubenet:/srv/other"))),
            "lan0 is the bridge of another kubenet lab (kubenet:/srv/other): pick another network.bridge"
        );
        assert_eq!(tap_verdict("kubenet0-1", None, m), Ok(Take::Create));
        assert_eq!(tap_verdict("kubenet0-1", Some(&facts(LinkKind::Tap, Some(m))), m), Ok(Take::Adopt));
        for f in [facts(LinkKind::Tap, None), facts(LinkKind::Tap, Some("kubenet:/x")), facts(LinkKind::Other, Some(m))]
        {
            assert_eq!(tap_verdict("t", Some(&f), m), Err(Refusal::NotOurTap { name: "t".into() }), "{f:?}");
        }
    }

    #[test]
    fn the_mark_names_the_state_directory_within_the_kernels_limit() {
        assert_eq!(mark(Path::new("/home/ann/lab/.kubenet")), "kubenet:/home/ann/lab/.kubenet");
        let long = format!("/{}", "é".repeat(200));
        let m = mark(Path::new(&long));
        assert!(m.len() <= 255 && m.starts_with("kubenet:/é"), "{}", m.len());
    }

    #[test]
    fn a_subnet_on_another_interface_is_an_overlap_named_by_it() {
        let net = |s: &str| s.parse::<Ipv4Net>().unwrap();
        let lab = net("192.168.1.0/24");
        let host = |list: &[(&str, &str)]| list.iter().map(|(i, n)| ((*i).to_owned(), net(n))).collect::<Vec<_>>();
        assert_eq!(overlap(lab, &host(&[("lo", "127.0.0.1/8"), ("eth0", "10.0.0.7/16")])), None);
        assert_eq!(
            overlap(lab, &host(&[("lo", "127.0.0.1/8"), ("wlan0", "192.168.1.23/24")])).unwrap().to_string(),
            "the lab's 192.168.1.0/24 overlaps wlan0's 192.168.1.0/24: pick another subnet"
        );
        // Wider and narrower networks, and a lone address inside the lab.
        let hit = |n: &str| overlap(lab, &host(&[("x", n)])).map(|r| r.to_string());
        assert!(hit("192.168.0.1/16").unwrap().contains("x's 192.168.0.0/16"));
        assert!(hit("192.168.1.200/28").unwrap().contains("x's 192.168.1.192/28"));
        assert!(hit("192.168.1.9/32").is_some());
        assert_eq!(hit("192.168.2.1/24"), None, "the next /24");
        assert_eq!(hit("192.168.0.255/24"), None, "the one before");
    }
}
