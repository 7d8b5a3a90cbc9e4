//! Everything that is not the lab's goes to the upstream resolvers, through a cache. The query
//! is sent as the client asked it (the name untouched: no search domains, no FQDN games), over
//! the client's protocol; an upstream that does not answer in time is skipped, and when none
//! answers the client gets SERVFAIL instead of waiting.

use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// How long one upstream gets before the next is tried.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_millis(1500);
/// The most the answer cache may hold, in bytes as [`Entry::weight`] counts them. A typical
/// forwarded answer weighs under 1 KiB, so this keeps several thousand (what a lab's clients
/// ask for in an hour is far less), while a client asking for one huge answer after another
/// (64 KiB each over TCP) can no longer make the root agent hold hundreds of megabytes, as the
/// former limit of 10,000 entries of any size allowed. Over budget, the cache evicts what was
/// least used (quick_cache's CLOCK-Pro-like policy: one-off answers go before ones asked again).
pub const CACHE_BYTES: u64 = 8 << 20;
/// The bytes an entry costs beyond its wire size: the key, the entry, and the cache's own
/// bookkeeping for it (hash, slot, links), rounded up.
const ENTRY_OVERHEAD: usize = std::mem::size_of::<Key>() + std::mem::size_of::<Entry>() + 64;
/// No answer is cached longer than an hour, whatever its TTL.
const TTL_CAP: u32 = 3600;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    name: Name,
    qtype: RecordType,
    qclass: DNSClass,
}

#[derive(Clone)]
struct Entry {
    response: Message,
    stored: Instant,
    ttl: u32,
    /// What the entry costs, in bytes: its wire size, plus each record's in-memory form (a
    /// parsed record keeps its names inline, so it is larger than on the wire), plus
    /// [`ENTRY_OVERHEAD`]. Counted once when stored, as the cache wants it cheap.
    weight: u32,
}

/// Weighs entries by [`Entry::weight`] for the byte-bounded cache.
#[derive(Clone)]
struct Bytes;

impl quick_cache::Weighter<Key, Entry> for Bytes {
    fn weight(&self, _: &Key, e: &Entry) -> u64 {
        u64::from(e.weight)
    }
}

type Cache = quick_cache::sync::Cache<Key, Entry, Bytes>;

/// A cache of at most `bytes`. Few shards: its users are the DNS thread and the agent's main
/// runtime, and a shard must hold the largest answer (64 KiB) many times over.
fn cache(bytes: u64) -> Cache {
    let options = quick_cache::OptionsBuilder::new()
        .shards(4)
        .estimated_items_capacity(usize::try_from(bytes / 1024).unwrap_or(usize::MAX).max(16))
        .weight_capacity(bytes)
        .build()
        .expect("every option is set");
    Cache::with_options(options, Bytes, Default::default(), Default::default())
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
    cache: Cache,
    ids: AtomicU64,
    seed: std::hash::RandomState,
    stats: Mutex<ForwardStats>,
}

impl Forwarder {
    pub fn new(upstreams: Vec<SocketAddr>, timeout: Duration) -> Self {
        Self::with_cache_bytes(upstreams, timeout, CACHE_BYTES)
    }

