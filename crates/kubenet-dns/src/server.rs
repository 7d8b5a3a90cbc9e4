//! The DNS server's I/O: UDP and TCP sockets, the source policy ([`Admit`]) and the access
//! list, truncation, and the split between local answers (inline, never waiting on the network)
//! and forwarded queries (each in a task of its own, so a slow upstream never delays the lab's
//! names).
//!
//! Everything it holds is bounded, whatever its clients send: the answer cache in bytes
//! ([`ANSWER_CACHE_BYTES`]), the forwarded queries waiting ([`FORWARDS_MAX`]) and the TCP
//! connections ([`TCP_CONNECTIONS_MAX`], the one idle longest closed for a newcomer). What is
//! dropped for that is counted in [`Counters`].

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use hickory_proto::op::Message;
use ipnet::IpNet;
use kubenet_udp::{Inbox, Outbox};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admit::Admit;
use crate::forward::Forwarder;
use crate::message::{PLAIN_UDP, allowed, answer_key, encode_udp};
use crate::request::{self, Handled};
use crate::zone::Zone;

/// A TCP client that says nothing for this long is dropped, and one that takes longer to send
/// a query or take its reply too: RFC 7766 6.2.3 asks servers to close idle connections, on
/// the order of seconds, so that clients cannot hold them.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// DNS over TCP connections open at once, at most. The TCP server shares the agent's main
/// runtime with the control socket and VM starts, so what it holds must stay small however
/// many connections a client opens. A lab's resolvers open a few at a time, to retry a
/// truncated answer; 128 leaves room for all of them. When full, the connection idle the
/// longest is closed to admit the new one (RFC 7766 6.2.3 lets a server close connections
/// under load, idle ones first); when none is idle, the new one is closed.
pub const TCP_CONNECTIONS_MAX: usize = 128;
/// The most the cache of local answers may hold, in bytes ([`answer_weight`]). A lab's zone has
/// a few dozen names; each asked in a few forms (types, EDNS or not, letter case) makes some
/// thousand replies of a few hundred bytes, well inside. A client varying the letter case of
/// its questions (every variant is its own key) only makes the cache evict the least used,
/// instead of growing it: the former cap of 4,096 entries allowed 2.5 MiB of 1232-byte
/// replies plus keys, and emptied the whole cache when reached.
pub const ANSWER_CACHE_BYTES: u64 = 2 << 20;
/// Forwarded UDP queries waiting for an upstream at once, at most; past that a query is dropped
/// (and counted), as the client retries. Each holds its query, a task and a socket with a
/// receive buffer, a few KiB in all: this bounds them to a few MiB, while a lab's clients
/// rarely have more than a handful in flight.
pub const FORWARDS_MAX: usize = 1024;

pub use kubenet_udp::BindError;

/// The DNS server's bind errors, with what to do about a busy port.
fn wrap(addr: SocketAddr, proto: &'static str) -> impl Fn(io::Error) -> BindError {
    kubenet_udp::bind_error("DNS", proto, addr, |port| {
        format!(
            "another DNS server holds it (macOS: mDNSResponder only on 5353, but Internet Sharing starts one on 53; Linux: systemd-resolved, dnsmasq). Find it with `sudo ss -lpn 'sport = :{port}'` (Linux) or `sudo lsof -i :{port}` (macOS), or run `kubenet doctor`; stop it or bind kubenet's DNS elsewhere with --dns-listen"
        )
    })
}

