//! The DHCP server's I/O: the UDP socket, the receiving interface of each packet, the receive
//! loop, lease persistence before replies leave, and sending by RFC 2131 4.1 destination.
//!
//! One socket on 0.0.0.0:67 serves every interface: on macOS the VM bridge (bridge100) exists only
//! while a VM runs, so the server must not need it at start. Each packet's interface comes from
//! IP_PKTINFO, and a packet is served only if that interface has an address in the lab's subnet,
//! or it was relayed by an agent the lab lists in `network.dhcp_relays` ([`crate::Config::admit`]),
//! so a host on another LAN never hears from kubenet. Replies leave by the interface the request
//! came in on.
//!
//! The per-packet interface works on Linux and macOS (IP_PKTINFO in both kernels, see
//! `kubenet_udp`); an interface index the server has not seen (bridge100 appearing with the first
//! VM) rereads the interface list. Elsewhere the server answers through the routing table.
//! Unicasting an OFFER to a client without an address needs an ARP entry first, which only Linux
//! lets a program install (SIOCSARP): on macOS such replies are broadcast, as RFC 2131 4.1 allows.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::engine::{CLIENT_PORT, Destination, Engine, Received, Reply};
use crate::lease::{Changes, Journal};
use crate::throttle::Throttle;
use crate::wire::{self, Malformed};
use kubenet_udp::{Inbox, Outbox};

/// The socket's receive buffer.
const RECV_BUFFER: usize = 1 << 20;
/// How often expired leases are dropped from the table and the file.
const EXPIRY_TICK: Duration = Duration::from_secs(60);
/// How long an interface lookup is trusted before the interface list is read again.
const IFACE_TTL: Duration = Duration::from_secs(5);

pub use kubenet_udp::BindError;

/// Binds the DHCP socket: broadcast allowed, IP_PKTINFO on, and no SO_REUSEADDR/SO_REUSEPORT,
/// so no other server can bind the port beside us. Non-blocking and not yet registered with a
/// runtime: the thread that runs [`Server::run`] makes it a tokio socket.
pub fn bind(addr: SocketAddrV4) -> Result<std::net::UdpSocket, BindError> {
    let wrap = kubenet_udp::bind_error("DHCP", "UDP", addr.into(), |port| {
        format!(
            "another DHCP server holds it (macOS: bootpd, started by Internet Sharing; Linux: dnsmasq, e.g. libvirt's or NetworkManager's, or isc-dhcp-server). Stop it (macOS: `sudo launchctl unload -w /System/Library/LaunchDaemons/bootps.plist`; Linux: `sudo ss -ulpn 'sport = :{port}'` shows which, or `kubenet doctor`) and run kubenet serve again"
        )
    });
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))
        .map_err(&wrap)?;
    s.set_broadcast(true).map_err(&wrap)?;
    // Room for a burst (a whole lab booting at once) while a batch is being written to disk.
    // The kernel caps it at net.core.rmem_max; a smaller buffer is not an error.
    let _ = s.set_recv_buffer_size(RECV_BUFFER);
    s.set_nonblocking(true).map_err(&wrap)?;
    kubenet_udp::enable_pktinfo(&s).map_err(&wrap)?;
    s.bind(&std::net::SocketAddr::V4(addr).into()).map_err(&wrap)?;
    Ok(s.into())
}

/// Why packets were dropped before the engine saw them, by kind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub received: u64,
    pub malformed: HashMap<Malformed, u64>,
    /// Well-formed, but not the lab's: from an interface with no address in the lab's subnet,
    /// or relayed by a host the lab does not list ([`crate::Config::admit`]).
    pub foreign: u64,
    /// Replies not sent because the lease file could not be written.
    pub unpersisted: u64,
}

impl Counters {
    pub fn malformed_total(&self) -> u64 {
        self.malformed.values().sum()
    }
}

/// The addresses of the host's interfaces, by index, read again when stale or unknown.
struct Interfaces {
    by_index: HashMap<u32, Vec<Ipv4Net>>,
    read_at: Option<Instant>,
}

impl Interfaces {
    fn new() -> Self {
        Interfaces { by_index: HashMap::new(), read_at: None }
    }

