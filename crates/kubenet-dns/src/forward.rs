//! Everything that is not the lab's goes to the upstream resolvers, through a cache. The query
//! is sent as the client asked it (the name untouched: no search domains, no FQDN games), over
//! the client's protocol; an upstream that does not answer in time is skipped, and when none
//! answers the client gets SERVFAIL instead of waiting.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// How long one upstream gets before the next is tried.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_millis(1500);
/// The cache never holds more entries than this; when full, expired entries go first, then all.
const CACHE_MAX: usize = 10_000;
/// No answer is cached longer than an hour, whatever its TTL.
const TTL_CAP: u32 = 3600;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    name: Name,
    qtype: RecordType,
    qclass: DNSClass,
}

struct Entry {
    response: Message,
    stored: Instant,
    ttl: u32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForwardStats {
    pub forwarded: u64,
    pub cache_hits: u64,
    pub servfail: u64,
}

pub struct Forwarder {
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
    cache: Mutex<HashMap<Key, Entry>>,
    ids: AtomicU64,
    seed: std::hash::RandomState,
    stats: Mutex<ForwardStats>,
}

impl Forwarder {
    pub fn new(upstreams: Vec<SocketAddr>, timeout: Duration) -> Self {
        Forwarder {
            upstreams,
            timeout,
            cache: Mutex::new(HashMap::new()),
            ids: AtomicU64::new(0),
            seed: std::hash::RandomState::new(),
            stats: Mutex::new(ForwardStats::default()),
        }
    }

    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }

    pub fn stats(&self) -> ForwardStats {
        *self.stats.lock().expect("stats lock")
    }

    /// An unpredictable query id, so an off-path attacker cannot guess it (with the fresh
    /// source port each query gets).
    fn next_id(&self) -> u16 {
        let mut h = self.seed.build_hasher();
        h.write_u64(self.ids.fetch_add(1, Ordering::Relaxed));
        h.finish() as u16
    }

    /// The answer to `query`, from the cache or the upstreams; SERVFAIL when none answers.
    pub async fn resolve(&self, query: &Message, tcp: bool) -> Message {
        let key = query.queries.first().map(|q| Key {
            name: q.name().to_lowercase(),
            qtype: q.query_type(),
            qclass: q.query_class(),
        });
        if let Some(hit) = key.as_ref().and_then(|k| self.cached(k)) {
            self.stats.lock().expect("stats lock").cache_hits += 1;
            return finish(query, hit);
        }
        for up in &self.upstreams {
            match tokio::time::timeout(self.timeout, self.ask(*up, query, tcp)).await {
                Ok(Ok(resp)) => {
                    self.stats.lock().expect("stats lock").forwarded += 1;
                    if let Some(k) = key {
                        self.store(k, &resp);
                    }
                    return finish(query, resp);
                }
                Ok(Err(e)) => tracing::debug!(upstream = %up, "upstream failed: {e}"),
                Err(_) => tracing::debug!(upstream = %up, "upstream timed out"),
            }
        }
        self.stats.lock().expect("stats lock").servfail += 1;
        crate::message::response(query, ResponseCode::ServFail, false)
    }

    async fn ask(&self, up: SocketAddr, query: &Message, tcp: bool) -> io::Result<Message> {
        let mut q = query.clone();
        let id = self.next_id();
        q.metadata.id = id;
        // Our own OPT record upstream: the client's options (its cookie) are for us, and our
        // payload size is what we can take.
        q.edns = query.edns.as_ref().map(|e| {
            let mut ours = crate::message::reply_edns(e);
            ours.set_max_payload(crate::message::EDNS_PAYLOAD);
            ours
        });
        let bytes = q.to_vec().map_err(io::Error::other)?;
        let raw = if tcp { ask_tcp(up, &bytes).await? } else { ask_udp(up, &bytes, id).await? };
        let resp = Message::from_vec(&raw).map_err(io::Error::other)?;
        if resp.metadata.id != id || resp.queries != q.queries {
            return Err(io::Error::other("upstream answered another question"));
        }
        Ok(resp)
    }

    fn cached(&self, key: &Key) -> Option<Message> {
        let cache = self.cache.lock().expect("cache lock");
        let e = cache.get(key)?;
        let age = e.stored.elapsed().as_secs() as u32;
        if age >= e.ttl {
            return None;
        }
        let mut m = e.response.clone();
        for r in m.answers.iter_mut().chain(m.authorities.iter_mut()).chain(m.additionals.iter_mut()) {
            r.ttl = r.ttl.saturating_sub(age);
        }
        Some(m)
    }

