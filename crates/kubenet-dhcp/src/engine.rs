//! The DHCP server's decisions, RFC 2131 as dnsmasq applies it to a lab: a validated request,
//! where it came from and the time go in; a reply, where to send it, and whether the lease table
//! changed come out. Pure: no sockets, no clock, no files. The caller persists the lease table
//! before it sends a reply whose outcome says `leases_changed`.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use ipnet::Ipv4Net;
use kubenet_cluster::{DhcpRange, Lab, LeaseTime, Mac};

use crate::lease::{Lease, LeaseTable};
use crate::throttle::Throttle;
use crate::wire::Request;

pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;
/// How long an offered address is held for the client it was offered to.
const OFFER_HOLD_SECS: u64 = 60;
/// How long a declined address stays out of the pool (RFC 2131 3.1.5 leaves it to the server;
/// dnsmasq uses 10 minutes).
const DECLINE_HOLD_SECS: u64 = 600;
/// At most this many declined addresses in quarantine, and as many offers held. A lab has tens
/// of machines and dnsmasq's default pool holds 150; a few thousand leaves room for a large pool,
/// while a flood of DECLINEs or DISCOVERs from made-up MACs cannot grow the tables without end.
/// A full table drops the quarter of its entries that end soonest (every hold lasts as long,
/// so these are the oldest): one pass every thousand inserts, a constant cost per packet.
const MAX_DECLINED: usize = 4096;
const MAX_OFFERS: usize = 4096;

/// What the engine serves, taken from the lab.
#[derive(Clone, Debug)]
pub struct Config {
    /// The host: server identifier (option 54), router (3) and DNS server (6).
    pub server_id: Ipv4Addr,
    pub subnet: Ipv4Net,
    pub domain: String,
    pub lease: LeaseTime,
    pub pool: DhcpRange,
    /// NAK requests for addresses a client may not have, instead of staying silent
    /// (dnsmasq's `dhcp-authoritative`).
    pub authoritative: bool,
    /// VMs: fixed address and name by MAC.
    pub statics: HashMap<Mac, (Ipv4Addr, String)>,
    /// Addresses the pool never hands out: the host's, the VMs', the extra host entries'.
    pub reserved: std::collections::HashSet<Ipv4Addr>,
    /// Relay agents allowed to forward requests from outside the lab's interface, by the
    /// source address of their datagrams (`network.dhcp_relays`).
    pub relays: Vec<Ipv4Addr>,
}

/// Why a datagram is not the lab's to answer (see [`Config::admit`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Foreign {
    #[error("a request on an interface with no address in the lab's subnet")]
    Interface,
    #[error("a relayed request from a host that network.dhcp_relays does not list")]
    Relay,
}

impl Config {
    pub fn from_lab(lab: &Lab) -> Self {
        let n = &lab.network;
        Config {
            server_id: n.host_address,
            subnet: n.subnet,
            domain: n.domain.clone(),
            lease: n.lease_time,
            pool: n.dhcp_range,
            authoritative: true,
            statics: lab.vms.iter().map(|v| (v.mac, (v.ip, v.name.clone()))).collect(),
            reserved: lab.names().map(|(_, ip)| ip).collect(),
            relays: n.dhcp_relays.clone(),
        }
    }

    /// Whether a datagram from `src`, carrying `giaddr`, is the lab's to answer, before the
    /// engine sees it. `on_lab_interface`: it arrived on an interface holding an address in the
    /// lab's subnet. Anything from there is the lab's (a relay among the VMs included). From
    /// elsewhere only a relayed request (RFC 2131 4.1: giaddr set) may come, and only from a
    /// relay agent the lab lists, sending from its listed address: otherwise any host on any
    /// network the host is on could take leases and names in the lab by setting giaddr.
    pub fn admit(&self, giaddr: Ipv4Addr, src: Ipv4Addr, on_lab_interface: bool) -> Result<(), Foreign> {
        if on_lab_interface {
            Ok(())
        } else if giaddr.is_unspecified() {
            Err(Foreign::Interface)
        } else if self.relays.contains(&src) {
            Ok(())
        } else {
            Err(Foreign::Relay)
        }
    }
}