    fn refresh(&mut self) {
        self.by_index.clear();
        self.read_at = Some(Instant::now());
        for a in kubenet_udp::addresses() {
            let (std::net::IpAddr::V4(addr), Some(prefix)) = (a.address, a.prefix) else { continue };
            if let (index @ 1.., Ok(net)) = (a.index, Ipv4Net::new(addr, prefix)) {
                self.by_index.entry(index).or_default().push(net);
            }
        }
    }

    /// Whether interface `ifindex` holds the lab's host address: the lab's own interface (the
    /// bridge, vmnet's bridge100), not merely one with an address in the lab's subnet (a Wi-Fi
    /// that happens to use the same network is not the lab). The list is read again when it is
    /// older than [`IFACE_TTL`], or for an index it does not know, at most once a second.
    fn is_lab(&mut self, ifindex: u32, host: Ipv4Addr) -> bool {
        let age = self.read_at.map(|t| t.elapsed());
        let stale = age.is_none_or(|a| a > IFACE_TTL);
        let unknown = !self.by_index.contains_key(&ifindex) && age.is_none_or(|a| a > Duration::from_secs(1));
        if stale || unknown {
            self.refresh();
        }
        self.by_index.get(&ifindex).is_some_and(|nets| nets.iter().any(|n| n.addr() == host))
    }
}

/// Called with the lease table and what changed, after each change is on disk (the DNS server
/// learns clients' names from it). At the start and after a reload every name counts as changed.
pub type LeaseHook = Box<dyn Fn(&crate::LeaseTable, &Changes) + Send + Sync>;

/// What a hook is given when it must take the whole table afresh.
fn everything() -> Changes {
    Changes { addresses: Default::default(), names: true }
}

/// The DHCP server's state: the engine and what lives beside it. The socket is the caller's,
/// lent to [`Server::run`].
pub struct Server {
    engine: Engine,
    journal: Journal,
    /// Host names changed in a batch whose write failed: the hook hears of them after the next
    /// write that succeeds.
    names_pending: bool,
    ifaces: Interfaces,
    on_leases: Option<LeaseHook>,
    /// New engine configs (a reload); leases and the socket stay.
    configs: Option<tokio::sync::mpsc::UnboundedReceiver<crate::Config>>,
    /// Requests for the active leases (the control socket), answered from the live table.
    lease_queries: Option<tokio::sync::mpsc::UnboundedReceiver<LeaseQuery>>,
    pub counters: Counters,
}

/// A request for the active leases, answered on the enclosed channel.
pub type LeaseQuery = tokio::sync::oneshot::Sender<Vec<crate::Lease>>;

