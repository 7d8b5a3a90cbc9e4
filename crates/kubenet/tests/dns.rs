//! `kubenet serve --dns-only` on a loopback port, asked by a real client (`dig`), forwarding to
//! a fake upstream that this test runs on loopback itself. No query leaves the machine. A last
//! test runs the whole `serve` in namespaces to check the access list from another network.

#[path = "support/mod.rs"]
mod support;

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::{Netns, Proc, prerequisites, tools, veth};

/// A fake upstream resolver: answers every A question with 203.0.113.7 (TEST-NET-3), a name
/// starting with "big" with 40 addresses from there on, and counts the queries it saw. Stops
/// when dropped.
struct FakeUpstream {
    addr: SocketAddr,
    seen: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl FakeUpstream {
    fn start() -> FakeUpstream {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let addr = sock.local_addr().unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, st2) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !st2.load(Ordering::Relaxed) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else { continue };
                if n < 12 {
                    continue;
                }
                s2.fetch_add(1, Ordering::Relaxed);
                // The question ends at the name's zero byte plus type and class.
                let qend = 12 + buf[12..n].iter().position(|&b| b == 0).unwrap() + 5;
                let mut r = Vec::new();
                // A name starting with "big" gets 40 addresses: more than 512 bytes.
                let answers: u8 = if buf[13..16] == *b"big" { 40 } else { 1 };
                r.extend_from_slice(&buf[..2]); // id
                r.extend_from_slice(&[0x81, 0x80, 0, 1, 0, answers, 0, 0, 0, 0]); // QR RD RA, 1 question
                r.extend_from_slice(&buf[12..qend]);
                for i in 0..answers {
                    r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0x01, 0x2c, 0, 4, 203, 0, 113, 7 + i]);
                }
                let _ = sock.send_to(&r, from);
            }
        });
        FakeUpstream { addr, seen, stop }
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A lab with the given upstream, served DNS-only on a free loopback port.
fn serve_dns(dir: &Path, upstream: &str) -> (Proc, u16) {
    std::fs::write(dir.join("kubenet.toml"), support::test_lab_with_upstream(upstream)).unwrap();
    let port = support::free_port();
    (support::serve_dns_only(dir, port), port)
}

