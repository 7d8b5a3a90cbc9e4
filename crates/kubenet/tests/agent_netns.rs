//! `kubenet serve` with its Linux host network, inside a namespace the test creates: the bridge
//! with the host address and a tap per VM appear, real DHCP clients on veth ports of that bridge
//! get their fixed addresses, `dig` from their namespace resolves the lab, SIGHUP adds a host
//! entry without losing a lease, a VM added by a reload gets its tap when it starts, and SIGTERM
//! takes the bridge and every tap away again. With NAT on, a VM's traffic leaves the lab's
//! namespace masqueraded, and SIGTERM takes the rule away and puts IP forwarding back.
//!
//! What serve refuses, each in a namespace of its own: a `bridge` naming an interface it did
//! not make (a veth, a bridge without its mark, a tap of a VM's name that is not its own) and
//! a subnet that overlaps a network on one of the namespace's interfaces. Each refusal names
//! the interface and leaves it as it was. And the forward chain: with ip_forward turned on by
//! serve, the host forwards for the lab alone.

#[path = "support/mod.rs"]
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::{Netns, prerequisites, serve_bridged, veth};

fn links(ns: &Netns) -> String {
    String::from_utf8_lossy(&ns.ip(&["-o", "link", "show"]).stdout).into_owned()
}

/// A client namespace with MAC `mac`, its veth's other end a port of the lab bridge.
fn client(server: &Netns, n: u32, mac: &str) -> Netns {
    let c = Netns::new("bc");
    let port = format!("kp{n}");
    veth(server, &port, &c, "knc");
    server.ip(&["link", "set", &port, "master", "kubenet0"]);
    c.ip(&["link", "set", "knc", "address", mac]);
    c
}