/// Binds UDP and TCP on `addr`, without SO_REUSEPORT so nothing can share the port.
pub fn bind(addr: SocketAddr) -> Result<(UdpSocket, TcpListener), BindError> {
    let domain = socket2::Domain::for_address(addr);
    let udp =
        socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP)).map_err(wrap(addr, "UDP"))?;
    udp.set_nonblocking(true).map_err(wrap(addr, "UDP"))?;
    let _ = udp.set_recv_buffer_size(1 << 20);
    if addr.is_ipv4() {
        kubenet_udp::enable_pktinfo(&udp).map_err(wrap(addr, "UDP"))?;
    }
    udp.bind(&addr.into()).map_err(wrap(addr, "UDP"))?;
    // The TCP port follows the UDP one (port 0 in tests picks a free UDP port).
    let addr = udp.local_addr().ok().and_then(|a| a.as_socket()).unwrap_or(addr);
    let tcp =
        socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP)).map_err(wrap(addr, "TCP"))?;
    // SO_REUSEADDR on a listener only lets it rebind past TIME_WAIT; it does not share the port.
    tcp.set_reuse_address(true).map_err(wrap(addr, "TCP"))?;
    tcp.set_nonblocking(true).map_err(wrap(addr, "TCP"))?;
    tcp.bind(&addr.into()).map_err(wrap(addr, "TCP"))?;
    // A deep accept queue (kernel memory only): a burst of connections, a flood among them,
    // fills 128 in a moment, and then the SYNs of real clients behind it are dropped and wait
    // a second for their retransmission. The accept loop closes idle ones to keep up.
    tcp.listen(1024).map_err(wrap(addr, "TCP"))?;
    let udp = UdpSocket::from_std(udp.into()).map_err(wrap(addr, "UDP"))?;
    let tcp = TcpListener::from_std(tcp.into()).map_err(wrap(addr, "TCP"))?;
    Ok((udp, tcp))
}

#[derive(Debug, Default)]
pub struct Counters {
    pub queries: AtomicU64,
    pub local: AtomicU64,
    pub refused: AtomicU64,
    /// Datagrams that were not DNS queries at all; dropped.
    pub malformed: AtomicU64,
    /// Queries to forward that found [`FORWARDS_MAX`] already waiting; dropped.
    pub overloaded: AtomicU64,
    /// TCP connections closed while idle to make room for a new one ([`TCP_CONNECTIONS_MAX`]).
    pub tcp_evicted: AtomicU64,
    /// TCP connections closed at once because every open one was busy answering.
    pub tcp_turned_away: AtomicU64,
    /// Queries (and TCP connections) from outside the lab and loopback ([`Admit`]); dropped
    /// without a reply.
    pub outside: AtomicU64,
}

/// Every DNS counter at one moment: the server's own and the forwarder's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub queries: u64,
    pub local: u64,
    pub forwarded: u64,
    pub cache_hits: u64,
    pub servfail: u64,
    pub refused: u64,
    pub malformed: u64,
    /// Dropped unanswered: not from the lab's interface or loopback ([`crate::admit`]).
    pub outside: u64,
}

/// What an entry of the answer cache costs, in bytes: key and reply, their two vectors, and
/// the cache's own bookkeeping (hash, slot, links), rounded up.
#[derive(Clone)]
struct AnswerWeight;

impl quick_cache::Weighter<Vec<u8>, Vec<u8>> for AnswerWeight {
    fn weight(&self, key: &Vec<u8>, reply: &Vec<u8>) -> u64 {
        answer_weight(key.len(), reply.len())
    }
}

fn answer_weight(key: usize, reply: usize) -> u64 {
    (key + reply + 2 * std::mem::size_of::<Vec<u8>>() + 64) as u64
}

type AnswerCache = quick_cache::sync::Cache<Vec<u8>, Vec<u8>, AnswerWeight>;

/// A cache of at most `bytes`. Few shards: the DNS thread is its main user, and the agent's
/// runtime (TCP, zone updates) the other.
fn answer_cache(bytes: u64) -> AnswerCache {
    let options = quick_cache::OptionsBuilder::new()
        .shards(4)
        .estimated_items_capacity(usize::try_from(bytes / 512).unwrap_or(usize::MAX).max(16))
        .weight_capacity(bytes)
        .build()
        .expect("every option is set");
    AnswerCache::with_options(options, AnswerWeight, Default::default(), Default::default())
}

pub struct Dns {
    zone: RwLock<Zone>,
    forwarder: Forwarder,
    admit: Admit,
    allow: Vec<IpNet>,
    /// Encoded UDP replies to local questions, by the request's bytes after the id (flags
    /// without RD, counts, question, EDNS). A hit costs a copy and two patched fields instead
    /// of a parse and an encode. Local answers change only with the zone, which clears it.
    answers: AnswerCache,
    pub counters: Counters,
}

impl Dns {
    /// A server that takes queries from anywhere ([`Admit::any`]), then applies `allow`.
    pub fn new(zone: Zone, forwarder: Forwarder, allow: Vec<IpNet>) -> Arc<Self> {
        Self::with_admit(zone, forwarder, allow, Admit::any())
    }