fn dig(port: u16, args: &[&str]) -> String {
    let out = Command::new("dig")
        .args(["@127.0.0.1", "-p", &port.to_string(), "+tries=1", "+time=5"])
        .args(args)
        .output()
        .expect("run dig");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn short(port: u16, args: &[&str]) -> String {
    let mut a = vec!["+short"];
    a.extend_from_slice(args);
    dig(port, &a).trim().to_string()
}

#[test]
fn lab_names_over_udp_and_tcp() {
    if tools(&["dig"]).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let up = FakeUpstream::start();
    let (server, port) = serve_dns(dir.path(), &up.addr.to_string());

    assert_eq!(short(port, &["worker0.kubevms", "A"]), "192.168.1.14");
    assert_eq!(short(port, &["+tcp", "worker0.kubevms", "A"]), "192.168.1.14");
    assert_eq!(short(port, &["vmhost.kubevms"]), "192.168.1.1");
    assert_eq!(short(port, &["GATEWAY.KubeVMs."]), "192.168.1.10");
    assert_eq!(short(port, &["-x", "192.168.1.14"]), "worker0.kubevms.");
    // A single label, as a resolver without a search list sends it.
    assert_eq!(short(port, &["+nosearch", "worker0."]), "192.168.1.14");

    let full = dig(port, &["worker0.kubevms"]);
    let flags = full.lines().find(|l| l.contains(";; flags:")).unwrap();
    assert!(flags.contains(" aa") && flags.contains(" ra"), "{flags}");

    let aaaa = dig(port, &["worker0.kubevms", "AAAA"]);
    assert!(aaaa.contains("status: NOERROR") && aaaa.contains("ANSWER: 0") && aaaa.contains("AUTHORITY: 1"), "{aaaa}");
    let nx = dig(port, &["nope.kubevms"]);
    assert!(nx.contains("status: NXDOMAIN") && nx.contains("AUTHORITY: 1") && nx.contains("SOA"), "{nx}");
    let nx = dig(port, &["-x", "10.1.2.3"]);
    assert!(nx.contains("status: NXDOMAIN"), "{nx}");
    let nx = dig(port, &["+nosearch", "intranet."]);
    assert!(nx.contains("status: NXDOMAIN"), "{nx}");
    // None of that was the upstream's business.
    assert_eq!(up.seen.load(Ordering::Relaxed), 0, "a lab query was forwarded");
    drop(server);
}

/// The lines of dig's report that say what came back: header, flags, OPT, counts.
fn header(port: u16, args: &[&str]) -> String {
    dig(port, args)
        .lines()
        .filter(|l| {
            l.starts_with(";; ->>HEADER")
                || l.starts_with(";; flags")
                || l.starts_with("; EDNS")
                || l.contains("COOKIE")
                || l.contains("MBZ")
                || l.starts_with(";; Truncated")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// dig's OPT PSEUDOSECTION: the reply's EDNS version, flags, size and options.
fn opt_section(out: &str) -> String {
    out.lines()
        .skip_while(|l| !l.starts_with(";; OPT PSEUDOSECTION"))
        .skip(1)
        .take_while(|l| !l.is_empty() && !l.starts_with(";; QUESTION"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// EDNS and header rules as RFC 6891, RFC 1035 4.1.1, RFC 3225 and RFC 7873 write them (not as
/// dnsmasq does them): BADVERS for an unknown EDNS version, NOTIMP without AA or RA for an
/// unknown opcode, unknown options and cookies ignored and not echoed, unknown flags zero and DO
/// copied, TC for a small buffer and a working TCP retry, the SOA with AA every way.
#[test]
fn edns_and_header_rules_follow_the_rfcs() {
    if tools(&["dig"]).is_some() {
        return;
    }
    let up = FakeUpstream::start();
    let dir = tempfile::tempdir().unwrap();
    let (_p, port) = serve_dns(dir.path(), &up.addr.to_string());

    let h = header(port, &["+edns=1", "+noednsneg", "kubevms", "SOA"]);
    assert!(h.contains("status: BADVERS") && h.contains("; EDNS: version: 0,"), "{h}");
    assert!(dig(port, &["+edns=1", "+noednsneg", "kubevms", "SOA"]).contains("ANSWER: 0,"), "no answer with BADVERS");

    let h = header(port, &["+opcode=15", "kubevms", "SOA"]);
    assert!(h.contains("status: NOTIMP") && h.contains(";; flags: qr rd;"), "RD copied, neither AA nor RA: {h}");

    let out = dig(port, &["+ednsopt=65001:abcd", "+cookie", "kubevms", "SOA"]);
    let opt = opt_section(&out);
    assert!(out.contains("status: NOERROR") && opt.starts_with("; EDNS: version: 0"), "{out}");
    assert!(!opt.contains("COOKIE") && !opt.contains("65001"), "options echoed: {opt}");
    let h = header(port, &["+ednsflags=0x7f00", "+dnssec", "kubevms", "SOA"]);
    assert!(h.contains("; EDNS: version: 0, flags: do;") && !h.contains("MBZ"), "{h}");
    // The same for a forwarded answer: our OPT, not the client's or the upstream's.
    let h = header(port, &["+ednsflags=0x7f00", "+dnssec", "+cookie", "elsewhere.example", "A"]);
    assert!(h.contains("; EDNS: version: 0, flags: do;") && !h.contains("MBZ") && !h.contains("COOKIE"), "{h}");

    for how in [&["+noedns"][..], &["+tcp"], &["+edns=0"], &["+tcp", "+edns=0"]] {
        let out = dig(port, &[how, &["kubevms", "SOA"]].concat());
        assert!(out.contains(";; flags: qr aa rd ra;") && out.contains("ANSWER: 1,"), "{how:?}: {out}");
        assert!(out.contains("kubevms.\t\t0\tIN\tSOA\tvmhost.kubevms. hostmaster.kubevms."), "{how:?}: {out}");
    }

    // 40 addresses do not fit 512 bytes: TC over UDP, and dig's retry over TCP gets them all.
    let h = header(port, &["+bufsize=512", "+ignore", "big.example", "A"]);
    assert!(h.contains(" tc ") || h.contains(" tc;"), "{h}");
    let out = dig(port, &["+bufsize=512", "big.example", "A"]);
    assert!(out.contains("Truncated, retrying in TCP mode") && out.contains("ANSWER: 40,"), "{out}");
}

#[test]
fn other_names_are_forwarded_and_cached() {
    if tools(&["dig"]).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let up = FakeUpstream::start();
    let (server, port) = serve_dns(dir.path(), &up.addr.to_string());
    assert_eq!(short(port, &["deb.example.org"]), "203.0.113.7");
    let full = dig(port, &["deb.example.org"]);
    assert!(full.contains(" ra"), "{full}");
    assert_eq!(short(port, &["DEB.example.org"]), "203.0.113.7");
    assert_eq!(up.seen.load(Ordering::Relaxed), 1, "the second and third queries should be cache hits");
    assert_eq!(short(port, &["other.example.org"]), "203.0.113.7");
    assert_eq!(up.seen.load(Ordering::Relaxed), 2);
    let log = server.stop();
    assert!(log.contains("cache_hits=2"), "{log}");
}

#[test]
fn a_silent_upstream_gives_servfail_quickly_and_local_names_still_answer() {
    if tools(&["dig"]).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Bound but never read: queries to it vanish without an ICMP error.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let (server, port) = serve_dns(dir.path(), &silent.local_addr().unwrap().to_string());
    let start = Instant::now();
    let out = dig(port, &["deb.example.org"]);
    let took = start.elapsed();
    assert!(out.contains("status: SERVFAIL"), "{out}");
    assert!(took < Duration::from_secs(4), "SERVFAIL took {took:?}");
    // While a forward waits, the lab's names answer at once.
    let waiting = std::thread::spawn(move || dig(port, &["slow.example.org"]));
    let start = Instant::now();
    assert_eq!(short(port, &["worker1.kubevms"]), "192.168.1.15");
    assert!(start.elapsed() < Duration::from_millis(500), "local answer waited on the upstream");
    assert!(waiting.join().unwrap().contains("SERVFAIL"));
    drop(server);
}

#[test]
fn the_server_never_forwards_to_itself() {
    if tools(&["dig"]).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // An upstream on the port kubenet will listen on: find the port first, then point at it.
    let port = support::free_port();
    std::fs::write(dir.path().join("kubenet.toml"), support::test_lab_with_upstream(&format!("127.0.0.1:{port}")))
        .unwrap();
    let p = support::serve_dns_only(dir.path(), port);
    assert!(p.log_text().contains("that is this server itself"), "{}", p.log_text());
    let out = dig(port, &["deb.example.org"]);
    assert!(out.contains("status: SERVFAIL"), "{out}");
    let log = p.stop();
    assert!(log.contains("queries=1 "), "the query looped:\n{log}");
}

#[test]
fn clients_outside_the_lab_are_refused() {
    if prerequisites(&["dig"]).is_some() {
        return;
    }
    // The server's namespace is on the lab's network and on another one; a client on the other
    // network gets nothing at all (no REFUSED: the root agent reflects nothing to strangers),
    // a client on the lab's gets answers.
    let server_ns = Netns::new("ds");
    let lab_client = Netns::new("dl");
    let stranger = Netns::new("dx");
    veth(&server_ns, "knl", &lab_client, "knl0");
    veth(&server_ns, "knx", &stranger, "knx0");
    server_ns.ip(&["addr", "add", "192.168.1.1/24", "dev", "knl"]);
    server_ns.ip(&["addr", "add", "10.99.0.1/24", "dev", "knx"]);
    lab_client.ip(&["addr", "add", "192.168.1.50/24", "dev", "knl0"]);
    stranger.ip(&["addr", "add", "10.99.0.2/24", "dev", "knx0"]);
    // The stranger routes the lab's network through the server, and asks its lab address too.
    stranger.ip(&["route", "add", "192.168.1.0/24", "via", "10.99.0.1"]);
    let dir = tempfile::tempdir().unwrap();
    let server = support::serve(&server_ns, dir.path(), &["--dns-only"]);
    let ask = |ns: &Netns, at: &str| {
        let out = support::run(ns.cmd("dig").args([&format!("@{at}"), "+tries=1", "+time=3", "worker0.kubevms"]));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let ok = ask(&lab_client, "192.168.1.1");
    assert!(ok.contains("status: NOERROR") && ok.contains("192.168.1.14"), "{ok}");
    for at in ["10.99.0.1", "192.168.1.1"] {
        let out =
            stranger.cmd("dig").args([&format!("@{at}"), "+tries=1", "+time=2", "worker0.kubevms"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success() && text.contains("timed out"), "asking {at} from outside:\n{text}");
    }
    let log = server.stop();
    assert!(log.contains("outside=2"), "{log}");
    assert!(log.contains("upstream=\"127.0.0.1:9\""), "a test server must not forward to the host's resolvers:\n{log}");
}

#[test]
fn replies_come_from_the_address_the_client_asked() {
    if prerequisites(&["dig"]).is_some() {
        return;
    }
    // Two addresses on the server's one link: routing would answer from the first, and dig
    // drops a reply from an address it did not ask.
    let support::Pair { server: server_ns, client } = support::pair("da", "192.168.1.1/24");
    server_ns.ip(&["addr", "add", "192.168.1.2/24", "dev", "kns"]);
    client.ip(&["addr", "add", "192.168.1.50/24", "dev", "knc"]);
    let dir = tempfile::tempdir().unwrap();
    let server = support::serve(&server_ns, dir.path(), &["--dns-only"]);
    for at in ["192.168.1.2", "192.168.1.1"] {
        let out = support::run(client.cmd("dig").args([&format!("@{at}"), "+tries=1", "+time=3", "worker0.kubevms"]));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("status: NOERROR") && text.contains(&format!("SERVER: {at}#53")), "asking {at}:\n{text}");
        assert!(!text.contains("unexpected source"), "{text}");
    }
    drop(server);
}

#[test]
fn a_garbage_upstream_gives_servfail_and_local_names_keep_full_speed() {
    if tools(&["dig"]).is_some() {
        return;
    }
    // An upstream that answers every query with its id and then junk.
    let junk = UdpSocket::bind("127.0.0.1:0").unwrap();
    junk.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let junk_addr = junk.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while !stop2.load(Ordering::Relaxed) {
            if let Ok((n, from)) = junk.recv_from(&mut buf)
                && n >= 2
            {
                let mut r = buf[..2].to_vec();
                r.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef, 0xff, 0xff, 0xff, 0xff, 0x07]);
                let _ = junk.send_to(&r, from);
            }
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let (server, port) = serve_dns(dir.path(), &junk_addr.to_string());
    let start = Instant::now();
    assert!(dig(port, &["deb.example.org"]).contains("status: SERVFAIL"));
    assert!(start.elapsed() < Duration::from_secs(1), "garbage should fail at once, not at the timeout");

    // Forwarded queries keep failing in the background while 2000 local ones are timed.
    let flooding = Arc::new(AtomicBool::new(true));
    let f2 = flooding.clone();
    let flood = std::thread::spawn(move || {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut sent = 0u32;
        while f2.load(Ordering::Relaxed) && sent < 20_000 {
            let _ = s.send_to(&query(sent as u16, "deb.example.org"), ("127.0.0.1", port));
            sent += 1;
            std::thread::sleep(Duration::from_micros(200));
        }
    });
    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    c.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 512];
    for id in 0..2000u16 {
        c.send_to(&query(id, "worker0.kubevms"), ("127.0.0.1", port)).unwrap();
        let n = c.recv(&mut buf).expect("a local query went unanswered");
        assert_eq!(u16::from_be_bytes([buf[0], buf[1]]), id);
        assert_eq!(buf[3] & 0x0f, 0, "rcode");
        assert_eq!(&buf[n - 4..n], &[192, 168, 1, 14]);
    }
    let took = start.elapsed();
    flooding.store(false, Ordering::Relaxed);
    flood.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    eprintln!("2000 local queries in {took:?} with garbage forwards in flight");
    assert!(took < Duration::from_secs(5), "local answers slowed to {took:?}");
    drop(server);
}

/// A plain A query in wire form.
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}
