//! What a reload of the lab definition changes while `kubenet serve` runs: a pure diff of the
//! old and the new lab, field by field. Every field of [`Lab`], [`Network`] and [`Dns`] is named
//! below, so a field added to the model does not compile until it is classed here.
//!
//! Live: the zone (names, addresses, TTL), the DHCP engine's configuration (range, lease time,
//! fixed addresses) and the VMs the agent supervises take the new definition at once, and the
//! CLI reads the file anew at every command anyway. Restart: what binds sockets, builds the
//! host network, picks the forwarder's upstreams or the VMs' host profile when `serve` starts.
//!
//! The lab definition belongs to the agent's owner, who may reload it at will: [`served`] is
//! what the agent then serves, the new definition with every restart field held at its
//! start-time value, and every address still inside the subnet root agreed to at the start. A
//! reload can never move DHCP, DNS or a tap to another network or interface.

use std::net::Ipv4Addr;

use kubenet_cluster::{Dns, Lab, Network};

/// The changed fields of a reload, by when they take effect.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// Fields the running agent applies at once.
    pub live: Vec<&'static str>,
    /// Fields that keep their old value until `serve` restarts.
    pub needs_restart: Vec<&'static str>,
}

impl Diff {
    fn note(&mut self, name: &'static str, changed: bool, live: bool) {
        match (changed, live) {
            (false, _) => {}
            (true, true) => self.live.push(name),
            (true, false) => self.needs_restart.push(name),
        }
    }

    /// One warning per field that waits for a restart, as the `reload` client shows them.
    pub fn warnings(&self) -> Vec<String> {
        self.needs_restart
            .iter()
            .map(|name| {
                format!("{name} changed: it takes effect when kubenet serve restarts (until then the old value holds)")
            })
            .collect()
    }
}

/// The lab the agent serves after a reload to `new`: `new`, with every field [`diff`] classes
/// as needing a restart kept as it was in `start`, the lab `serve` started with. Refused when
/// an address the new definition would serve live (a VM's, the DHCP range) falls outside the
/// running subnet or on the host's address: those need a restart, which re-checks the host.
pub fn served(start: &Lab, new: &Lab) -> Result<Lab, String> {
    let mut lab = new.clone();
    let Lab { source: _, state_dir, accelerator, firmware, network, dns, login: _, vms: _ } = &mut lab;
    (*state_dir, *accelerator, *firmware) = (start.state_dir.clone(), start.accelerator, start.firmware);
    let Network {
        subnet,
        host_name: _,
        host_address,
        dhcp_range: _,
        lease_time: _,
        domain: _,
        ip_offset: _,
        mac_prefix: _,
        upstream,
        bridge,
        nat,
        hosts: _,
        dhcp_relays,
    } = network;
    let s = &start.network;
    (*subnet, *host_address, *bridge, *nat) = (s.subnet, s.host_address, s.bridge.clone(), s.nat);
    upstream.clone_from(&s.upstream);
    dhcp_relays.clone_from(&s.dhcp_relays);
    dns.allow.clone_from(&start.dns.allow);
    let (net, host) = (*subnet, *host_address);
    let outside = |ip: Ipv4Addr| !net.contains(&ip) || ip == host || ip == net.network() || ip == net.broadcast();
    let mut wrong: Vec<String> =
        lab.vms.iter().filter(|vm| outside(vm.ip)).map(|vm| format!("{} at {}", vm.name, vm.ip)).collect();
    let range = lab.network.dhcp_range;
    if outside(range.start) || outside(range.end) || (range.start..=range.end).contains(&host) {
        wrong.push(format!("the DHCP range {}-{}", range.start, range.end));
    }
    if wrong.is_empty() {
        Ok(lab)
    } else {
        Err(format!(
            "{} would leave the running subnet {net} (host {host}): a new network takes a restart of kubenet serve",
            wrong.join(", ")
        ))
    }
}

const LIVE: bool = true;
const RESTART: bool = false;