    /// A server that takes only what `admit` admits (see [`crate::admit`]), then applies
    /// `allow`.
    pub fn with_admit(zone: Zone, forwarder: Forwarder, allow: Vec<IpNet>, admit: Admit) -> Arc<Self> {
        Arc::new(Dns {
            zone: RwLock::new(zone),
            forwarder,
            admit,
            allow,
            answers: answer_cache(ANSWER_CACHE_BYTES),
            counters: Counters::default(),
        })
    }

    /// The source policy, to tell it the lab's interface once it exists
    /// ([`Admit::set_lab`]).
    pub fn admit(&self) -> &Admit {
        &self.admit
    }

    pub fn forwarder(&self) -> &Forwarder {
        &self.forwarder
    }

    pub fn totals(&self) -> Totals {
        let f = self.forwarder.stats();
        let c = &self.counters;
        Totals {
            queries: c.queries.load(Ordering::Relaxed),
            local: c.local.load(Ordering::Relaxed),
            forwarded: f.forwarded,
            cache_hits: f.cache_hits,
            servfail: f.servfail,
            refused: c.refused.load(Ordering::Relaxed),
            malformed: c.malformed.load(Ordering::Relaxed),
            outside: c.outside.load(Ordering::Relaxed),
        }
    }

    /// Replaces the zone (a reload, or new DHCP names).
    pub fn update_zone(&self, f: impl FnOnce(&mut Zone)) {
        f(&mut self.zone.write().expect("zone lock"));
        self.answers.clear();
    }

    /// The cached reply to `request`, with its id and RD.
    fn cached_answer(&self, request: &[u8]) -> Option<Vec<u8>> {
        let key = answer_key(request)?;
        let mut reply = self.answers.get(&key)?;
        reply[..2].copy_from_slice(&request[..2]);
        reply[2] = (reply[2] & !1) | (request[2] & 1);
        Some(reply)
    }

    fn remember_answer(&self, request: &[u8], reply: &[u8]) {
        let Some(key) = answer_key(request) else { return };
        self.answers.insert(key, reply.to_vec());
    }

    fn allowed(&self, src: IpAddr) -> bool {
        allowed(&self.allow, src)
    }

    /// [`request::handle`] under the zone's lock, counted.
    fn handle(&self, bytes: &[u8], src: SocketAddr) -> Handled {
        self.counters.queries.fetch_add(1, Ordering::Relaxed);
        let h = request::handle(&self.zone.read().expect("zone lock"), &self.allow, src.ip(), bytes);
        let counter = match &h {
            Handled::Local(..) => Some(&self.counters.local),
            Handled::Refused(..) => Some(&self.counters.refused),
            Handled::HeaderOnly(_) | Handled::Drop => Some(&self.counters.malformed),
            Handled::Forward(..) => None,
        };
        if let Some(c) = counter {
            c.fetch_add(1, Ordering::Relaxed);
        }
        h
    }