    fn store(&self, key: Key, resp: &Message) {
        let Some(ttl) = cache_ttl(resp) else { return };
        let mut cache = self.cache.lock().expect("cache lock");
        if cache.len() >= CACHE_MAX {
            cache.retain(|_, e| e.stored.elapsed().as_secs() < u64::from(e.ttl));
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(key, Entry { response: resp.clone(), stored: Instant::now(), ttl });
    }
}

/// How long a response may be cached: the smallest answer TTL, or for a negative answer the
/// SOA's (RFC 2308 5); None for what must not be cached (errors, truncated answers, TTL 0).
fn cache_ttl(resp: &Message) -> Option<u32> {
    if resp.metadata.truncation {
        return None;
    }
    let ttl = match resp.metadata.response_code {
        ResponseCode::NoError if !resp.answers.is_empty() => resp.answers.iter().map(|r| r.ttl).min()?,
        ResponseCode::NoError | ResponseCode::NXDomain => resp.authorities.iter().find_map(|r| match &r.data {
            RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
            _ => None,
        })?,
        _ => return None,
    };
    (ttl > 0).then_some(ttl.min(TTL_CAP))
}

/// The upstream's answer, under the client's id, with RA set.
/// The upstream's answer as ours to `query`: its id, RA, and our own OPT record in place of the
/// upstream's (whose options, a cookie say, were made for us, not for the client).
fn finish(query: &Message, mut resp: Message) -> Message {
    resp.metadata.id = query.metadata.id;
    resp.metadata.recursion_available = true;
    resp.edns = query.edns.as_ref().map(crate::message::reply_edns);
    resp
}

async fn ask_udp(up: SocketAddr, bytes: &[u8], id: u16) -> io::Result<Vec<u8>> {
    let local: SocketAddr =
        if up.is_ipv4() { "0.0.0.0:0".parse().expect("addr") } else { "[::]:0".parse().expect("addr") };
    let s = UdpSocket::bind(local).await?;
    s.connect(up).await?;
    s.send(bytes).await?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = s.recv(&mut buf).await?;
        // Ignore stray datagrams; the caller's timeout bounds the wait.
        if n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn ask_tcp(up: SocketAddr, bytes: &[u8]) -> io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(up).await?;
    let len = u16::try_from(bytes.len()).map_err(io::Error::other)?;
    s.write_all(&len.to_be_bytes()).await?;
    s.write_all(bytes).await?;
    let n = s.read_u16().await?;
    let mut buf = vec![0u8; usize::from(n)];
    s.read_exact(&mut buf).await?;
    Ok(buf)
}

/// Where forwarded queries go.
#[derive(Debug, PartialEq, Eq)]
pub struct Upstreams {
    pub kept: Vec<SocketAddr>,
    /// Configured upstreams that are this server itself, left out (a loop otherwise).
    pub dropped: Vec<SocketAddr>,
}

/// Chooses the upstreams, the one place that does: the lab's `upstream` list, else the
/// nameservers of the host's resolv.conf (its text); minus this server itself, which listens
/// on `listen` and, with a wildcard listen address, on every one of the host's addresses `own`
/// (and loopback) at the same port.
pub fn choose_upstreams(configured: &[SocketAddr], resolv_conf: &str, listen: SocketAddr, own: &[IpAddr]) -> Upstreams {
    let candidates = if configured.is_empty() { parse_resolv_conf(resolv_conf) } else { configured.to_vec() };
    let is_self = |u: &SocketAddr| {
        u.port() == listen.port()
            && (*u == listen || (listen.ip().is_unspecified() && (u.ip().is_loopback() || own.contains(&u.ip()))))
    };
    let (dropped, kept) = candidates.into_iter().partition(is_self);
    Upstreams { kept, dropped }
}

/// The `nameserver` lines of a resolv.conf.
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.split_whitespace().next())
        // A scoped IPv6 address (fe80::1%eth0) has no portable form here; skip it.
        .filter_map(|a| a.parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstreams_that_are_this_server_are_dropped() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let ups = [a("127.0.0.1:53"), a("192.168.1.1:53"), a("192.0.2.53:53"), a("127.0.0.53:53"), a("127.0.0.1:5353")];
        let own = [IpAddr::from([192, 168, 1, 1])];
        // Wildcard listen on 53: loopback and own addresses on port 53 are us.
        let kept = |listen: &str| choose_upstreams(&ups, "", a(listen), &own).kept;
        assert_eq!(kept("0.0.0.0:53"), [a("192.0.2.53:53"), a("127.0.0.1:5353")]);
        // A specific listen address: only that exact address is us (systemd-resolved's
        // 127.0.0.53 is another server).
        assert_eq!(
            kept("127.0.0.1:53"),
            [a("192.168.1.1:53"), a("192.0.2.53:53"), a("127.0.0.53:53"), a("127.0.0.1:5353")]
        );
    }

    #[test]
    fn without_a_configured_upstream_the_hosts_resolvers_are_used() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let resolv = "nameserver 127.0.0.53\nnameserver 192.0.2.1\n";
        let u = choose_upstreams(&[], resolv, a("0.0.0.0:53"), &[]);
        // 127.0.0.53:53 is loopback on our port: with a wildcard listen address, that is us.
        assert_eq!(u, Upstreams { kept: vec![a("192.0.2.1:53")], dropped: vec![a("127.0.0.53:53")] });
        // A configured list wins over resolv.conf.
        assert_eq!(choose_upstreams(&[a("192.0.2.9:53")], resolv, a("0.0.0.0:53"), &[]).kept, [a("192.0.2.9:53")]);
    }

    #[test]
    fn resolv_conf_nameservers() {
        let text = "# generated\nsearch example\nnameserver 192.0.2.53\nnameserver  2001:db8::35 \noptions edns0\nnameserver fe80::1%eth0\n";
        let got = parse_resolv_conf(text);
        assert_eq!(got, ["192.0.2.53:53".parse().unwrap(), "[2001:db8::35]:53".parse().unwrap()]);
    }
}