/// What changes from `old` to `new`, field by field.
pub fn diff(old: &Lab, new: &Lab) -> Diff {
    let Lab { source: _, state_dir, accelerator, firmware, network, dns, login, vms } = new;
    let mut d = Diff::default();
    d.note("state_dir", *state_dir != old.state_dir, RESTART);
    d.note("accelerator", *accelerator != old.accelerator, RESTART);
    d.note("firmware", *firmware != old.firmware, RESTART);
    network_diff(&mut d, &old.network, network);
    dns_diff(&mut d, &old.dns, dns);
    d.note("login", *login != old.login, LIVE);
    d.note("vms", *vms != old.vms, LIVE);
    d
}

fn network_diff(d: &mut Diff, old: &Network, new: &Network) {
    let Network {
        subnet,
        host_name,
        host_address,
        dhcp_range,
        lease_time,
        domain,
        ip_offset,
        mac_prefix,
        upstream,
        bridge,
        nat,
        dhcp_relays,
        hosts,
    } = new;
    d.note("network.subnet", *subnet != old.subnet, RESTART);
    d.note("network.host_name", *host_name != old.host_name, LIVE);
    d.note("network.host_address", *host_address != old.host_address, RESTART);
    d.note("network.dhcp_range", *dhcp_range != old.dhcp_range, LIVE);
    d.note("network.lease_time", *lease_time != old.lease_time, LIVE);
    d.note("network.domain", *domain != old.domain, LIVE);
    d.note("network.ip_offset", *ip_offset != old.ip_offset, LIVE);
    d.note("network.mac_prefix", *mac_prefix != old.mac_prefix, LIVE);
    d.note("network.upstream", *upstream != old.upstream, RESTART);
    d.note("network.bridge", *bridge != old.bridge, RESTART);
    d.note("network.nat", *nat != old.nat, RESTART);
    // Who may reach the DHCP server from outside the lab is fixed when root starts it.
    d.note("network.dhcp_relays", *dhcp_relays != old.dhcp_relays, RESTART);
    d.note("network.hosts", *hosts != old.hosts, LIVE);
}

