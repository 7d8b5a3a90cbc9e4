//! `kubenet serve` with its Linux host network, inside a namespace the test creates: the bridge
//! with the host address and a tap per VM appear, real DHCP clients on veth ports of that bridge
//! get their fixed addresses, `dig` from their namespace resolves the lab, SIGHUP adds a host
//! entry without losing a lease, a VM added by a reload gets its tap when it starts, and SIGTERM
//! takes the bridge and every tap away again. With NAT on, a VM's traffic leaves the lab's
//! namespace masqueraded, and SIGTERM takes the rule away and puts IP forwarding back.

#[path = "support/mod.rs"]
mod support;

use std::time::Duration;

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
