//! Which queries the DNS server takes at all: those that arrive on the lab's interface or on
//! loopback, and nothing from the host's other networks (dnsmasq's `--local-service`). Pure,
//! but for [`loopback_ifindex`], which asks the kernel once at start.
//!
//! A query that is not admitted is dropped without a reply and counted
//! (`Counters::outside`): a REFUSED would still make the root agent a reflector for whoever can
//! reach it. The access list (`allow`) comes after and answers REFUSED to an admitted client
//! whose address is not the lab's.
//!
//! How the agent uses it (`serve`):
//! ```text
//! // At bind time, with the lab's bridge if it exists already (Linux):
//! // `address`: the host's address on the lab's network, with its prefix (192.168.1.1/24).
//! let admit = Admit::lab_and_loopback(Some(LabInterface { ifindex, address }))?;
//! let dns = Dns::with_admit(zone, forwarder, allow, admit);
//! // Where the lab's interface appears only later (macOS's vmnet bridge), once it has:
//! dns.admit().set_lab(LabInterface { ifindex, address });
//! ```
//! `Dns::new` admits everything ([`Admit::any`]), for tests and callers that do not care.
//! With [`Admit::finding`] the policy looks for the lab's interface again itself, at most once a
//! second and only when a query came from an interface it does not know: what the DHCP server
//! does, and what an interface that appears (or is made again) after start needs, with no
//! timer waking an idle agent.
//!
//! UDP is judged by the interface a datagram came in on (IP_PKTINFO, `kubenet_udp::Envelope`),
//! which a sender cannot forge; a datagram whose interface is unknown (an IPv6 socket) is
//! admitted only from a loopback address. TCP has no such index, but its peer address cannot
//! be forged (the handshake must complete, and the lab's replies go to the lab): a connection
//! is taken when made to a loopback address, or to the lab's address from inside the lab's
//! network. The lab's address alone would not do: a LAN host that routes the lab's subnet
//! through this host reaches it too (the weak host model).

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::RwLock;
use std::sync::atomic::{AtomicU32, Ordering};

use ipnet::Ipv4Net;

/// The lab's interface: its index, and the host's address on it with the lab's prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LabInterface {
    pub ifindex: u32,
    pub address: Ipv4Net,
}

/// The source policy of the UDP and TCP loops. See the module header.
pub struct Admit {
    any: bool,
    loopback: u32,
    /// The lab's interface index, 0 while it has none: what each datagram is compared with.
    lab_ifindex: AtomicU32,
    /// The whole of it, for TCP (once a connection) and for the caller.
    lab: RwLock<Option<LabInterface>>,
    /// Finds the lab's interface as it is now ([`Admit::finding`]), and when it last looked.
    finder: Option<Finder>,
    last_look: std::sync::Mutex<Option<std::time::Instant>>,
}

type Finder = Box<dyn Fn() -> Option<LabInterface> + Send + Sync>;

impl std::fmt::Debug for Admit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admit")
            .field("any", &self.any)
            .field("loopback", &self.loopback)
            .field("lab", &self.lab_interface())
            .field("finding", &self.finder.is_some())
            .finish()
    }
}

impl Admit {
    /// Every query, from anywhere.
    pub fn any() -> Admit {
        Admit {
            any: true,
            loopback: 0,
            lab_ifindex: AtomicU32::new(0),
            lab: RwLock::new(None),
            finder: None,
            last_look: Default::default(),
        }
    }

    /// Queries on the loopback interface (index `loopback`) and on the lab's, once known.
    pub fn lab(loopback: u32, lab: Option<LabInterface>) -> Admit {
        let lab_ifindex = AtomicU32::new(lab.map_or(0, |l| l.ifindex));
        Admit { any: false, loopback, lab_ifindex, lab: RwLock::new(lab), finder: None, last_look: Default::default() }
    }

    /// This policy, looking for the lab's interface with `finder` when a query comes from an
    /// interface it does not know (at most once a second).
    pub fn finding(mut self, finder: impl Fn() -> Option<LabInterface> + Send + Sync + 'static) -> Admit {
        self.finder = Some(Box::new(finder));
        self
    }