#[test]
fn serve_builds_the_bridge_serves_its_ports_and_removes_it_on_sigterm() {
    if prerequisites(&["udhcpc", "dig", "qemu-system-x86_64", "qemu-img"]).is_some() {
        return;
    }
    let server = Netns::new("br");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // NAT off: this namespace has nowhere to route to, and the test must not touch the host's
    // nftables.
    // TCG: the VM started below has no OS to boot, and this machine's KVM cannot run guests.
    let lab = support::test_lab()
        .replace("nat = true", "nat = false")
        .replace("accelerator = \"auto\"", "accelerator = \"tcg\"");
    assert!(lab.contains("nat = false") && lab.contains("\"tcg\""));
    std::fs::write(d.join("kubenet.toml"), &lab).unwrap();
    let mut agent = serve_bridged(&server, d);

    let l = links(&server);
    assert!(l.contains(": kubenet0:"), "no bridge:\n{l}");
    // Each link serve made carries its mark (the link's alias), which is how a later serve
    // knows it may adopt and remove them.
    let mark = format!("alias kubenet:{}", d.join("state").display());
    for name in ["kubenet0", "kubenet0-0", "kubenet0-6"] {
        let shown = String::from_utf8_lossy(&server.ip(&["link", "show", name]).stdout).into_owned();
        assert!(shown.contains(&mark), "{name} is not marked:\n{shown}");
    }
    for id in 0..7 {
        assert!(l.contains(&format!(": kubenet0-{id}:")) && l.contains("master kubenet0"), "tap {id}:\n{l}");
    }
    let addr = String::from_utf8_lossy(&server.ip(&["-o", "addr", "show", "dev", "kubenet0"]).stdout).into_owned();
    assert!(addr.contains("inet 192.168.1.1/24"), "{addr}");

    // Two VMs' MACs on two bridge ports: each gets its own fixed address.
    let mut got = Vec::new();
    for (n, (mac, want)) in
        [("52:52:52:00:00:04", "192.168.1.14"), ("52:52:52:00:00:01", "192.168.1.11")].iter().enumerate()
    {
        let c = client(&server, n as u32, mac);
        let out = c
            .cmd("udhcpc")
            .args(["-i", "knc", "-n", "-q", "-f", "-t", "5", "-T", "2", "-s", "/bin/true"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&format!("lease of {want} obtained")), "{mac}: {text}");
        got.push(c);
    }
    // dig from a client namespace, to the host address on the bridge.
    let c = &got[0];
    c.ip(&["addr", "add", "192.168.1.14/24", "dev", "knc"]);
    let dig = |name: &str| {
        let out = c.cmd("dig").args(["+short", "+time=2", "+tries=1", "@192.168.1.1", name]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(dig("worker0.kubevms"), "192.168.1.14");
    assert_eq!(dig("registry.kubevms"), "", "not yet a host entry");

    // SIGHUP with an extra host entry: resolvable, and both leases still there.
    std::fs::write(
        d.join("kubenet.toml"),
        lab.replace("[network.hosts]\n", "[network.hosts]\nregistry = \"192.168.1.5\"\n"),
    )
    .unwrap();
    agent.signal("HUP");
    agent.wait_for("reloaded", Duration::from_secs(10));
    assert_eq!(dig("registry.kubevms"), "192.168.1.5");
    let leases = std::fs::read_to_string(d.join("state/leases")).unwrap();
    assert!(leases.contains("192.168.1.14") && leases.contains("192.168.1.11"), "{leases}");

    // A VM the lab gains by a reload has no tap yet; starting it makes one on the bridge.
    let image =
        d.join(format!("state/images/ubuntu-24.04-server-cloudimg-{}.img", kubenet_cluster::Arch::HOST.cloud_name()));
    std::fs::create_dir_all(image.parent().unwrap()).unwrap();
    support::run(std::process::Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&image).arg("64M"));
    let extra = "\n[[group]]\nname = \"extra\"\nmemory = \"256M\"\n";
    let lab = lab.replace("[network.hosts]\n", "[network.hosts]\nregistry = \"192.168.1.5\"\n") + extra;
    std::fs::write(d.join("kubenet.toml"), &lab).unwrap();
    let cli = |args: &[&str]| {
        let mut c = server.cmd(support::kubenet_bin());
        c.current_dir(d).args(["--dir", "state"]).args(args).env("HOME", d).env_remove("KUBENET_CONFIG");
        let o = c.output().unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
    };
    assert!(cli(&["reload"]).contains("reloaded"));
    assert!(!links(&server).contains(": kubenet0-7:"));
    let out = cli(&["up", "extra", "--timeout", "1"]);
    assert!(out.contains("extra      started (pid "), "{out}");
    let l = links(&server);
    let tap = l.lines().find(|l| l.contains(": kubenet0-7:")).unwrap_or_else(|| panic!("no tap for extra:\n{l}"));
    assert!(tap.contains("master kubenet0"), "{tap}");
    assert!(agent.log_text().contains("tap created for a VM added since serve started"));

    // serve stops while that VM runs: its tap and the bridge stay (counted against the lab as
    // reloaded, not as it was at the start), and a new serve takes them over.
    let log = agent.stop();
    assert!(log.contains("kept kubenet0 and its taps: 1 VMs still run on them"), "{log}");
    let l = links(&server);
    assert!(l.contains(": kubenet0:") && l.contains(": kubenet0-7:"), "extra lost its network:\n{l}");
    let agent = serve_bridged(&server, d);
    assert!(cli(&["down", "extra", "--grace", "1"]).contains("extra"));

    let log = agent.stop();
    assert!(log.contains("host network removed"), "{log}");
    let l = links(&server);
    assert!(!l.contains("kubenet0"), "bridge or taps left behind:\n{l}");
}

/// Sends "who" to 203.0.113.2:7777 (up to three tries, 2 s each) and prints the answer.
const SEND: &str = r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
for _ in range(3):
    s.sendto(b"who", ("203.0.113.2", 7777))
    try:
        print(s.recvfrom(100)[0].decode())
        break
    except socket.timeout:
        pass
"#;

/// Answers each datagram (at most 20) with its sender's address; an unroutable sender is no
/// answer.
const ECHO: &str = r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("203.0.113.2", 7777))
print("listening", flush=True)
for _ in range(20):
    data, peer = s.recvfrom(100)
    try:
        s.sendto(peer[0].encode(), peer)
    except OSError:
        pass