/// Where a datagram came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    /// The interface it arrived on; replies leave by the same one.
    pub ifindex: u32,
    pub src: SocketAddrV4,
}

/// Where a reply goes, by RFC 2131 section 4.1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    /// To the relay agent named in giaddr, on the server port.
    Relay(SocketAddrV4),
    /// To a client that has an address (ciaddr): renewals and INFORM.
    Unicast(SocketAddrV4),
    /// To 255.255.255.255 out of the receiving interface: the client asked for broadcast, or
    /// it is a NAK.
    Broadcast,
    /// To the address being offered, at the client's MAC: the client has no address yet, so
    /// this needs an ARP entry (or falls back to broadcast).
    Direct { ip: Ipv4Addr, mac: Mac },
}

#[derive(Debug)]
pub struct Reply {
    pub msg: Message,
    /// `msg` encoded ([`crate::wire::encode_reply`]) and within the client's size limit: what
    /// goes on the wire. Encoded once, here, where the limit is checked.
    pub bytes: Vec<u8>,
    pub dest: Destination,
    pub ifindex: u32,
}

#[derive(Debug, Default)]
pub struct Outcome {
    pub reply: Option<Reply>,
    /// The lease table changed: persist it before sending the reply.
    pub leases_changed: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub offers: u64,
    pub acks: u64,
    pub naks: u64,
    pub releases: u64,
    pub declines: u64,
    pub informs: u64,
    /// Well-formed requests that got no reply: another server's, not ours to answer, pool empty.
    pub ignored: u64,
}

pub struct Engine {
    cfg: Config,
    leases: LeaseTable,
    offers: Offers,
    /// No pool address below this one is free and never leased: the search for one starts
    /// here, so a growing pool costs a step per new client, not a walk over every lease. Each
    /// event that frees an address lowers it ([`Engine::freed`]).
    next_scan: u32,
    /// Pool address -> end of its quarantine after a DECLINE; at most [`MAX_DECLINED`].
    declined: HashMap<Ipv4Addr, u64>,
    /// Warnings a client can trigger at will, each written at most once per period.
    warn_decline: Throttle,
    warn_pool_empty: Throttle,
    pub stats: Stats,
}

/// Addresses offered and held for their clients, by client and by address.
#[derive(Debug, Default)]
struct Offers {
    /// MAC -> (offered address, hold expiry).
    by_mac: HashMap<Mac, (Ipv4Addr, u64)>,
    by_ip: HashMap<Ipv4Addr, Mac>,
}

impl Offers {
    fn get(&self, mac: &Mac) -> Option<&(Ipv4Addr, u64)> {
        self.by_mac.get(mac)
    }

    fn insert(&mut self, mac: Mac, ip: Ipv4Addr, until: u64) {
        self.remove(&mac);
        // An address offered to another client whose hold ran out passes to this one.
        if let Some(other) = self.by_ip.insert(ip, mac) {
            self.by_mac.remove(&other);
        }
        self.by_mac.insert(mac, (ip, until));
    }

    /// Withdraws the client's offer; returns the address it held.
    fn remove(&mut self, mac: &Mac) -> Option<Ipv4Addr> {
        let (ip, _) = self.by_mac.remove(mac)?;
        self.by_ip.remove(&ip);
        Some(ip)
    }

    fn expire(&mut self, now: u64) {
        self.by_mac.retain(|_, (_, until)| *until > now);
        let by_mac = &self.by_mac;
        self.by_ip.retain(|_, mac| by_mac.contains_key(mac));
    }

    fn len(&self) -> usize {
        self.by_mac.len()
    }

    /// Room for a new client's offer: expired holds go, then, if the table is still full, the
    /// quarter that ends soonest. Returns the lowest address withdrawn, if any.
    fn make_room(&mut self, mac: Mac, now: u64) -> Option<Ipv4Addr> {
        if self.len() < MAX_OFFERS || self.by_mac.contains_key(&mac) {
            return None;
        }
        self.expire(now);
        let mut lowest = None;
        for mac in soonest_ending(&self.by_mac, MAX_OFFERS, |(_, until)| *until) {
            lowest = self.remove(&mac).into_iter().chain(lowest).min();
        }
        lowest
    }

