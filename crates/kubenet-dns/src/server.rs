//! The DNS server's I/O: UDP and TCP sockets, the access list, truncation, and the split between
//! local answers (inline, never waiting on the network) and forwarded queries (each in a task of
//! its own, so a slow upstream never delays the lab's names).

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_proto::op::Message;
use ipnet::IpNet;
use kubenet_udp::{Inbox, Outbox};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::forward::Forwarder;
use crate::message::{PLAIN_UDP, allowed, answer_key, encode_udp};
use crate::request::{self, Handled};
use crate::zone::Zone;

/// A TCP client that says nothing for this long is dropped.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// The answer cache of local replies holds at most this many; when full it starts over.
const ANSWER_CACHE_MAX: usize = 4096;

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
    tcp.listen(128).map_err(wrap(addr, "TCP"))?;
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
}

pub struct Dns {
    zone: RwLock<Zone>,
    forwarder: Forwarder,
    allow: Vec<IpNet>,
    /// Encoded UDP replies to local questions, by the request's bytes after the id (flags
    /// without RD, counts, question, EDNS). A hit costs a copy and two patched fields instead
    /// of a parse and an encode. Local answers change only with the zone, which clears it.
    answers: RwLock<std::collections::HashMap<Vec<u8>, Vec<u8>>>,
    pub counters: Counters,
}

impl Dns {
    pub fn new(zone: Zone, forwarder: Forwarder, allow: Vec<IpNet>) -> Arc<Self> {
        Arc::new(Dns {
            zone: RwLock::new(zone),
            forwarder,
            allow,
            answers: RwLock::new(std::collections::HashMap::new()),
            counters: Counters::default(),
        })
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
        }
    }

    /// Replaces the zone (a reload, or new DHCP names).
    pub fn update_zone(&self, f: impl FnOnce(&mut Zone)) {
        f(&mut self.zone.write().expect("zone lock"));
        self.answers.write().expect("answer cache lock").clear();
    }

    /// The cached reply to `request`, with its id and RD.
    fn cached_answer(&self, request: &[u8]) -> Option<Vec<u8>> {
        let key = answer_key(request)?;
        let mut reply = self.answers.read().expect("answer cache lock").get(&key)?.clone();
        reply[..2].copy_from_slice(&request[..2]);
        reply[2] = (reply[2] & !1) | (request[2] & 1);
        Some(reply)
    }

    fn remember_answer(&self, request: &[u8], reply: &[u8]) {
        let Some(key) = answer_key(request) else { return };
        let mut cache = self.answers.write().expect("answer cache lock");
        if cache.len() >= ANSWER_CACHE_MAX {
            cache.clear();
        }
        cache.insert(key, reply.to_vec());
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
            Handled::FormErr(_) | Handled::Drop => Some(&self.counters.malformed),
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
                let Some(q) = self.answer_udp(request, e.src, e.dst, &mut outbox) else { continue };
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
            Handled::FormErr(m) => (m, PLAIN_UDP),
        };
        outbox.push(&encode_udp(&m, limit)?, src, from);
        None
    }

    /// Serves TCP until `shutdown`: each connection in its own task. Returns once every
    /// connection has ended.
    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) -> io::Result<()> {
        let connections = TaskTracker::new();
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
            let me = self.clone();
            let stop = shutdown.clone();
            connections.spawn(async move {
                tokio::select! {
                    () = stop.cancelled() => {}
                    r = me.serve_connection(stream, src) => if let Err(e) = r { tracing::debug!(%src, "DNS over TCP: {e}"); },
                }
            });
        }
    }

    async fn serve_connection(&self, mut stream: TcpStream, src: SocketAddr) -> io::Result<()> {
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
            let reply = match self.handle(&buf, src) {
                Handled::Drop => return Ok(()),
                Handled::Local(m, _) | Handled::Refused(m, _) | Handled::FormErr(m) => m,
                Handled::Forward(q, _) => self.forwarder.resolve(&q, true).await,
            };
            let bytes = reply.to_vec().map_err(io::Error::other)?;
            let n = u16::try_from(bytes.len()).map_err(io::Error::other)?;
            stream.write_all(&n.to_be_bytes()).await?;
            stream.write_all(&bytes).await?;
        }
    }
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
        let (udp, _tcp) = bind("127.0.0.1:0".parse().unwrap()).unwrap();
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
        let (udp, _tcp) = bind("127.0.0.1:0".parse().unwrap()).unwrap();
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
            assert!(!d2.answers.read().unwrap().is_empty(), "the second answer should come from the cache");

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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refused_clients_are_never_served_from_the_cache() {
        let (udp, _tcp) = bind("127.0.0.1:0".parse().unwrap()).unwrap();
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