"#;

fn forwarding(ns: &Netns) -> String {
    let out = ns.cmd("cat").arg("/proc/sys/net/ipv4/ip_forward").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// What a UDP echo server in `wan` sees as the sender of one datagram sent from `from` to
/// 203.0.113.2:7777, or "" when no answer comes back.
fn sender_seen_from(from: &Netns) -> String {
    let out = from.cmd("python3").args(["-c", SEND]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// NAT on, entirely inside namespaces this test makes: `lab` runs serve (the bridge and the
/// rule), `vm` stands for a VM on a bridge port (192.168.1.14, default route via the host),
/// and `wan` for the outside world, reached from `lab` over a veth (203.0.113.0/24, a
/// documentation range) with no route back to the lab's network, so an answer reaches the VM
/// only if the host masqueraded it.
#[test]
fn nat_masquerades_the_vms_and_goes_away_with_serve() {
    if prerequisites(&["nft", "python3"]).is_some() {
        return;
    }
    let lab_ns = Netns::new("nat");
    let wan = Netns::new("wan");
    veth(&lab_ns, "kw", &wan, "knw");
    lab_ns.ip(&["addr", "add", "203.0.113.1/24", "dev", "kw"]);
    wan.ip(&["addr", "add", "203.0.113.2/24", "dev", "knw"]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut cmd = wan.cmd("python3");
    cmd.args(["-u", "-c", ECHO]);
    let mut echo = support::Proc::spawn(cmd, &d.join("echo.log"));
    echo.wait_for("listening", Duration::from_secs(10));
    // The namespace's own forwarding switch, off to start with: serve turns it on and back.
    assert!(lab_ns.cmd("sysctl").args(["-qw", "net.ipv4.ip_forward=0"]).status().unwrap().success());

    let lab = support::test_lab().replace("accelerator = \"auto\"", "accelerator = \"tcg\"");
    assert!(lab.contains("nat = true"));
    std::fs::write(d.join("kubenet.toml"), &lab).unwrap();
    let agent = serve_bridged(&lab_ns, d);
    let vm = Netns::new("natvm");
    veth(&lab_ns, "kp9", &vm, "knc");
    lab_ns.ip(&["link", "set", "kp9", "master", "kubenet0"]);
    vm.ip(&["addr", "add", "192.168.1.14/24", "dev", "knc"]);
    vm.ip(&["route", "add", "default", "via", "192.168.1.1"]);

    assert_eq!(forwarding(&lab_ns), "1");
    let rules = lab_ns.cmd("nft").args(["list", "table", "ip", "kubenet_kubenet0"]).output().unwrap();
    let rules = String::from_utf8_lossy(&rules.stdout).into_owned();
    assert!(rules.contains("ip saddr 192.168.1.0/24 ip daddr != 192.168.1.0/24 masquerade"), "{rules}");
    // serve turned forwarding on itself, so its forward chain routes for the lab alone.
    for rule in [
        "policy drop;",
        "iifname \"kubenet0\" ip saddr 192.168.1.0/24 accept",
        "oifname \"kubenet0\" ip daddr 192.168.1.0/24 ct state established,related accept",
    ] {
        assert!(rules.contains(rule), "no {rule:?}:\n{rules}");
    }
    assert_eq!(sender_seen_from(&vm), "203.0.113.1", "the VM's address is masqueraded as the host's");

    let log = agent.stop();
    assert!(log.contains("host network removed"), "{log}");
    let tables = lab_ns.cmd("nft").args(["list", "tables"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&tables.stdout).contains("kubenet"), "the rule is gone");
    assert_eq!(forwarding(&lab_ns), "0", "forwarding put back");
    // The bridge is gone with serve, so the VM has no way out at all now: put a bridge back by
    // hand without the rule, and the answer no longer finds its way.
    lab_ns.ip(&["link", "add", "kubenet0", "type", "bridge"]);
    lab_ns.ip(&["addr", "add", "192.168.1.1/24", "dev", "kubenet0"]);
    lab_ns.ip(&["link", "set", "kubenet0", "up"]);
    lab_ns.ip(&["link", "set", "kp9", "master", "kubenet0"]);
    assert!(lab_ns.cmd("sysctl").args(["-qw", "net.ipv4.ip_forward=1"]).status().unwrap().success());
    vm.ip(&["route", "replace", "default", "via", "192.168.1.1"]);
    assert_eq!(sender_seen_from(&vm), "", "without the rule the outside cannot answer");
    drop(echo);
}

/// Runs serve (with its bridge) in `ns` on the lab in `d`, expecting it to refuse: it exits
/// with a failure within 15 s. Returns its log.
fn refusal(ns: &Netns, d: &Path) -> String {
    let mut cmd = ns.cmd(support::kubenet_bin());
    cmd.current_dir(d)
        .args(["serve", "--dir"])
        .arg(d.join("state"))
        .env_remove("KUBENET_CONFIG")
        .env_remove("SUDO_UID")
        .env_remove("SUDO_GID");
    let mut agent = support::Proc::spawn(cmd, &d.join("refused.log"));
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(15) {
        if let Ok(Some(status)) = agent.child.try_wait() {
            assert!(!status.success(), "serve did not refuse:\n{}", agent.log_text());
            return agent.log_text();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("serve still runs after 15 s instead of refusing:\n{}", agent.log_text());
}

fn show(ns: &Netns, dev: &str) -> String {
    String::from_utf8_lossy(&ns.ip(&["-o", "addr", "show", "dev", dev]).stdout).into_owned()
}

/// `bridge` names a veth the host already has (a typo of the uplink's name): serve refuses,
/// naming it, and the veth is still there with its address, neither adopted nor deleted.
#[test]
fn a_bridge_name_that_is_someone_elses_interface_is_refused_and_left_alone() {
    let ns = Netns::new("own");
    let peer = Netns::new("ownp");
    veth(&ns, "lan0", &peer, "up0");
    ns.ip(&["addr", "add", "10.77.0.1/24", "dev", "lan0"]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let lab =
        support::test_lab().replace("bridge = \"kubenet0\"", "bridge = \"lan0\"").replace("nat = true", "nat = false");
    assert!(lab.contains("bridge = \"lan0\""));
    std::fs::write(d.join("kubenet.toml"), &lab).unwrap();

    let log = refusal(&ns, d);
    assert!(log.contains("lan0 exists and is not a bridge kubenet made: pick another network.bridge"), "{log}");
    let l = links(&ns);
    assert!(l.contains(": lan0@"), "lan0 is gone:\n{l}");
    assert!(!l.contains("lan0-"), "a tap was made for it:\n{l}");
    let addr = show(&ns, "lan0");
    assert!(addr.contains("inet 10.77.0.1/24") && !addr.contains("192.168.1.1"), "{addr}");

    // A bridge of that name without kubenet's mark (docker's, libvirt's, one made by hand):
    // refused the same way, and kept.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("kubenet.toml"), lab.replace("bridge = \"lan0\"", "bridge = \"br9\"")).unwrap();
    ns.ip(&["link", "add", "br9", "type", "bridge"]);
    let log = refusal(&ns, d);
    assert!(log.contains("br9 exists and is not a bridge kubenet made"), "{log}");
    assert!(links(&ns).contains(": br9:"), "br9 is gone");
    assert!(!show(&ns, "br9").contains("192.168.1.1"), "br9 got the lab's address");

    // A tap with a VM's tap name that kubenet did not make (`ip tuntap`): refused, kept, and
    // nothing of the lab left behind.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("kubenet.toml"), support::test_lab().replace("nat = true", "nat = false")).unwrap();
    ns.ip(&["tuntap", "add", "kubenet0-3", "mode", "tap"]);
    let log = refusal(&ns, d);
    assert!(log.contains("kubenet0-3 exists and is not a tap kubenet made for this lab"), "{log}");
    let l = links(&ns);
    assert!(l.contains(": kubenet0-3:") && !l.contains(": kubenet0:"), "{l}");
}

/// The lab's 192.168.1.0/24 is on a veth already (the host's LAN): refused, naming the veth,
/// and no bridge made.
#[test]
fn a_subnet_that_overlaps_a_network_of_the_host_is_refused_naming_the_interface() {
    let ns = Netns::new("ovl");
    let peer = Netns::new("ovlp");
    veth(&ns, "wlan0", &peer, "up0");
    ns.ip(&["addr", "add", "192.168.1.77/24", "dev", "wlan0"]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("kubenet.toml"), support::test_lab().replace("nat = true", "nat = false")).unwrap();

    let log = refusal(&ns, d);
    assert!(log.contains("the lab's 192.168.1.0/24 overlaps wlan0's 192.168.1.0/24: pick another subnet"), "{log}");
    let l = links(&ns);
    assert!(!l.contains("kubenet0"), "a bridge or tap was made:\n{l}");
    assert!(show(&ns, "wlan0").contains("inet 192.168.1.77/24"), "wlan0 lost its address");
}

/// ip_forward is host-wide. When serve turns it on itself, its forward chain routes for the
/// lab alone: `other`, a network of the host's that is not the lab (198.51.100.0/24 on a
/// veth), still cannot reach `wan` through the host. When forwarding was on already, serve
/// leaves that traffic to whoever turned it on, and it flows as before.
#[test]
fn forwarding_serve_turned_on_routes_for_the_lab_alone() {
    if prerequisites(&["nft", "python3"]).is_some() {
        return;
    }
    let lab_ns = Netns::new("fwd");
    let wan = Netns::new("fwdw");
    let other = Netns::new("fwdo");
    veth(&lab_ns, "kw", &wan, "knw");
    lab_ns.ip(&["addr", "add", "203.0.113.1/24", "dev", "kw"]);
    wan.ip(&["addr", "add", "203.0.113.2/24", "dev", "knw"]);
    wan.ip(&["route", "add", "198.51.100.0/24", "via", "203.0.113.1"]);
    veth(&lab_ns, "ko", &other, "kno");
    lab_ns.ip(&["addr", "add", "198.51.100.1/24", "dev", "ko"]);
    other.ip(&["addr", "add", "198.51.100.2/24", "dev", "kno"]);
    other.ip(&["route", "add", "default", "via", "198.51.100.1"]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut cmd = wan.cmd("python3");
    cmd.args(["-u", "-c", ECHO]);
    let mut echo = support::Proc::spawn(cmd, &d.join("echo.log"));
    echo.wait_for("listening", Duration::from_secs(10));
    let lab = support::test_lab().replace("accelerator = \"auto\"", "accelerator = \"tcg\"");
    assert!(lab.contains("nat = true"));
    std::fs::write(d.join("kubenet.toml"), &lab).unwrap();
    let sysctl = |v: &str| {
        assert!(lab_ns.cmd("sysctl").args(["-qw", &format!("net.ipv4.ip_forward={v}")]).status().unwrap().success())
    };

    sysctl("0");
    let agent = serve_bridged(&lab_ns, d);
    assert_eq!(forwarding(&lab_ns), "1");
    assert_eq!(sender_seen_from(&other), "", "serve made the host a router for a network not the lab's");
    agent.stop();
    assert_eq!(forwarding(&lab_ns), "0");

    sysctl("1");
    let agent = serve_bridged(&lab_ns, d);
    assert_eq!(sender_seen_from(&other), "198.51.100.2", "forwarding someone else turned on was cut");
    agent.stop();
    assert_eq!(forwarding(&lab_ns), "1", "left as it was");
    drop(echo);
}