    /// Looks for the lab's interface again, unless it looked less than a second ago; true when
    /// it found one other than the one it knew.
    fn look_again(&self) -> bool {
        let Some(find) = &self.finder else { return false };
        {
            let mut last = self.last_look.lock().expect("admit lock");
            let now = std::time::Instant::now();
            if last.is_some_and(|t| now.duration_since(t) < std::time::Duration::from_secs(1)) {
                return false;
            }
            *last = Some(now);
        }
        match find() {
            Some(found) if Some(found) != self.lab_interface() => {
                self.set_lab(found);
                true
            }
            _ => false,
        }
    }

    /// [`Admit::lab`] with the host's loopback interface.
    pub fn lab_and_loopback(lab: Option<LabInterface>) -> io::Result<Admit> {
        Ok(Admit::lab(loopback_ifindex()?, lab))
    }

    /// The lab's interface, now that it exists (or has a new index); takes effect at the next
    /// query.
    pub fn set_lab(&self, lab: LabInterface) {
        *self.lab.write().expect("admit lock") = Some(lab);
        self.lab_ifindex.store(lab.ifindex, Ordering::Relaxed);
    }

    /// The lab's interface, if known.
    pub fn lab_interface(&self) -> Option<LabInterface> {
        *self.lab.read().expect("admit lock")
    }

    /// Whether a datagram from `src` that came in on interface `ifindex` (0: unknown) is
    /// taken. Per datagram: a load and integer compares.
    pub fn udp(&self, ifindex: u32, src: IpAddr) -> bool {
        if self.any {
            return true;
        }
        if ifindex == 0 {
            return is_loopback(src);
        }
        // A lab index of 0 (none yet) never matches: 0 was handled above.
        let known = |i: u32| i == self.loopback || i == self.lab_ifindex.load(Ordering::Relaxed);
        known(ifindex) || (self.look_again() && known(ifindex))
    }

    /// Whether a TCP connection from `peer` made to `local` (the accepted socket's own
    /// address) is taken.
    pub fn tcp(&self, local: SocketAddr, peer: SocketAddr) -> bool {
        if self.any || is_loopback(local.ip()) {
            return true;
        }
        let taken = |lab: Option<LabInterface>| {
            lab.is_some_and(|lab| {
                ipv4(local.ip()) == Some(lab.address.addr())
                    && ipv4(peer.ip()).is_some_and(|p| lab.address.contains(&p))
            })
        };
        taken(self.lab_interface()) || (self.look_again() && taken(self.lab_interface()))
    }
}

fn ipv4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(v6) => v6.to_ipv4_mapped(),
    }
}

/// Loopback, an IPv4-mapped IPv6 one included.
fn is_loopback(ip: IpAddr) -> bool {
    ipv4(ip).map_or(ip.is_loopback(), |v4| v4.is_loopback())
}