    fn clear(&mut self) {
        self.by_mac.clear();
        self.by_ip.clear();
    }

    /// Whether `ip` is offered, and still held, for a client other than `mac`.
    fn held_for_another(&self, ip: Ipv4Addr, mac: Mac, now: u64) -> bool {
        self.by_ip.get(&ip).is_some_and(|m| *m != mac && self.by_mac.get(m).is_some_and(|(_, until)| *until > now))
    }
}

/// The request's state in the sense of RFC 2131 4.3.2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RequestState {
    Selecting,
    InitReboot,
    /// Renewing (unicast) or rebinding (broadcast): the server treats both alike.
    Renewing,
}

impl Engine {
    pub fn new(cfg: Config, leases: LeaseTable) -> Self {
        Engine {
            cfg,
            leases,
            offers: Offers::default(),
            declined: HashMap::new(),
            warn_decline: Throttle::default(),
            warn_pool_empty: Throttle::default(),
            next_scan: 0,
            stats: Stats::default(),
        }
    }

    pub fn leases(&self) -> &LeaseTable {
        &self.leases
    }

    /// The leases changed since the last call (for the journal); the table notes afresh.
    pub fn take_lease_changes(&mut self) -> crate::lease::Changes {
        self.leases.take_changes()
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// A new lab definition (SIGHUP): leases stay; a lease that now collides with a VM's
    /// reserved address is kept until it expires, but not renewed. The relays stay those the
    /// server started with: who may reach it from outside the lab is root's choice at start
    /// (`network.dhcp_relays` needs a restart).
    pub fn set_config(&mut self, mut cfg: Config) {
        cfg.relays = std::mem::take(&mut self.cfg.relays);
        self.cfg = cfg;
        self.offers.clear();
        self.next_scan = 0;
    }

    /// Drops expired leases and holds; true if the lease table changed.
    pub fn expire(&mut self, now: u64) -> bool {
        self.offers.expire(now);
        // Offers, quarantines and leases ran out: let the next search start from the bottom.
        self.next_scan = 0;
        self.declined.retain(|_, until| *until > now);
        self.leases.expire(now) > 0
    }

    pub fn handle(&mut self, req: &Request, rx: Received, now: u64) -> Outcome {
        let giaddr = req.msg.giaddr();
        // A relayed request must come from a relay on our subnet; a direct one was already
        // matched to the lab's interface by the socket layer.
        if !giaddr.is_unspecified() && !self.cfg.subnet.contains(&giaddr) {
            return self.ignore(req, "relayed from another subnet");
        }
        let sid = match req.msg.opts().get(OptionCode::ServerIdentifier) {
            Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
            _ => None,
        };
        let for_another_server = sid.is_some_and(|s| s != self.cfg.server_id);
        match req.kind {
            MessageType::Discover => self.discover(req, rx, now),
            MessageType::Request if for_another_server => {
                // RFC 2131 4.3.2: the client chose another server's offer; ours is free again.
                if let Some(ip) = self.offers.remove(&req.mac) {
                    self.freed(ip);
                }
                self.ignore(req, "client chose another server")
            }
            MessageType::Request => self.request(req, rx, sid.is_some(), now),
            MessageType::Decline | MessageType::Release if for_another_server => self.ignore(req, "for another server"),
            MessageType::Decline => self.decline(req, now),
            MessageType::Release => self.release(req),
            MessageType::Inform => self.inform(req, rx),
            _ => self.ignore(req, "not a client message"),
        }
    }

    fn ignore(&mut self, req: &Request, why: &str) -> Outcome {
        self.stats.ignored += 1;
        tracing::debug!(mac = %req.mac, kind = ?req.kind, "no reply: {why}");
        Outcome::default()
    }

    fn discover(&mut self, req: &Request, rx: Received, now: u64) -> Outcome {
        if let Some(freed) = self.offers.make_room(req.mac, now) {
            self.freed(freed);
        }
        let Some(ip) = self.choose_address(req, now) else {
            if let Some(suppressed) = self.warn_pool_empty.check(now) {
                tracing::warn!(mac = %req.mac, pool = %format_args!("{}-{}", self.cfg.pool.start, self.cfg.pool.end), suppressed, "DHCPDISCOVER: no free address in the pool");
            }
            return self.ignore(req, "pool exhausted");
        };
        self.offers.insert(req.mac, ip, now + OFFER_HOLD_SECS);
        self.stats.offers += 1;
        tracing::debug!(mac = %req.mac, %ip, "DHCPOFFER");
        let msg = self.reply(req, MessageType::Offer, ip, true);
        Outcome { reply: self.route(req, msg, rx), leases_changed: false }
    }

    /// RFC 2131 4.3.1: the static address; else the client's current or previous address; else
    /// the address it asks for if free; else the first free pool address.
    fn choose_address(&mut self, req: &Request, now: u64) -> Option<Ipv4Addr> {
        if let Some((ip, _)) = self.cfg.statics.get(&req.mac) {
            return Some(*ip);
        }
        if let Some((ip, _)) = self.offers.get(&req.mac).filter(|(ip, _)| self.pool_free_for(req.mac, *ip, now)) {
            return Some(*ip);
        }
        if let Some(l) = self.leases.by_mac(req.mac).filter(|l| self.pool_free_for(req.mac, l.ip, now)) {
            return Some(l.ip);
        }
        if let Some(DhcpOption::RequestedIpAddress(ip)) = req.msg.opts().get(OptionCode::RequestedIpAddress)
            && self.pool_free_for(req.mac, *ip, now)
        {
            return Some(*ip);
        }
        let (start, end) = (u32::from(self.cfg.pool.start), u32::from(self.cfg.pool.end));
        // Never-leased addresses first, lowest first, so a client that comes back finds its
        // expired lease's address still unused.
        let never_leased = (self.next_scan.max(start)..=end)
            .map(Ipv4Addr::from)
            .find(|ip| self.leases.get(*ip).is_none() && self.pool_free_for(req.mac, *ip, now));
        if let Some(ip) = never_leased {
            self.next_scan = u32::from(ip).saturating_add(1);
            return Some(ip);
        }
        self.next_scan = end.saturating_add(1);
        (start..=end).map(Ipv4Addr::from).find(|ip| self.pool_free_for(req.mac, *ip, now))
    }

    /// `ip` may be free again: the search for a free address must look at it.
    fn freed(&mut self, ip: Ipv4Addr) {
        self.next_scan = self.next_scan.min(u32::from(ip));
    }

    /// Whether a pool address may go to this (non-VM) client now.
    fn pool_free_for(&self, mac: Mac, ip: Ipv4Addr, now: u64) -> bool {
        self.cfg.pool.contains(ip)
            && self.cfg.subnet.contains(&ip)
            && ip != self.cfg.subnet.network()
            && ip != self.cfg.subnet.broadcast()
            && !self.cfg.reserved.contains(&ip)
            && self.declined.get(&ip).is_none_or(|until| *until <= now)
            && self.leases.get(ip).is_none_or(|l| l.mac == mac || !l.active(now))
            && !self.offers.held_for_another(ip, mac, now)
    }

    /// Whether this client may hold `ip`: its static address, or a free pool address.
    fn may_have(&self, mac: Mac, ip: Ipv4Addr, now: u64) -> bool {
        match self.cfg.statics.get(&mac) {
            Some((fixed, _)) => *fixed == ip,
            None => self.pool_free_for(mac, ip, now),
        }
    }

    fn request(&mut self, req: &Request, rx: Received, has_sid: bool, now: u64) -> Outcome {
        let requested = match req.msg.opts().get(OptionCode::RequestedIpAddress) {
            Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
            _ => None,
        };
        let ciaddr = req.msg.ciaddr();
        let (state, ip) = match (has_sid, requested, ciaddr.is_unspecified()) {
            (true, Some(ip), _) => (RequestState::Selecting, ip),
            (true, None, _) => return self.nak(req, rx, "SELECTING without a requested address"),
            (false, Some(ip), true) => (RequestState::InitReboot, ip),
            (false, _, false) => (RequestState::Renewing, ciaddr),
            (false, None, true) => return self.ignore(req, "REQUEST with neither ciaddr nor option 50"),
        };
        if !self.cfg.subnet.contains(&ip) {
            return if self.cfg.authoritative {
                self.nak(req, rx, "wrong network")
            } else {
                self.ignore(req, "wrong network")
            };
        }
        if !self.may_have(req.mac, ip, now) {
            // RFC 2131 4.3.2: an INIT-REBOOT client the server has no record of gets silence,
            // unless the server is authoritative for the network.
            return if self.cfg.authoritative {
                self.nak(req, rx, "address not available to this client")
            } else {
                self.ignore(req, "not ours")
            };
        }
        let renewed = self.leases.by_mac(req.mac).is_some_and(|l| l.ip == ip && l.active(now));
        let name = self.cfg.statics.get(&req.mac).map(|(_, n)| n.clone());
        let client_name = match req.msg.opts().get(OptionCode::Hostname) {
            Some(DhcpOption::Hostname(h)) => Some(h.clone()),
            _ => None,
        };
        let client_id = match req.msg.opts().get(OptionCode::ClientIdentifier) {
            Some(DhcpOption::ClientIdentifier(c)) => Some(c.clone()),
            _ => None,
        };
        let expires = match self.cfg.lease {
            LeaseTime::Infinite => None,
            LeaseTime::Finite(d) => Some(now + d.as_secs()),
        };
        let lease = Lease { ip, mac: req.mac, client_id, hostname: name.clone().or(client_name), expires };
        // A renewal within the same second leaves the table as it was: nothing to write (as
        // dnsmasq, whose lease file is dirtied only by a changed expiry or field).
        let changed = self.leases.get(ip) != Some(&lease);
        if changed {
            // A client moving to another address leaves its old one free.
            if let Some(old) = self.leases.by_mac(req.mac).map(|l| l.ip).filter(|old| *old != ip) {
                self.freed(old);
            }
            self.leases.insert(lease);
        }
        if let Some(offered) = self.offers.remove(&req.mac).filter(|o| *o != ip) {
            self.freed(offered);
        }
        self.stats.acks += 1;
        let who = name.as_deref().unwrap_or("-");
        if renewed {
            tracing::info!(mac = %req.mac, %ip, name = who, "DHCPACK renewed");
        } else {
            tracing::info!(mac = %req.mac, %ip, name = who, ?state, "DHCPACK granted");
        }
        let msg = self.reply(req, MessageType::Ack, ip, true);
        Outcome { reply: self.route(req, msg, rx), leases_changed: changed }
    }

    fn nak(&mut self, req: &Request, rx: Received, why: &str) -> Outcome {
        self.stats.naks += 1;
        tracing::info!(mac = %req.mac, ciaddr = %req.msg.ciaddr(), "DHCPNAK: {why}");
        let mut msg = self.base(req, MessageType::Nak);
        msg.opts_mut().insert(DhcpOption::Message(why.to_string()));
        msg.set_ciaddr(Ipv4Addr::UNSPECIFIED);
        let giaddr = req.msg.giaddr();
        // RFC 2131 4.1: a NAK to a relay has the broadcast bit set; a direct NAK is broadcast,
        // since the client's address is in doubt.
        let dest = if giaddr.is_unspecified() {
            Destination::Broadcast
        } else {
            msg.set_flags(Flags::default().set_broadcast());
            Destination::Relay(SocketAddrV4::new(giaddr, SERVER_PORT))
        };
        Outcome { reply: seal(req, msg, dest, rx.ifindex), leases_changed: false }
    }

    fn decline(&mut self, req: &Request, now: u64) -> Outcome {
        let Some(DhcpOption::RequestedIpAddress(ip)) = req.msg.opts().get(OptionCode::RequestedIpAddress) else {
            return self.ignore(req, "DECLINE without option 50");
        };
        let ip = *ip;
        self.stats.declines += 1;
        if let Some(suppressed) = self.warn_decline.check(now) {
            if let Some((fixed, name)) = self.cfg.statics.get(&req.mac).filter(|(f, _)| *f == ip) {
                tracing::warn!(mac = %req.mac, ip = %fixed, %name, suppressed, "DHCPDECLINE: another host on the network uses VM {name}'s address");
            } else {
                tracing::warn!(mac = %req.mac, %ip, suppressed, "DHCPDECLINE: address in use by another host; out of the pool for 10 minutes");
            }
        }
        // Only the pool's addresses are handed out, so only they need a quarantine.
        if self.cfg.pool.contains(ip) {
            self.quarantine(ip, now);
        }
        let changed = self.leases.get(ip).is_some_and(|l| l.mac == req.mac) && self.leases.remove(ip).is_some();
        Outcome { reply: None, leases_changed: changed }
    }

    /// Keeps `ip` out of the pool for [`DECLINE_HOLD_SECS`], within [`MAX_DECLINED`] entries.
    fn quarantine(&mut self, ip: Ipv4Addr, now: u64) {
        if self.declined.len() >= MAX_DECLINED && !self.declined.contains_key(&ip) {
            self.declined.retain(|_, until| *until > now);
            for ip in soonest_ending(&self.declined, MAX_DECLINED, |until| *until) {
                self.declined.remove(&ip);
                self.freed(ip);
            }
        }
        self.declined.insert(ip, now + DECLINE_HOLD_SECS);
    }

    fn release(&mut self, req: &Request) -> Outcome {
        let ip = req.msg.ciaddr();
        let mine = self.leases.get(ip).is_some_and(|l| l.mac == req.mac);
        if !mine {
            return self.ignore(req, "RELEASE of an address the client does not hold");
        }
        self.leases.remove(ip);
        self.freed(ip);
        self.stats.releases += 1;
        tracing::info!(mac = %req.mac, %ip, "DHCPRELEASE");
        Outcome { reply: None, leases_changed: true }
    }

    fn inform(&mut self, req: &Request, rx: Received) -> Outcome {
        self.stats.informs += 1;
        let mut msg = self.reply(req, MessageType::Ack, Ipv4Addr::UNSPECIFIED, false);
        msg.set_ciaddr(req.msg.ciaddr());
        Outcome { reply: self.route(req, msg, rx), leases_changed: false }
    }

    /// The reply's header, copied from the request per RFC 2131 table 3, with options 53 and 54.
    fn base(&self, req: &Request, kind: MessageType) -> Message {
        let mut msg = Message::new_with_id(
            req.msg.xid(),
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            req.msg.giaddr(),
            &req.mac.0,
        );
        msg.set_opcode(Opcode::BootReply).set_flags(req.msg.flags());
        msg.opts_mut().insert(DhcpOption::MessageType(kind));
        msg.opts_mut().insert(DhcpOption::ServerIdentifier(self.cfg.server_id));
        msg
    }

    /// An OFFER or ACK: the address, the lease times (unless INFORM), and the options the
    /// client asked for in option 55, or all of them when it sent no list.
    fn reply(&self, req: &Request, kind: MessageType, yiaddr: Ipv4Addr, with_lease: bool) -> Message {
        let mut msg = self.base(req, kind);
        msg.set_yiaddr(yiaddr);
        if matches!(kind, MessageType::Ack) && !req.msg.ciaddr().is_unspecified() {
            msg.set_ciaddr(req.msg.ciaddr());
        }
        let opts = msg.opts_mut();
        if with_lease {
            let secs = self.cfg.lease.as_secs_u32();
            opts.insert(DhcpOption::AddressLeaseTime(secs));
            if let LeaseTime::Finite(_) = self.cfg.lease {
                opts.insert(DhcpOption::Renewal(secs / 2));
                opts.insert(DhcpOption::Rebinding((u64::from(secs) * 7 / 8) as u32));
            }
        }
        opts.insert(DhcpOption::SubnetMask(self.cfg.subnet.netmask()));
        opts.insert(DhcpOption::BroadcastAddr(self.cfg.subnet.broadcast()));
        let wanted: Option<&[OptionCode]> = match req.msg.opts().get(OptionCode::ParameterRequestList) {
            Some(DhcpOption::ParameterRequestList(l)) => Some(l),
            _ => None,
        };
        let asked = |c: OptionCode| wanted.is_none_or(|l| l.contains(&c));
        if asked(OptionCode::Router) {
            opts.insert(DhcpOption::Router(vec![self.cfg.server_id]));
        }
        if asked(OptionCode::DomainNameServer) {
            opts.insert(DhcpOption::DomainNameServer(vec![self.cfg.server_id]));
        }
        if asked(OptionCode::DomainName) {
            opts.insert(DhcpOption::DomainName(self.cfg.domain.clone()));
        }
        if let Some((_, name)) = self.cfg.statics.get(&req.mac).filter(|_| asked(OptionCode::Hostname)) {
            opts.insert(DhcpOption::Hostname(name.clone()));
        }
        msg
    }

    /// RFC 2131 4.1: relay, then ciaddr, then the broadcast bit, then unicast to yiaddr.
    fn route(&self, req: &Request, msg: Message, rx: Received) -> Option<Reply> {
        let giaddr = req.msg.giaddr();
        let ciaddr = req.msg.ciaddr();
        let dest = if !giaddr.is_unspecified() {
            Destination::Relay(SocketAddrV4::new(giaddr, SERVER_PORT))
        } else if !ciaddr.is_unspecified() {
            Destination::Unicast(SocketAddrV4::new(ciaddr, CLIENT_PORT))
        } else if req.msg.flags().broadcast() || msg.yiaddr().is_unspecified() {
            Destination::Broadcast
        } else {
            Destination::Direct { ip: msg.yiaddr(), mac: req.mac }
        };
        seal(req, msg, dest, rx.ifindex)
    }
}

/// The keys of the quarter of `table`'s entries that end soonest, when it holds `cap` or more;
/// none otherwise.
fn soonest_ending<K: Copy, V>(table: &HashMap<K, V>, cap: usize, until: impl Fn(&V) -> u64) -> Vec<K> {
    if table.len() < cap {
        return Vec::new();
    }
    let mut ends: Vec<(u64, K)> = table.iter().map(|(k, v)| (until(v), *k)).collect();
    let n = (cap / 4).clamp(1, ends.len());
    ends.select_nth_unstable_by_key(n - 1, |(until, _)| *until);
    ends.truncate(n);
    ends.into_iter().map(|(_, k)| k).collect()
}

/// The reply encoded within the client's size limit: option 57, never below 576 (RFC 2131 2).
/// Our replies stay far under 576, so only a long domain and host name could exceed it; those
/// two are dropped, in that order, until it fits. `None` (logged) if dhcproto cannot encode it,
/// which for the options the engine sets would be a bug.
fn seal(req: &Request, mut msg: Message, dest: Destination, ifindex: u32) -> Option<Reply> {
    let limit = match req.msg.opts().get(OptionCode::MaxMessageSize) {
        Some(DhcpOption::MaxMessageSize(n)) => usize::from(*n).max(crate::wire::MIN_MAX_MESSAGE),
        _ => crate::wire::MIN_MAX_MESSAGE,
    };
    let mut optional = [OptionCode::Hostname, OptionCode::DomainName].into_iter();
    loop {
        let bytes = match crate::wire::encode_reply(&msg) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(mac = %req.mac, "cannot encode a DHCP reply: {e}");
                return None;
            }
        };
        match optional.next() {
            Some(code) if bytes.len() > limit => {
                msg.opts_mut().remove(code);
            }
            _ => return Some(Reply { msg, bytes, dest, ifindex }),
        }
    }
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