    /// Serves UDP until `shutdown`; then ends the forwarded queries still waiting for an
    /// upstream, and returns once none is left. Each wake-up takes every query waiting (up to
    /// [`kubenet_udp::BATCH`]) with one system call and sends the local answers with one more.
    pub async fn serve_udp(self: Arc<Self>, socket: UdpSocket, shutdown: CancellationToken) -> io::Result<()> {
        let socket = Arc::new(socket);
        // 64 KiB a datagram, so nothing is cut; only the pages a datagram fills are resident.
        let mut inbox = Inbox::new(65535);
        let mut outbox = Outbox::default();
        let forwarded = TaskTracker::new();
        let fd = socket.as_raw_fd();
        loop {
            let n = tokio::select! {
                () = shutdown.cancelled() => {
                    forwarded.close();
                    forwarded.wait().await;
                    return Ok(());
                }
                r = socket.async_io(Interest::READABLE, || inbox.recv(fd)) => match r {
                    Ok(n) => n,
                    // ICMP errors from earlier sends surface here on some systems: not fatal.
                    Err(e) => { tracing::debug!("DNS receive: {e}"); continue; }
                },
            };
            for i in 0..n {
                let (e, request) = inbox.get(i);
                if !self.admit.udp(e.ifindex, e.src.ip()) {
                    self.counters.outside.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let Some(q) = self.answer_udp(request, e.src, e.dst, &mut outbox) else { continue };
                if forwarded.len() >= FORWARDS_MAX {
                    self.counters.overloaded.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let (me, socket, stop) = (self.clone(), socket.clone(), shutdown.clone());
                forwarded.spawn(async move {
                    let (q, limit) = q;
                    let m = tokio::select! {
                        () = stop.cancelled() => return,
                        m = me.forwarder.resolve(&q, false) => m,
                    };
                    if let Some(reply) = encode_udp(&m, limit) {
                        send(&socket, &reply, e.src, e.dst).await;
                    }
                });
            }
            while !outbox.is_empty() {
                if let Err(e) = socket.async_io(Interest::WRITABLE, || outbox.send(fd)).await {
                    tracing::debug!(to = ?outbox.next_to(), "DNS send: {e}");
                    outbox.skip();
                }
            }
        }
    }

    /// One UDP query from `src` to `dst`: its reply (from the answer cache, the zone, or an
    /// error) queued in `outbox`, or the query to forward with its reply's size limit.
    fn answer_udp(
        &self,
        request: &[u8],
        src: SocketAddr,
        dst: Ipv4Addr,
        outbox: &mut Outbox,
    ) -> Option<(Message, usize)> {
        let from = if dst.is_broadcast() || dst.is_multicast() { Ipv4Addr::UNSPECIFIED } else { dst };
        if self.allowed(src.ip())
            && let Some(reply) = self.cached_answer(request)
        {
            self.counters.queries.fetch_add(1, Ordering::Relaxed);
            self.counters.local.fetch_add(1, Ordering::Relaxed);
            outbox.push(&reply, src, from);
            return None;
        }
        let (m, limit) = match self.handle(request, src) {
            Handled::Drop => return None,
            Handled::Forward(q, limit) => return Some((q, limit)),
            Handled::Local(m, limit) => {
                let reply = encode_udp(&m, limit)?;
                self.remember_answer(request, &reply);
                outbox.push(&reply, src, from);
                return None;
            }
            Handled::Refused(m, limit) => (m, limit),
            Handled::HeaderOnly(m) => (m, PLAIN_UDP),
        };
        outbox.push(&encode_udp(&m, limit)?, src, from);
        None
    }

    /// Serves TCP until `shutdown`: each connection in its own task, at most
    /// [`TCP_CONNECTIONS_MAX`] at once. Returns once every connection has ended.
    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) -> io::Result<()> {
        let connections = TaskTracker::new();
        let epoch = Instant::now();
        // The open connections, as the accept loop knows them; a slot whose token is cancelled
        // has ended (or is ending) and is forgotten at the next accept.
        let mut open: Vec<Arc<Slot>> = Vec::with_capacity(TCP_CONNECTIONS_MAX);
        loop {
            let (stream, src) = tokio::select! {
                () = shutdown.cancelled() => {
                    connections.close();
                    connections.wait().await;
                    return Ok(());
                }
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => { tracing::debug!("DNS accept: {e}"); continue; }
                },
            };
            if !stream.local_addr().is_ok_and(|local| self.admit.tcp(local, src)) {
                self.counters.outside.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            open.retain(|slot| !slot.close.is_cancelled());
            if open.len() >= TCP_CONNECTIONS_MAX {
                match oldest_idle(open.iter().map(|slot| slot.idle_since.load(Ordering::Relaxed))) {
                    Some(i) => {
                        open.swap_remove(i).close.cancel();
                        self.counters.tcp_evicted.fetch_add(1, Ordering::Relaxed);
                    }
                    None => {
                        self.counters.tcp_turned_away.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                }
            }
            let slot = Arc::new(Slot { idle_since: AtomicU64::new(millis(epoch)), close: shutdown.child_token() });
            open.push(slot.clone());
            let me = self.clone();
            connections.spawn(async move {
                // However the connection ends, its slot reads as ended.
                let _ended = slot.close.clone().drop_guard();
                tokio::select! {
                    () = slot.close.cancelled() => {}
                    r = me.serve_connection(stream, src, &slot, epoch) => if let Err(e) = r { tracing::debug!(%src, "DNS over TCP: {e}"); },
                }
            });
        }
    }

    /// Answers the queries of one TCP connection (RFC 7766 8: each with a two-byte length).
    /// `slot` says when it went idle, for the accept loop to choose whom to close.
    async fn serve_connection(
        &self,
        mut stream: TcpStream,
        src: SocketAddr,
        slot: &Slot,
        epoch: Instant,
    ) -> io::Result<()> {
        loop {
            let len = match tokio::time::timeout(TCP_IDLE, stream.read_u16()).await {
                Ok(Ok(n)) => usize::from(n),
                // Idle, or the client closed: both end the connection quietly.
                _ => return Ok(()),
            };
            let mut buf = vec![0u8; len];
            tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut buf))
                .await
                .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
            // Busy only while answering: a client that sends a length and stalls is as idle
            // as one that sends nothing, and as soon closed for a newcomer.
            slot.idle_since.store(BUSY, Ordering::Relaxed);
            let reply = match self.handle(&buf, src) {
                Handled::Drop => return Ok(()),
                Handled::Local(m, _) | Handled::Refused(m, _) | Handled::HeaderOnly(m) => m,
                Handled::Forward(q, _) => self.forwarder.resolve(&q, true).await,
            };
            let bytes = reply.to_vec().map_err(io::Error::other)?;
            let n = u16::try_from(bytes.len()).map_err(io::Error::other)?;
            let mut framed = Vec::with_capacity(2 + bytes.len());
            framed.extend_from_slice(&n.to_be_bytes());
            framed.extend_from_slice(&bytes);
            // A client that does not read its replies is not kept busy forever.
            tokio::time::timeout(TCP_IDLE, stream.write_all(&framed))
                .await
                .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
            slot.idle_since.store(millis(epoch), Ordering::Relaxed);
        }
    }
}