fn dns_diff(d: &mut Diff, old: &Dns, new: &Dns) {
    let Dns { local_ttl, allow } = new;
    d.note("dns.local_ttl", *local_ttl != old.local_ttl, LIVE);
    d.note("dns.allow", *allow != old.allow, RESTART);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lab() -> Lab {
        kubenet_cluster::load(&kubenet_cluster::Choice::Embedded, std::path::Path::new("/lab")).unwrap()
    }

    /// A field's name, whether it changes live, and a change to it.
    type Case = (&'static str, bool, fn(&mut Lab));

    /// Each field changed alone: where it lands.
    #[test]
    fn each_field_is_live_or_waits_for_a_restart() {
        let cases: [Case; 18] = [
            ("state_dir", RESTART, |l| l.state_dir = "/elsewhere".into()),
            ("accelerator", RESTART, |l| l.accelerator = kubenet_cluster::Accelerator::Tcg),
            ("firmware", RESTART, |l| l.firmware = kubenet_cluster::FirmwareChoice::Bios),
            ("network.subnet", RESTART, |l| l.network.subnet = "10.0.0.0/24".parse().unwrap()),
            ("network.host_name", LIVE, |l| l.network.host_name = "laptop".into()),
            ("network.host_address", RESTART, |l| l.network.host_address = [192, 168, 1, 2].into()),
            ("network.dhcp_range", LIVE, |l| l.network.dhcp_range.end = [192, 168, 1, 9].into()),
            ("network.lease_time", LIVE, |l| l.network.lease_time = kubenet_cluster::LeaseTime::Infinite),
            ("network.domain", LIVE, |l| l.network.domain = "lab".into()),
            ("network.ip_offset", LIVE, |l| l.network.ip_offset = 100),
            ("network.mac_prefix", LIVE, |l| l.network.mac_prefix = [2, 0, 0]),
            ("network.upstream", RESTART, |l| l.network.upstream = vec!["192.0.2.53:53".parse().unwrap()]),
            ("network.bridge", RESTART, |l| l.network.bridge = "br1".into()),
            ("network.nat", RESTART, |l| l.network.nat = !l.network.nat),
            ("network.dhcp_relays", RESTART, |l| l.network.dhcp_relays = vec![[10, 0, 0, 1].into()]),
            ("network.hosts", LIVE, |l| {
                l.network
                    .hosts
                    .push(kubenet_cluster::HostEntry { name: "nas".into(), address: [192, 168, 1, 5].into() })
            }),
            ("dns.allow", RESTART, |l| l.dns.allow.clear()),
            ("vms", LIVE, |l| {
                l.vms.pop();
            }),
        ];
        let old = lab();
        assert_eq!(diff(&old, &old), Diff::default());
        for (name, live, change) in cases {
            let mut new = old.clone();
            change(&mut new);
            let d = diff(&old, &new);
            let (hit, miss) = if live { (&d.live, &d.needs_restart) } else { (&d.needs_restart, &d.live) };
            assert_eq!((hit.as_slice(), miss.as_slice()), ([name].as_slice(), [].as_slice()), "{name}");
        }
    }

    /// The owner's edit of every network field at once: what is served keeps the network root
    /// started with, takes the names, and refuses addresses that would leave the subnet.
    #[test]
    fn a_reload_serves_only_the_safe_fields_within_the_started_network() {
        let start = lab();
        let mut new = start.clone();
        new.network.bridge = "eth0".into();
        new.network.nat = !start.network.nat;
        new.network.upstream = vec!["192.0.2.53:53".parse().unwrap()];
        new.network.dhcp_relays = vec![[10, 0, 0, 1].into()];
        new.dns.allow.clear();
        new.state_dir = "/etc".into();
        new.network.host_name = "laptop".into();
        new.dns.local_ttl = 7;
        new.vms.pop();
        let s = served(&start, &new).unwrap();
        assert_eq!((s.network.bridge.as_str(), s.network.nat), (start.network.bridge.as_str(), start.network.nat));
        assert_eq!((&s.network.upstream, &s.dns.allow), (&start.network.upstream, &start.dns.allow));
        assert_eq!(s.network.dhcp_relays, start.network.dhcp_relays);
        assert_eq!(s.state_dir, start.state_dir);
        assert_eq!((s.network.host_name.as_str(), s.dns.local_ttl, s.vms.len()), ("laptop", 7, start.vms.len() - 1));
        assert_eq!(diff(&s, &new).live, Vec::<&str>::new(), "only restart fields differ from the file");

        // A new subnet moves every VM: refused, naming them and the running subnet.
        let moved = kubenet_cluster::parse(
            &kubenet_cluster::REFERENCE_CONFIG.replace("192.168.1.", "10.9.9."),
            kubenet_cluster::Source::Embedded,
            std::path::Path::new("/lab"),
        )
        .unwrap();
        let e = served(&start, &moved).unwrap_err();
        assert!(e.starts_with("gateway at 10.9.9.10, control0 at 10.9.9.11"), "{e}");
        assert!(e.contains("the DHCP range 10.9.9.2-10.9.9.20 would leave the running subnet 192.168.1.0/24"), "{e}");
        // A DHCP range over the host's address, within the subnet, is refused too.
        let mut over = start.clone();
        over.network.dhcp_range.start = start.network.host_address;
        assert!(served(&start, &over).unwrap_err().contains("the DHCP range 192.168.1.1-"));
    }

    #[test]
    fn ttl_and_login_change_live_and_warnings_name_the_rest() {
        let old = lab();
        let mut new = old.clone();
        new.dns.local_ttl += 1;
        new.login.user = "me".into();
        new.network.nat = !old.network.nat;
        new.network.upstream = vec!["192.0.2.53:53".parse().unwrap()];
        let d = diff(&old, &new);
        assert_eq!(d.live, ["dns.local_ttl", "login"]);
        let w = d.warnings();
        assert_eq!(w.len(), 2);
        assert!(w[0].starts_with("network.upstream changed: it takes effect when kubenet serve restarts"), "{w:?}");
        assert!(w[1].starts_with("network.nat changed"), "{w:?}");
    }
}
