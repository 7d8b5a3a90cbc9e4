//! The source policy ([`kubenet_dns::Admit`]) against real interfaces, in network namespaces
//! this test makes: a server namespace with a "lab" veth and a "LAN" veth, each leading to a
//! client namespace of its own. The server listens on the wildcard address, the worst case;
//! both networks are on its access list, so only the policy keeps the LAN out. No packet
//! leaves the namespaces. Needs root and `ip`; skips, saying why, without them (fails instead
//! under CI=true, as the workspace's system tests do). Linux only: namespaces are.
#![cfg(target_os = "linux")]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::RecordType;
use kubenet_dns::{Admit, Dns, Forwarder, LabInterface, Zone};
use tokio_util::sync::CancellationToken;

fn run(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("kndns{tag}-{}", std::process::id());
        run(&["netns", "add", &name]);
        let ns = Netns(name);
        run(&["-n", &ns.0, "link", "set", "lo", "up"]);
        ns
    }

    /// Runs `f` on a thread inside this namespace: sockets made there stay in it.
    fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap();
            // SAFETY: a valid namespace descriptor; only this thread changes namespace.
            assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns");
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A veth pair `a_if`-`b_if` between `a` and `b`, with these addresses, up.
fn link(a: &Netns, a_if: &str, a_cidr: &str, b: &Netns, b_if: &str, b_cidr: &str) {
    run(&["link", "add", a_if, "netns", &a.0, "type", "veth", "peer", "name", b_if, "netns", &b.0]);
    for (ns, i, cidr) in [(a, a_if, a_cidr), (b, b_if, b_cidr)] {
        run(&["-n", &ns.0, "addr", "add", cidr, "dev", i]);
        run(&["-n", &ns.0, "link", "set", i, "up"]);
    }
}

fn ifindex(ns: &Netns, name: &str) -> u32 {
    let out = run(&["-n", &ns.0, "-o", "link", "show", name]);
    out.split(':').next().unwrap().trim().parse().unwrap()
}

fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root for network namespaces".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("needs iproute2's `ip`".into());
    }
    None
}

fn query(id: u16) -> Vec<u8> {
    let mut q = Message::query();
    q.metadata.id = id;
    q.add_query(Query::query("worker0.kubevms.".parse().unwrap(), RecordType::A));
    q.to_vec().unwrap()
}

/// Asks over UDP and TCP from inside `ns`; the replies, None where there was none.
fn ask_both(ns: &Netns, to: SocketAddr) -> (Option<Message>, Option<Message>) {
    ns.within(move || {
        let u = UdpSocket::bind("0.0.0.0:0").unwrap();
        u.set_read_timeout(Some(Duration::from_millis(700))).unwrap();
        u.send_to(&query(1), to).unwrap();
        let mut buf = [0u8; 1500];
        let udp = u.recv(&mut buf).ok().map(|n| Message::from_vec(&buf[..n]).unwrap());

        let mut t = TcpStream::connect_timeout(&to, Duration::from_secs(2)).unwrap();
        t.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let q = query(2);
        let mut framed = (q.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&q);
        // The server may already have closed a connection it does not admit.
        let _ = t.write_all(&framed);
        let mut len = [0u8; 2];
        let tcp = match t.read_exact(&mut len) {
            Ok(()) => {
                let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
                t.read_exact(&mut buf).unwrap();
                Some(Message::from_vec(&buf).unwrap())
            }
            Err(e) => {
                // Closed by the server, not a timeout: a timeout would mean it kept the
                // connection and said nothing.
                assert!(
                    matches!(e.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset),
                    "{e}"
                );
                None
            }
        };
        (udp, tcp)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lab_and_loopback_are_served_and_the_lan_is_not() {
    if let Some(why) = skip_reason() {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI=true, and this test cannot run: {why}");
        eprintln!("skipped: {why}");
        return;
    }
    let server = Netns::new("s");
    let lab = Netns::new("l");
    let lan = Netns::new("n");
    link(&server, "lab0", "10.231.1.1/24", &lab, "vm0", "10.231.1.14/24");
    link(&server, "lan0", "10.231.2.1/24", &lan, "host0", "10.231.2.9/24");
    let lab_if = LabInterface { ifindex: ifindex(&server, "lab0"), address: "10.231.1.1/24".parse().unwrap() };

    let runtime = tokio::runtime::Handle::current();
    let (udp, tcp) = server.within(move || {
        let _enter = runtime.enter();
        kubenet_dns::server::bind("0.0.0.0:0".parse().unwrap()).unwrap()
    });
    let port = udp.local_addr().unwrap().port();
    let lab_model =
        kubenet_cluster::parse(kubenet_cluster::REFERENCE_CONFIG, kubenet_cluster::Source::Embedded, "/".as_ref())
            .unwrap();
    // Both networks and loopback on the access list: only the policy tells them apart.
    let allow = ["10.231.0.0/16", "127.0.0.0/8"].map(|n| n.parse().unwrap()).to_vec();
    // Loopback is interface 1 in a new namespace; the lab's interface is not known yet.
    let dns = Dns::with_admit(
        Zone::from_lab(&lab_model, 0),
        Forwarder::new(vec![], Duration::from_millis(100)),
        allow,
        Admit::lab(ifindex(&server, "lo"), None),
    );
    let stop = CancellationToken::new();
    tokio::spawn(dns.clone().serve_udp(udp, stop.clone()));
    tokio::spawn(dns.clone().serve_tcp(tcp, stop.clone()));
    let at = |ip: &str| SocketAddr::new(ip.parse().unwrap(), port);
    let answered = |r: &Option<Message>| {
        r.as_ref().is_some_and(|m| m.metadata.response_code == ResponseCode::NoError && m.answers.len() == 1)
    };

    // Before the lab's interface is known: loopback only.
    let (udp, tcp) = ask_both(&server, at("127.0.0.1"));
    assert!(answered(&udp) && answered(&tcp), "loopback: {udp:?} {tcp:?}");
    let (udp, tcp) = ask_both(&lab, at("10.231.1.1"));
    assert!(udp.is_none() && tcp.is_none(), "the lab before its interface is set: {udp:?} {tcp:?}");

    dns.admit().set_lab(lab_if);
    let outside_before = dns.counters.outside.load(Ordering::Relaxed);
    let (udp, tcp) = ask_both(&lab, at("10.231.1.1"));
    assert!(answered(&udp) && answered(&tcp), "the lab: {udp:?} {tcp:?}");
    // The LAN, at the server's LAN address and at its lab address (the weak host model lets
    // the kernel take both): nothing, and each query and connection counted.
    run(&["-n", &lan.0, "route", "add", "10.231.1.0/24", "via", "10.231.2.1"]);
    for to in ["10.231.2.1", "10.231.1.1"] {
        let (udp, tcp) = ask_both(&lan, at(to));
        assert!(udp.is_none() && tcp.is_none(), "the LAN to {to}: {udp:?} {tcp:?}");
    }
    assert_eq!(dns.counters.outside.load(Ordering::Relaxed) - outside_before, 4);
    // The host itself, at the lab address: over loopback, so served.
    let (udp, tcp) = ask_both(&server, at("10.231.1.1"));
    assert!(answered(&udp) && answered(&tcp), "the host at the lab address: {udp:?} {tcp:?}");
    stop.cancel();
}