/// One open TCP connection, shared by its task and the accept loop.
struct Slot {
    /// When it last went idle, in milliseconds since the server started; [`BUSY`] while it
    /// answers a query.
    idle_since: AtomicU64,
    /// Cancelled to close it, and by its task when it ends.
    close: CancellationToken,
}

/// [`Slot::idle_since`] of a connection answering a query.
const BUSY: u64 = u64::MAX;

fn millis(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(BUSY - 1)
}

/// Which connection to close for a newcomer: the one idle since the earliest time; none when
/// all are busy.
fn oldest_idle(idle_since: impl Iterator<Item = u64>) -> Option<usize> {
    idle_since.enumerate().filter(|&(_, t)| t != BUSY).min_by_key(|&(_, t)| t).map(|(i, _)| i)
}

/// Sends a reply from the address the query was sent to, so that a client that asked one of
/// the host's several addresses accepts it (a wildcard socket otherwise answers from whatever
/// address the routing table prefers: hickory#3401).
async fn send(socket: &UdpSocket, bytes: &[u8], to: SocketAddr, asked: Ipv4Addr) {
    let r = match to {
        SocketAddr::V4(to4) => {
            let from = if asked.is_broadcast() || asked.is_multicast() { Ipv4Addr::UNSPECIFIED } else { asked };
            let fd = socket.as_raw_fd();
            socket.async_io(Interest::WRITABLE, || kubenet_udp::send(fd, bytes, to4, 0, from)).await
        }
        SocketAddr::V6(_) => socket.send_to(bytes, to).await.map(|_| ()),
    };
    if let Err(e) = r {
        tracing::debug!(%to, "DNS send: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::ResponseCode;

    #[tokio::test]
    async fn a_busy_port_is_named_with_what_to_do() {
        let (udp, _tcp) = bind_loopback();
        let taken = udp.local_addr().unwrap();
        let err = bind(taken).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("UDP port {} is already in use: another DNS server holds it", taken.port())),
            "{err}"
        );
        assert!(err.contains("kubenet doctor") && err.contains("--dns-listen"), "{err}");
    }

    fn lab_zone() -> Zone {
        let lab =
            kubenet_cluster::parse(kubenet_cluster::REFERENCE_CONFIG, kubenet_cluster::Source::Embedded, "/".as_ref())
                .unwrap();
        Zone::from_lab(&lab, 0)
    }

    /// [`bind`] on a free loopback port. The TCP port follows the UDP one, which a client
    /// socket of another test (the flood's thousands) may hold: then another try.
    fn bind_loopback() -> (UdpSocket, TcpListener) {
        for _ in 0..50 {
            match bind("127.0.0.1:0".parse().unwrap()) {
                Ok(b) => return b,
                Err(BindError::InUse { .. }) => continue,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("no free loopback port in 50 tries");
    }

    fn ask(sock: &std::net::UdpSocket, to: SocketAddr, id: u16, rd: bool, name: &str) -> Message {
        let mut q = Message::query();
        q.metadata.id = id;
        q.metadata.recursion_desired = rd;
        q.add_query(hickory_proto::op::Query::query(name.parse().unwrap(), hickory_proto::rr::RecordType::A));
        sock.send_to(&q.to_vec().unwrap(), to).unwrap();
        let mut buf = [0u8; 1500];
        let n = sock.recv(&mut buf).unwrap();
        Message::from_vec(&buf[..n]).unwrap()
    }

    fn a_records(m: &Message) -> Vec<String> {
        m.answers.iter().map(|r| r.data.to_string()).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_answer_cache_patches_id_and_rd_and_follows_the_zone() {
        let (udp, _tcp) = bind_loopback();
        let addr = udp.local_addr().unwrap();
        let loopback: IpNet = "127.0.0.0/8".parse().unwrap();
        let dns = Dns::new(lab_zone(), Forwarder::new(vec![], Duration::from_millis(100)), vec![loopback]);
        let stop = CancellationToken::new();
        tokio::spawn(dns.clone().serve_udp(udp, stop.clone()));
        let d2 = dns.clone();
        tokio::task::spawn_blocking(move || {
            let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let first = ask(&c, addr, 1, true, "worker0.kubevms.");
            let again = ask(&c, addr, 2, false, "worker0.kubevms.");
            assert_eq!((first.metadata.id, first.metadata.recursion_desired), (1, true));
            assert_eq!((again.metadata.id, again.metadata.recursion_desired), (2, false));
            assert_eq!(a_records(&first), ["192.168.1.14"]);
            assert_eq!(a_records(&again), ["192.168.1.14"]);
            assert!(!d2.answers.is_empty(), "the second answer should come from the cache");

            // A cached NXDOMAIN does not outlive the zone change that creates the name.
            let before = ask(&c, addr, 3, true, "laptop.kubevms.");
            assert_eq!(before.metadata.response_code, ResponseCode::NXDomain);
            d2.update_zone(|z| z.set_dynamic([("laptop", std::net::Ipv4Addr::new(192, 168, 1, 3))]));
            let after = ask(&c, addr, 4, true, "laptop.kubevms.");
            assert_eq!(a_records(&after), ["192.168.1.3"]);
        })
        .await
        .unwrap();
        stop.cancel();
    }

    /// A plain query for `name`, as bytes.
    fn query_bytes(id: u16, name: &str) -> Vec<u8> {
        let mut q = Message::query();
        q.metadata.id = id;
        q.add_query(hickory_proto::op::Query::query(name.parse().unwrap(), hickory_proto::rr::RecordType::A));
        q.to_vec().unwrap()
    }

    #[test]
    fn the_answer_cache_stays_within_its_bytes_and_keeps_what_is_asked_again() {
        let dns = Dns::new(lab_zone(), Forwarder::new(vec![], Duration::from_millis(100)), vec![]);
        let small = query_bytes(1, "worker0.kubevms.");
        dns.remember_answer(&small, &small);
        // Replies of 1232 bytes (the most EDNS lets a UDP one be) under ever new keys, as a
        // client varying its questions makes them, ten times the budget in all; the lab's own
        // name asked between them.
        let big_reply = vec![0u8; 1232];
        let per_entry = answer_weight(small.len() + 20, big_reply.len());
        let mut asked = 0u64;
        for i in 0..100_000 {
            let q = query_bytes(2, &format!("n{i:012}.kubevms."));
            dns.remember_answer(&q, &big_reply);
            asked += per_entry;
            assert!(dns.answers.weight() <= ANSWER_CACHE_BYTES, "{} bytes", dns.answers.weight());
            let mut again = small.clone();
            again[..2].copy_from_slice(&(i as u16).to_be_bytes());
            assert_eq!(dns.cached_answer(&again).expect("still cached")[2..], small[2..]);
            if asked > 10 * ANSWER_CACHE_BYTES {
                break;
            }
        }
        assert!(asked > 10 * ANSWER_CACHE_BYTES);
        // The large ones are cached too, as many as fit: more than half the budget's worth.
        assert!(dns.answers.weight() > ANSWER_CACHE_BYTES / 2, "{} bytes", dns.answers.weight());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forwarded_queries_waiting_at_once_are_bounded() {
        // An upstream on loopback that never answers: every forwarded query waits.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (udp, _tcp) = bind_loopback();
        let addr = udp.local_addr().unwrap();
        let loopback: IpNet = "127.0.0.0/8".parse().unwrap();
        let forwarder = Forwarder::new(vec![silent.local_addr().unwrap()], Duration::from_secs(30));
        let dns = Dns::new(lab_zone(), forwarder, vec![loopback]);
        let stop = CancellationToken::new();
        let served = tokio::spawn(dns.clone().serve_udp(udp, stop.clone()));
        let extra = 100;
        let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for id in 0..(FORWARDS_MAX + extra) as u16 {
            c.send_to(&query_bytes(id, &format!("n{id}.example.")), addr).unwrap();
        }
        // Bounded wait for the server to have read them all.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while dns.counters.queries.load(Ordering::Relaxed) < (FORWARDS_MAX + extra) as u64
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(dns.counters.queries.load(Ordering::Relaxed), (FORWARDS_MAX + extra) as u64);
        // Exactly `extra` dropped: a forward counts against the bound from its spawn.
        assert_eq!(dns.counters.overloaded.load(Ordering::Relaxed), extra as u64);
        // The lab's names are still answered at once.
        let local = tokio::task::spawn_blocking(move || {
            c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut buf = [0u8; 1500];
            // The forwarded queries never get a reply, so the next datagram is this one's.
            let q = query_bytes(7, "worker0.kubevms.");
            c.send_to(&q, addr).unwrap();
            let n = c.recv(&mut buf).unwrap();
            Message::from_vec(&buf[..n]).unwrap()
        })
        .await
        .unwrap();
        assert_eq!(a_records(&local), ["192.168.1.14"]);
        stop.cancel();
        served.await.unwrap().unwrap();
    }

    #[test]
    fn the_connection_idle_longest_makes_room() {
        assert_eq!(oldest_idle([30, 10, BUSY, 20].into_iter()), Some(1));
        assert_eq!(oldest_idle([BUSY, 0, 0].into_iter()), Some(1));
        assert_eq!(oldest_idle([BUSY, BUSY].into_iter()), None);
        assert_eq!(oldest_idle(std::iter::empty()), None);
    }

    /// A query over TCP to `addr`, its reply and how long it took.
    fn ask_tcp(addr: SocketAddr, name: &str) -> (Message, Duration) {
        use std::io::{Read, Write};
        let start = std::time::Instant::now();
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let q = query_bytes(5, name);
        s.write_all(&(q.len() as u16).to_be_bytes()).unwrap();
        s.write_all(&q).unwrap();
        let mut len = [0u8; 2];
        s.read_exact(&mut len).unwrap();
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut buf).unwrap();
        (Message::from_vec(&buf).unwrap(), start.elapsed())
    }

    // One thread, as on the agent's main runtime: the flood must not starve the other loops.
    #[tokio::test(flavor = "current_thread")]
    async fn a_flood_of_idle_tcp_connections_starves_nothing() {
        const FLOOD: usize = 3000;
        let (udp, tcp) = bind_loopback();
        let addr = udp.local_addr().unwrap();
        let loopback: IpNet = "127.0.0.0/8".parse().unwrap();
        let dns = Dns::new(lab_zone(), Forwarder::new(vec![], Duration::from_millis(100)), vec![loopback]);
        let stop = CancellationToken::new();
        let served_udp = tokio::spawn(dns.clone().serve_udp(udp, stop.clone()));
        let served_tcp = tokio::spawn(dns.clone().serve_tcp(tcp, stop.clone()));
        let d2 = dns.clone();
        tokio::task::spawn_blocking(move || {
            // Connections that never say a word, all kept open by the client.
            let flood: Vec<std::net::TcpStream> = (0..FLOOD)
                .map(|_| std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap())
                .collect();
            // Bounded wait for the server to have taken them all, closing the idle ones.
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            let evicted = || d2.counters.tcp_evicted.load(Ordering::Relaxed);
            while evicted() < (FLOOD - TCP_CONNECTIONS_MAX) as u64 && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            assert_eq!(evicted(), (FLOOD - TCP_CONNECTIONS_MAX) as u64);
            assert_eq!(d2.counters.tcp_turned_away.load(Ordering::Relaxed), 0);

            // A fresh TCP query and a UDP one are answered at once.
            let (m, took) = ask_tcp(addr, "worker0.kubevms.");
            assert_eq!(a_records(&m), ["192.168.1.14"]);
            assert!(took < Duration::from_secs(1), "TCP took {took:?}");
            let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let start = std::time::Instant::now();
            assert_eq!(a_records(&ask(&c, addr, 6, true, "worker1.kubevms.")), ["192.168.1.15"]);
            assert!(start.elapsed() < Duration::from_secs(1), "UDP took {:?}", start.elapsed());

            // The first connections were the ones closed: the server's end is gone.
            use std::io::Read;
            let mut first = &flood[0];
            first.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut byte = [0u8; 1];
            let r = first.read(&mut byte);
            assert!(
                matches!(&r, Ok(0)) || matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
                "the oldest connection should be closed: {r:?}"
            );
            let mut last = &flood[FLOOD - 1];
            last.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
            let r = last.read(&mut byte);
            assert!(
                matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut),
                "the newest connection should still be open: {r:?}"
            );
            drop(flood);
        })
        .await
        .unwrap();
        stop.cancel();
        served_udp.await.unwrap().unwrap();
        served_tcp.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_admitted_interfaces_are_answered() {
        let lo = crate::admit::loopback_ifindex().unwrap();
        let loopback: IpNet = "127.0.0.0/8".parse().unwrap();
        let lab = crate::admit::LabInterface { ifindex: lo, address: "192.168.1.1/24".parse().unwrap() };
        // Loopback as the only admitted interface (the lab's unknown yet), then as if loopback
        // were some other interface and the lab's were not either: queries on it are dropped
        // and counted, until the lab's interface is set to it.
        for (admit, answered) in [(Admit::lab(lo, None), true), (Admit::lab(lo + 1000, None), false)] {
            let (udp, _tcp) = bind_loopback();
            let addr = udp.local_addr().unwrap();
            let dns =
                Dns::with_admit(lab_zone(), Forwarder::new(vec![], Duration::from_millis(100)), vec![loopback], admit);
            let stop = CancellationToken::new();
            tokio::spawn(dns.clone().serve_udp(udp, stop.clone()));
            let d2 = dns.clone();
            tokio::task::spawn_blocking(move || {
                let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                c.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
                c.send_to(&query_bytes(1, "worker0.kubevms."), addr).unwrap();
                let mut buf = [0u8; 1500];
                assert_eq!(c.recv(&mut buf).is_ok(), answered);
                assert_eq!(d2.counters.outside.load(Ordering::Relaxed), u64::from(!answered));
                if !answered {
                    d2.admit().set_lab(lab);
                    assert_eq!(a_records(&ask(&c, addr, 2, true, "worker0.kubevms.")), ["192.168.1.14"]);
                }
            })
            .await
            .unwrap();
            stop.cancel();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refused_clients_are_never_served_from_the_cache() {
        let (udp, _tcp) = bind_loopback();
        let addr = udp.local_addr().unwrap();
        let lab_only: IpNet = "192.168.1.0/24".parse().unwrap();
        let dns = Dns::new(lab_zone(), Forwarder::new(vec![], Duration::from_millis(100)), vec![lab_only]);
        // Even with the answer in the cache, a client outside the list is refused.
        let q = {
            let mut q = Message::query();
            q.metadata.id = 9;
            q.add_query(hickory_proto::op::Query::query(
                "worker0.kubevms.".parse().unwrap(),
                hickory_proto::rr::RecordType::A,
            ));
            q.to_vec().unwrap()
        };
        dns.remember_answer(&q, &q);
        let stop = CancellationToken::new();
        tokio::spawn(dns.clone().serve_udp(udp, stop.clone()));
        tokio::task::spawn_blocking(move || {
            let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            for id in [1, 2] {
                let m = ask(&c, addr, id, true, "worker0.kubevms.");
                assert_eq!(m.metadata.response_code, ResponseCode::Refused);
                assert!(m.answers.is_empty());
            }
        })
        .await
        .unwrap();
        stop.cancel();
    }
}