/// The index of the host's loopback interface (`lo` on Linux, `lo0` on macOS).
pub fn loopback_ifindex() -> io::Result<u32> {
    let name: &std::ffi::CStr = if cfg!(target_os = "linux") { c"lo" } else { c"lo0" };
    // SAFETY: `name` is a valid NUL-terminated string; the call only reads it.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(io::Error::last_os_error()),
        i => Ok(i),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LO: u32 = 1;
    const BRIDGE: u32 = 7;
    const LAN: u32 = 2;

    fn lab() -> LabInterface {
        LabInterface { ifindex: BRIDGE, address: "192.168.1.1/24".parse().unwrap() }
    }

    fn tcp(admit: &Admit, local: &str, peer: &str) -> bool {
        admit.tcp(local.parse().unwrap(), peer.parse().unwrap())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn udp_is_judged_by_the_interface_it_came_in_on() {
        let admit = Admit::lab(LO, Some(lab()));
        assert!(admit.udp(BRIDGE, ip("192.168.1.14")));
        assert!(admit.udp(LO, ip("127.0.0.1")));
        // The host asking its lab address goes over loopback, from that address.
        assert!(admit.udp(LO, ip("192.168.1.1")));
        // From the LAN, whatever source address it claims.
        assert!(!admit.udp(LAN, ip("192.168.1.14")));
        assert!(!admit.udp(LAN, ip("127.0.0.1")));
        // The interface unknown (IPv6 socket): loopback sources only.
        assert!(admit.udp(0, ip("::1")) && admit.udp(0, ip("::ffff:127.0.0.1")));
        assert!(!admit.udp(0, ip("192.168.1.14")) && !admit.udp(0, ip("2001:db8::1")));
    }

    #[test]
    fn the_lab_interface_can_come_later() {
        let admit = Admit::lab(LO, None);
        assert_eq!(admit.lab_interface(), None);
        assert!(admit.udp(LO, ip("127.0.0.1")));
        assert!(!admit.udp(BRIDGE, ip("192.168.1.14")));
        assert!(!tcp(&admit, "192.168.1.1:53", "192.168.1.14:40000"));
        admit.set_lab(lab());
        assert_eq!(admit.lab_interface(), Some(lab()));
        assert!(admit.udp(BRIDGE, ip("192.168.1.14")));
        assert!(tcp(&admit, "192.168.1.1:53", "192.168.1.14:40000"));
        assert!(!admit.udp(LAN, ip("192.168.1.14")));
    }

    #[test]
    fn tcp_is_judged_by_the_address_it_was_made_to() {
        let admit = Admit::lab(LO, Some(lab()));
        assert!(tcp(&admit, "192.168.1.1:53", "192.168.1.14:40000"));
        assert!(tcp(&admit, "[::ffff:192.168.1.1]:53", "[::ffff:192.168.1.14]:40000"));
        // The host itself at its lab address: from that address.
        assert!(tcp(&admit, "192.168.1.1:53", "192.168.1.1:40000"));
        assert!(tcp(&admit, "127.0.0.53:53", "127.0.0.1:40000"));
        assert!(tcp(&admit, "[::1]:53", "[::1]:40000"));
        // A LAN host that routes the lab's subnet through us, at the lab's address.
        assert!(!tcp(&admit, "192.168.1.1:53", "10.0.0.9:40000"));
        // The host's LAN address (a wildcard listener), or another of the host's.
        assert!(!tcp(&admit, "10.0.0.5:53", "10.0.0.9:40000"));
        assert!(!tcp(&admit, "10.0.0.5:53", "192.168.1.14:40000"));
        assert!(!tcp(&admit, "[2001:db8::5]:53", "[2001:db8::9]:40000"));
    }

    #[test]
    fn any_takes_everything() {
        let admit = Admit::any();
        assert!(admit.udp(LAN, ip("203.0.113.9")) && admit.udp(0, ip("2001:db8::1")));
        assert!(tcp(&admit, "10.0.0.5:53", "203.0.113.9:40000"));
    }

    #[test]
    fn the_loopback_interface_is_found() {
        let lo = loopback_ifindex().unwrap();
        assert_ne!(lo, 0);
    }

    /// An interface that appears after start (vmnet's bridge) is found when its first query
    /// comes, and looking is rate-limited: a flood from a stranger's interface costs one look a
    /// second, not one a packet.
    #[test]
    fn the_lab_interface_is_looked_for_when_a_stranger_interface_asks() {
        use std::sync::Arc;
        use std::sync::atomic::AtomicUsize;
        let looks = Arc::new(AtomicUsize::new(0));
        let (counted, bridge) =
            (looks.clone(), LabInterface { ifindex: BRIDGE, address: "192.168.1.1/24".parse().unwrap() });
        let appeared = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = appeared.clone();
        let a = Admit::lab(LO, None).finding(move || {
            counted.fetch_add(1, Ordering::Relaxed);
            seen.load(Ordering::Relaxed).then_some(bridge)
        });
        let vm: IpAddr = [192, 168, 1, 14].into();
        // Before the bridge exists: refused, and 1000 more from the LAN make no second look.
        assert!(!a.udp(BRIDGE, vm));
        for _ in 0..1000 {
            assert!(!a.udp(LAN, vm));
        }
        assert_eq!(looks.load(Ordering::Relaxed), 1);
        // The bridge appears; a second later its first query is taken, and those after it
        // with no look at all.
        appeared.store(true, Ordering::Relaxed);
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert!(a.udp(BRIDGE, vm));
        assert!(a.udp(BRIDGE, vm));
        assert_eq!(looks.load(Ordering::Relaxed), 2);
        assert_eq!(a.lab_interface(), Some(bridge));
        assert!(!a.udp(LAN, vm), "another interface is still refused");
    }
}