    /// A forwarder whose cache holds at most `cache_bytes` (tests use a small one).
    pub fn with_cache_bytes(upstreams: Vec<SocketAddr>, timeout: Duration, cache_bytes: u64) -> Self {
        Forwarder {
            upstreams,
            timeout,
            cache: cache(cache_bytes),
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
                Ok(Ok((resp, wire))) => {
                    self.stats.lock().expect("stats lock").forwarded += 1;
                    if let Some(k) = key {
                        self.store(k, &resp, wire);
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

    /// The upstream's answer, and its size on the wire.
    async fn ask(&self, up: SocketAddr, query: &Message, tcp: bool) -> io::Result<(Message, usize)> {
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
        Ok((resp, raw.len()))
    }

    fn cached(&self, key: &Key) -> Option<Message> {
        let e = self.cache.get(key)?;
        let age = e.stored.elapsed().as_secs() as u32;
        if age >= e.ttl {
            // Its bytes go back to the budget now rather than when evicted.
            self.cache.remove(key);
            return None;
        }
        let mut m = e.response;
        for r in m.answers.iter_mut().chain(m.authorities.iter_mut()).chain(m.additionals.iter_mut()) {
            r.ttl = r.ttl.saturating_sub(age);
        }
        Some(m)
    }

    /// Caches `resp`, `wire` bytes long on the wire, under `key`, if it may be cached at all.
    fn store(&self, key: Key, resp: &Message, wire: usize) {
        let Some(ttl) = cache_ttl(resp) else { return };
        let records = resp.answers.len() + resp.authorities.len() + resp.additionals.len();
        let weight = wire + records * std::mem::size_of::<Record>() + ENTRY_OVERHEAD;
        // An answer is at most 64 KiB on the wire, so this never saturates in practice.
        let weight = u32::try_from(weight).unwrap_or(u32::MAX);
        self.cache.insert(key, Entry { response: resp.clone(), stored: Instant::now(), ttl, weight });
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
    // We offer upstreams EDNS_PAYLOAD bytes (or 512 without EDNS); an answer larger than
    // that breaks the protocol, arrives cut and fails to parse. A few KiB a query waiting, not
    // 64 KiB, keeps a burst of forwarded queries cheap.
    let mut buf = vec![0u8; 4096];
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

    fn key(name: &str) -> Key {
        Key { name: name.parse().unwrap(), qtype: RecordType::A, qclass: DNSClass::IN }
    }

    /// An answer to `name` with `n` A records, and its wire size.
    fn answer(name: &str, n: u16) -> (Message, usize) {
        let mut m = Message::query();
        m.metadata.message_type = hickory_proto::op::MessageType::Response;
        m.add_query(hickory_proto::op::Query::query(name.parse().unwrap(), RecordType::A));
        for i in 0..n {
            let [a, b] = i.to_be_bytes();
            let rdata = RData::A(hickory_proto::rr::rdata::A::new(10, 0, a, b));
            m.add_answer(Record::from_rdata(name.parse().unwrap(), 300, rdata));
        }
        let wire = m.to_vec().unwrap().len();
        (m, wire)
    }

    #[test]
    fn the_cache_stays_within_its_bytes_and_keeps_what_is_asked_again() {
        const BUDGET: u64 = 1 << 20;
        let f = Forwarder::with_cache_bytes(vec![], UPSTREAM_TIMEOUT, BUDGET);
        let (small, wire) = answer("lab-asks-this.example.", 1);
        f.store(key("lab-asks-this.example."), &small, wire);
        // Large answers (200 records, 3 KiB on the wire and some 40 KiB in memory each), 20 times
        // the budget in all, with the small one asked for between them, as a lab's clients keep
        // asking for their own few names.
        let (big, big_wire) = answer("big.example.", 200);
        assert!(big_wire > 3000, "{big_wire}");
        let mut inserted = 0u64;
        for i in 0..10_000 {
            let name = format!("big{i}.example.");
            f.store(key(&name), &big, big_wire);
            inserted += f.cache.peek(&key(&name)).map_or(0, |e| u64::from(e.weight));
            assert!(f.cache.weight() <= BUDGET, "{} bytes cached, over {BUDGET}", f.cache.weight());
            let hit = f.cached(&key("lab-asks-this.example.")).expect("the small answer is still cached");
            assert_eq!(hit.answers, small.answers);
            if inserted > 20 * BUDGET {
                break;
            }
        }
        assert!(inserted > 20 * BUDGET, "large answers are cached too");
        // The weight is no guess of zero: a large entry counts at least its wire bytes.
        assert!(f.cache.weight() >= big_wire as u64);
    }

    #[test]
    fn the_largest_answer_fits_in_a_shard_of_the_cache() {
        // 64 KiB of A records on the wire, weighed as `store` does: a shard must take it, or
        // quick_cache would refuse it as overweight.
        let f = Forwarder::new(vec![], UPSTREAM_TIMEOUT);
        let records = 65535 / 16;
        let weight = 65535 + records * std::mem::size_of::<Record>() + ENTRY_OVERHEAD;
        assert!((weight as u64) <= f.cache.shard_capacity(), "{weight} against {}", f.cache.shard_capacity());
    }

    #[test]
    fn an_expired_answer_is_not_served_and_leaves_the_cache() {
        let f = Forwarder::new(vec![], UPSTREAM_TIMEOUT);
        let (m, wire) = answer("old.example.", 1);
        f.store(key("old.example."), &m, wire);
        let mut e = f.cache.get(&key("old.example.")).unwrap();
        e.stored -= Duration::from_secs(301);
        f.cache.insert(key("old.example."), e);
        assert!(f.cached(&key("old.example.")).is_none());
        assert_eq!((f.cache.len(), f.cache.weight()), (0, 0));
    }

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