/// The next message of an optional channel; never, when it is not wired.
async fn next<T>(rx: &mut Option<tokio::sync::mpsc::UnboundedReceiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

use kubenet_cluster::state::unix_now;

impl Server {
    pub fn new(engine: Engine, lease_file: PathBuf) -> Self {
        Server {
            engine,
            journal: Journal::new(lease_file),
            names_pending: false,
            ifaces: Interfaces::new(),
            on_leases: None,
            configs: None,
            lease_queries: None,
            counters: Counters::default(),
        }
    }

    /// Applies each config received on `rx` while running (SIGHUP): leases and the socket stay.
    pub fn reloads(&mut self, rx: tokio::sync::mpsc::UnboundedReceiver<crate::Config>) {
        self.configs = Some(rx);
    }

    /// Answers each query received on `rx` with the active leases.
    pub fn lease_queries(&mut self, rx: tokio::sync::mpsc::UnboundedReceiver<LeaseQuery>) {
        self.lease_queries = Some(rx);
    }

    /// Runs `hook` now and after every change to the lease table.
    pub fn on_leases(&mut self, hook: LeaseHook) {
        hook(self.engine.leases(), &everything());
        self.on_leases = Some(hook);
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn engine_mut(&mut self) -> &mut Engine {
        &mut self.engine
    }

    /// Serves `socket` (from [`bind`]) until `shutdown` is cancelled. Errors on one packet drop
    /// that packet; only a failing socket ends the loop.
    ///
    /// The lease file is written on this task's thread, before the replies that depend on it
    /// leave: give the server a thread of its own (`kubenet serve` does), where waiting for the
    /// disk delays only DHCP replies, which must wait for it anyway.
    ///
    /// Each wake-up takes what the socket holds, up to [`kubenet_udp::BATCH`] datagrams, with
    /// one system call; their replies go out with one more, and the lease file is written once
    /// for all of them (group commit): durability per ACK without an fsync per packet.
    pub async fn run(&mut self, socket: &UdpSocket, shutdown: CancellationToken) -> io::Result<()> {
        let mut tick = tokio::time::interval(EXPIRY_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // One byte more than a request may have, so a longer one is seen as cut and dropped.
        let mut inbox = Inbox::new(wire::MAX_LEN + 1);
        let mut outboxes = Outboxes::default();
        // A socket error repeats with every datagram: one line per period.
        let mut warn_recv = Throttle::default();
        let fd = socket.as_raw_fd();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                r = socket.async_io(Interest::READABLE, || inbox.recv(fd)) => match r {
                    Ok(n) => self.serve_batch(socket, &inbox, n, &mut outboxes).await,
                    // Not fatal: the next datagram may be fine.
                    Err(e) => {
                        if let Some(suppressed) = warn_recv.check(unix_now()) {
                            tracing::warn!(suppressed, "DHCP receive: {e}");
                        }
                    }
                },
                Some(reply) = next(&mut self.lease_queries) => {
                    let now = unix_now();
                    let _ = reply.send(self.engine.leases().iter().filter(|l| l.active(now)).cloned().collect());
                }
                Some(cfg) = next(&mut self.configs) => {
                    self.engine.set_config(cfg);
                    // The hook's consumers (DNS) rebuilt their view: give them the leases again.
                    if let Some(hook) = &self.on_leases {
                        hook(self.engine.leases(), &everything());
                    }
                    tracing::info!("DHCP: new configuration applied; {} leases kept", self.engine.leases().len());
                }
                _ = tick.tick() => {
                    if self.engine.expire(unix_now())
                        && let Err(e) = self.persist() {
                            tracing::error!("cannot write the lease file {}: {e}", self.journal.path().display());
                        }
                }
            }
        }
    }

    /// Serves the `n` datagrams in `inbox`.
    async fn serve_batch(&mut self, socket: &UdpSocket, inbox: &Inbox, n: usize, out: &mut Outboxes) {
        // Replies that change no lease (OFFER, NAK, INFORM's ACK, an ACK that repeats the lease
        // on file) go out at once; the others wait until the batch's leases are on disk. After
        // a failed write, every ACK that grants an address waits (see `Journal::behind`).
        let mut changed = false;
        let now = unix_now();
        for i in 0..n {
            let (d, bytes) = inbox.get(i);
            self.counters.received += 1;
            let req = if d.truncated { Err(Malformed::Oversized) } else { wire::decode_request(bytes) };
            let req = match req {
                Ok(r) => r,
                Err(m) => {
                    *self.counters.malformed.entry(m).or_default() += 1;
                    tracing::debug!(src = %d.src, "dropped a malformed DHCP packet: {m}");
                    continue;
                }
            };
            let std::net::SocketAddr::V4(src) = d.src else { continue };
            let cfg = self.engine.config();
            let subnet = cfg.subnet;
            // Elsewhere the packet's interface is unknown: the routing table decides.
            let on_lab = !cfg!(any(target_os = "linux", target_vendor = "apple"))
                || self.ifaces.is_lab(d.ifindex, cfg.server_id);
            if let Err(why) = cfg.admit(req.msg.giaddr(), *src.ip(), on_lab) {
                self.counters.foreign += 1;
                tracing::debug!(ifindex = d.ifindex, %src, mac = %req.mac, giaddr = %req.msg.giaddr(), "DHCP request outside {subnet}: not ours: {why}");
                continue;
            }
            let outcome = self.engine.handle(&req, Received { ifindex: d.ifindex, src }, now);
            let Some(reply) = &outcome.reply else {
                changed |= outcome.leases_changed;
                continue;
            };
            if outcome.leases_changed || (self.journal.behind() && is_ack(&outcome)) {
                changed = true;
                post(socket, reply, &mut out.durable);
            } else {
                post(socket, reply, &mut out.now);
            }
        }
        send_all(socket, &mut out.now, &mut out.warn_send).await;
        if changed && let Err(e) = self.persist() {
            // An ACK whose lease is not on disk would be forgotten by a crash: send none.
            // Clients retry, and are answered once the file can be written again.
            self.counters.unpersisted += out.durable.len() as u64;
            tracing::error!(
                "cannot write the lease file {}: {e}; withholding {} replies until it can",
                self.journal.path().display(),
                out.durable.len()
            );
            out.durable.clear();
            return;
        }
        send_all(socket, &mut out.durable, &mut out.warn_send).await;
    }

    /// Writes the lease table's changes, blocking this thread until they are on disk (see
    /// [`Server::run`]).
    fn persist(&mut self) -> io::Result<()> {
        let mut changes = self.engine.take_lease_changes();
        changes.names |= std::mem::take(&mut self.names_pending);
        if let Err(e) = self.journal.write(self.engine.leases(), &changes) {
            // The next write is a whole snapshot; the names wait for it.
            self.names_pending = changes.names;
            return Err(e);
        }
        if let Some(hook) = &self.on_leases {
            hook(self.engine.leases(), &changes);
        }
        Ok(())
    }
}

/// An ACK that hands out an address (not an INFORM's, which grants none).
fn is_ack(out: &crate::engine::Outcome) -> bool {
    out.reply.as_ref().is_some_and(|r| {
        r.msg.opts().msg_type() == Some(dhcproto::v4::MessageType::Ack) && !r.msg.yiaddr().is_unspecified()
    })
}

/// Replies of one batch waiting to be sent: those that may go at once, and those that wait for
/// the lease file. Kept across batches, so their buffers are allocated once.
#[derive(Default)]
struct Outboxes {
    now: Outbox,
    durable: Outbox,
    /// A send refused for one reply is often refused for all (no route, a full buffer).
    warn_send: Throttle,
}

/// Queues one reply for the destination the engine chose (RFC 2131 4.1).
fn post(socket: &UdpSocket, r: &Reply, outbox: &mut Outbox) {
    let broadcast = SocketAddrV4::new(Ipv4Addr::BROADCAST, CLIENT_PORT);
    let (to, ifindex) = match r.dest {
        Destination::Relay(a) | Destination::Unicast(a) => (a, 0),
        Destination::Broadcast => (broadcast, r.ifindex),
        Destination::Direct { ip, mac } => {
            // The client has no address yet, so it cannot answer ARP: put its MAC in the
            // ARP table ourselves (as dnsmasq does), or broadcast if that is refused.
            if set_arp(socket, r.ifindex, ip, mac).is_ok() {
                (SocketAddrV4::new(ip, CLIENT_PORT), r.ifindex)
            } else {
                (broadcast, r.ifindex)
            }
        }
    };
    outbox.push_via(&r.bytes, to.into(), ifindex, Ipv4Addr::UNSPECIFIED);
}

/// Sends what `outbox` holds; a reply the socket refuses is logged and dropped.
async fn send_all(socket: &UdpSocket, outbox: &mut Outbox, warn: &mut Throttle) {
    let fd = socket.as_raw_fd();
    while !outbox.is_empty() {
        if let Err(e) = socket.async_io(Interest::WRITABLE, || outbox.send(fd)).await {
            if let Some(suppressed) = warn.check(unix_now()) {
                tracing::warn!(to = ?outbox.next_to(), suppressed, "DHCP send: {e}");
            }
            outbox.skip();
        }
    }
}

/// Adds `ip -> mac` to the ARP table of interface `ifindex` (SIOCSARP).
#[cfg(target_os = "linux")]
fn set_arp(socket: &UdpSocket, ifindex: u32, ip: Ipv4Addr, mac: kubenet_cluster::Mac) -> io::Result<()> {
    let name = nix::net::if_::if_indextoname(ifindex).map_err(io::Error::from)?;
    let name = name.to_bytes();
    // SAFETY: arpreq is plain old data; all-zero is a valid value.
    let mut req: libc::arpreq = unsafe { std::mem::zeroed() };
    let pa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size on Linux; arp_pa holds an AF_INET address.
    req.arp_pa = unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(pa) };
    req.arp_ha.sa_family = libc::ARPHRD_ETHER;
    for (d, s) in req.arp_ha.sa_data.iter_mut().zip(mac.0) {
        *d = s as libc::c_char;
    }
    req.arp_flags = libc::ATF_COM;
    for (d, s) in req.arp_dev.iter_mut().zip(name.iter().take(15)) {
        *d = *s as libc::c_char;
    }
    // SAFETY: a valid socket and a fully initialised arpreq.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSARP, &req) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

// Elsewhere (macOS: no SIOCSARP): Direct replies are broadcast.

#[cfg(not(target_os = "linux"))]
fn set_arp(_: &UdpSocket, _: u32, _: Ipv4Addr, _: kubenet_cluster::Mac) -> io::Result<()> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}
