//! `kubenet serve`'s DHCP server against real clients (ISC dhclient, busybox udhcpc), each in a
//! network namespace of its own joined to the server's by a veth link. The clients' scripts only
//! record what they were given and configure the client namespace's own interface.

#[path = "support/mod.rs"]
mod support;

use std::path::Path;
use std::time::Duration;

use support::{Netns, Proc, prerequisites, serve};

const VM_MAC: &str = "52:52:52:00:00:04";

/// A server namespace holding the host address and a client namespace, joined by veth.
struct Lan {
    server: Netns,
    client: Netns,
    dir: tempfile::TempDir,
}

fn lan(client_mac: &str) -> Lan {
    let support::Pair { server, client } = support::pair("h", "192.168.1.1/24");
    client.ip(&["link", "set", "knc", "address", client_mac]);
    Lan { server, client, dir: tempfile::tempdir().unwrap() }
}

/// Writes an executable script named `name` into `dir`; returns its path.
fn script(dir: &Path, name: &str, body: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.display().to_string()
}

/// A dhclient script that records its environment per reason and configures nothing.
fn dhclient_script(dir: &Path) -> String {
    let body = format!(
        "#!/bin/sh\nenv | grep -E '^(reason|new_ip_address|new_routers|new_domain_name|new_domain_name_servers|new_host_name)=' | sort > {dir}/dhclient.$reason.tmp\nmv {dir}/dhclient.$reason.tmp {dir}/dhclient.$reason\n",
        dir = dir.display()
    );
    script(dir, "dhclient-record.sh", &body)
}

/// A udhcpc script that records each event and puts the address on the client's interface (in
/// the client's namespace), so that renewals are real unicast requests.
fn udhcpc_script(dir: &Path) -> String {
    let body = format!(
        "#!/bin/sh\ncase \"$1\" in\n  bound|renew) ip addr replace \"$ip/24\" dev \"$interface\";;\n  deconfig) ip addr flush dev \"$interface\";;\nesac\necho \"$1 ip=$ip router=$router dns=$dns domain=$domain hostname=$hostname\" >> {dir}/udhcpc.events\n",
        dir = dir.display()
    );
    script(dir, "udhcpc-record.sh", &body)
}

/// udhcpc in the foreground on `client`'s knc (worker0's MAC), recording through `script`,
/// once it is bound with worker0's address, name and the lab's options (asserted).
fn udhcpc_bound_as_worker0(client: &Netns, d: &Path, script: &str) -> Proc {
    let mut cmd = client.cmd("udhcpc");
    cmd.args(["-f", "-i", "knc", "-s", script, "-t", "10", "-T", "1", "-A", "1"]);
    let udhcpc = Proc::spawn(cmd, &d.join("udhcpc.log"));
    let events = support::wait_file(&d.join("udhcpc.events"), "bound", Duration::from_secs(30));
    assert!(
        events.contains("bound ip=192.168.1.14 router=192.168.1.1 dns=192.168.1.1 domain=kubevms hostname=worker0"),
        "{events}"
    );
    udhcpc
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn dhclient(lan: &Lan, script: &str, tag: &str) -> Proc {
    let d = lan.dir.path();
    let mut cmd = lan.client.cmd("dhclient");
    cmd.args(["-d", "-1", "-v", "-sf", script, "-lf"])
        .arg(d.join("dhclient.leases"))
        .arg("-pf")
        .arg(d.join("dhclient.pid"))
        .arg("knc");
    Proc::spawn(cmd, &d.join(format!("dhclient-{tag}.log")))
}

#[test]
fn dhclient_gets_the_vms_address_and_keeps_it_across_a_server_restart() {
    if prerequisites(&["dhclient"]).is_some() {
        return;
    }
    let lan = lan(VM_MAC);
    let d = lan.dir.path();
    let server = serve(&lan.server, d, &[]);
    let script = dhclient_script(d);

    let client = dhclient(&lan, &script, "1");
    let bound = support::wait_file(&d.join("dhclient.BOUND"), "new_ip_address", Duration::from_secs(30));
    drop(client);
    for line in [
        "new_ip_address=192.168.1.14",
        "new_routers=192.168.1.1",
        "new_domain_name_servers=192.168.1.1",
        "new_domain_name=kubevms",
        "new_host_name=worker0",
    ] {
        assert!(bound.lines().any(|l| l == line), "{line} missing from:\n{bound}");
    }
    let leases = read(&d.join("state/leases"));
    assert!(leases.contains("52:52:52:00:00:04 192.168.1.14 worker0"), "lease file: {leases}");

    // Restart: the lease file is read back, and dhclient's INIT-REBOOT gets the same address.
    let log = server.stop();
    assert!(log.contains("DHCPACK granted"), "{log}");
    let server = serve(&lan.server, d, &[]);
    assert!(server.log_text().contains("active=1"), "lease not reloaded:\n{}", server.log_text());
    let client = dhclient(&lan, &script, "2");
    let reboot = support::wait_file(&d.join("dhclient.REBOOT"), "new_ip_address", Duration::from_secs(30));
    drop(client);
    assert!(reboot.contains("new_ip_address=192.168.1.14"), "{reboot}");
    let log = server.stop();
    assert!(log.contains("DHCPACK renewed"), "{log}");
}

#[test]
fn a_request_for_a_wrong_address_is_naked_and_the_client_recovers() {
    if prerequisites(&["dhclient"]).is_some() {
        return;
    }
    let lan = lan(VM_MAC);
    let d = lan.dir.path();
    // dhclient remembers .15 for this interface, so it starts with an INIT-REBOOT for it.
    std::fs::write(
        d.join("dhclient.leases"),
        "lease {\n  interface \"knc\";\n  fixed-address 192.168.1.15;\n  option subnet-mask 255.255.255.0;\n  option dhcp-server-identifier 192.168.1.1;\n  renew 4 2099/01/01 00:00:00;\n  rebind 4 2099/01/01 00:00:00;\n  expire 4 2099/01/01 00:00:00;\n}\n",
    )
    .unwrap();
    let server = serve(&lan.server, d, &[]);
    let script = dhclient_script(d);
    let client = dhclient(&lan, &script, "nak");
    let bound = support::wait_file(&d.join("dhclient.BOUND"), "new_ip_address", Duration::from_secs(40));
    let client_log = client.log_text();
    drop(client);
    assert!(client_log.contains("DHCPNAK from 192.168.1.1"), "{client_log}");
    assert!(bound.contains("new_ip_address=192.168.1.14"), "{bound}");
    let log = server.stop();
    assert!(log.contains("DHCPNAK: address not available to this client"), "{log}");
}

#[test]
fn udhcpc_binds_then_renews_by_unicast() {
    if prerequisites(&["udhcpc"]).is_some() {
        return;
    }
    let lan = lan(VM_MAC);
    let d = lan.dir.path();
    let server = serve(&lan.server, d, &[]);
    let script = udhcpc_script(d);
    let client = udhcpc_bound_as_worker0(&lan.client, d, &script);
    // SIGUSR1: renew now. udhcpc sends a unicast REQUEST from 192.168.1.14 (RENEWING).
    client.signal("USR1");
    let events = support::wait_file(&d.join("udhcpc.events"), "renew", Duration::from_secs(20));
    assert!(events.contains("renew ip=192.168.1.14"), "{events}");
    drop(client);
    let log = server.stop();
    assert!(log.contains("DHCPACK renewed"), "{log}");
    assert!(log.contains("state=Selecting"), "first lease was not a SELECTING request:\n{log}");
}

#[test]
fn an_unknown_mac_gets_a_pool_address_that_is_never_a_vms() {
    if prerequisites(&["udhcpc"]).is_some() {
        return;
    }
    let lan = lan("02:aa:bb:cc:dd:01");
    let d = lan.dir.path();
    let server = serve(&lan.server, d, &[]);
    let script = udhcpc_script(d);
    let mut ips = Vec::new();
    // Three strangers in turn, each with its own MAC.
    for mac in ["02:aa:bb:cc:dd:01", "02:aa:bb:cc:dd:02", "02:aa:bb:cc:dd:03"] {
        lan.client.ip(&["link", "set", "knc", "address", mac]);
        let out = support::run(
            lan.client.cmd("udhcpc").args(["-q", "-n", "-f", "-i", "knc", "-s", &script, "-t", "5", "-T", "1"]),
        );
        let _ = out;
        let events = read(&d.join("udhcpc.events"));
        let last = events.lines().rfind(|l| l.starts_with("bound")).expect("no lease").to_string();
        let ip: std::net::Ipv4Addr = last.split_whitespace().nth(1).unwrap().trim_start_matches("ip=").parse().unwrap();
        assert!(!last.contains("hostname=worker"), "a stranger got a VM's name: {last}");
        ips.push(ip);
    }
    for ip in &ips {
        let o = ip.octets()[3];
        assert!((2..=20).contains(&o) && !(10..=16).contains(&o), "pool address {ip} is outside .2-.20 or a VM's");
    }
    ips.dedup();
    assert_eq!(ips.len(), 3, "strangers shared an address: {ips:?}");
    drop(server);
}

/// Hostile datagrams for the DHCP port, built by python3 in the client namespace: a fixed set
/// of each kind, then random bytes from a fixed seed.
const BURST: &str = r#"
import random, socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
def header(op=1, htype=1, hlen=6, cookie=b"\x63\x82\x53\x63"):
    return struct.pack("!BBBBIHH4s4s4s4s16s64s128s", op, htype, hlen, 0, 0x1234, 0, 0,
        bytes(4), bytes(4), bytes(4), bytes(4), bytes.fromhex("525252000004") + bytes(10),
        bytes(64), bytes(128)) + cookie
discover = b"\x35\x01\x01\xff"
sent = 0
def send(p):
    global sent
    s.sendto(p, ("192.168.1.1", 67)); sent += 1
for _ in range(20):
    send(header()[:100])                                   # truncated
    send(header() + discover + bytes(1800))                # oversized
    send(header(hlen=255) + discover)                      # dhcproto would panic
    send(header(cookie=b"\x00\x00\x00\x00") + discover)    # bad cookie
    send(header(op=2) + discover)                          # a reply, not a request
    send(header() + b"\x35\xc8\x01")                       # option length past the end
    send(header() + b"\xff")                               # no message type
rng = random.Random(7)
for _ in range(200):
    send(bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 700))))
print(sent)
"#;

#[test]
fn a_burst_of_malformed_packets_is_dropped_and_a_real_client_is_still_served() {
    if prerequisites(&["udhcpc", "python3"]).is_some() {
        return;
    }
    let lan = lan(VM_MAC);
    let d = lan.dir.path();
    let mut server = serve(&lan.server, d, &[]);
    lan.client.ip(&["addr", "add", "192.168.1.99/24", "dev", "knc"]);
    let out = support::run(lan.client.cmd("python3").args(["-c", BURST]));
    let sent: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert_eq!(sent, 340);
    lan.client.ip(&["addr", "flush", "dev", "knc"]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(server.alive(), "server died:\n{}", server.log_text());

    let script = udhcpc_script(d);
    support::run(lan.client.cmd("udhcpc").args(["-q", "-n", "-f", "-i", "knc", "-s", &script, "-t", "5", "-T", "1"]));
    assert!(read(&d.join("udhcpc.events")).contains("bound ip=192.168.1.14"));

    // The kernel may drop part of a burst when the socket buffer is full; it counts those in
    // the server namespace's own UDP statistics.
    let snmp = String::from_utf8_lossy(&support::run(lan.server.cmd("cat").arg("/proc/net/snmp")).stdout).into_owned();
    let kernel_dropped = udp_rcvbuf_errors(&snmp);
    let log = server.stop();
    let malformed: u64 = log
        .lines()
        .find(|l| l.contains("DHCP stopped"))
        .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("malformed=")))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no malformed count in:\n{log}"));
    // All 140 crafted packets, and nearly all of the 200 random ones (a random one passes the
    // header checks with odds of about 1 in 2^40).
    assert!(
        malformed + kernel_dropped >= 140 + 190,
        "only {malformed} of {sent} counted as malformed ({kernel_dropped} dropped by the kernel):\n{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}

/// `Udp: ... RcvbufErrors ...` from /proc/net/snmp: a header line, then a value line.
fn udp_rcvbuf_errors(snmp: &str) -> u64 {
    let udp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Udp:")).collect();
    let (names, values) = (udp[0].split_whitespace(), udp[1].split_whitespace());
    names.zip(values).find(|(n, _)| *n == "RcvbufErrors").and_then(|(_, v)| v.parse().ok()).expect("RcvbufErrors")
}

#[test]
fn a_dhcp_clients_name_resolves_while_its_lease_lives() {
    if prerequisites(&["udhcpc", "dig"]).is_some() {
        return;
    }
    let lan = lan("02:aa:bb:cc:dd:77");
    let d = lan.dir.path();
    let server = serve(&lan.server, d, &[]);
    let script = udhcpc_script(d);
    // udhcpc sends option 12; its script puts the address on the client's interface.
    support::run(lan.client.cmd("udhcpc").args([
        "-q",
        "-n",
        "-f",
        "-i",
        "knc",
        "-s",
        &script,
        "-t",
        "5",
        "-T",
        "1",
        "-x",
        "hostname:laptop",
    ]));
    let events = read(&d.join("udhcpc.events"));
    let bound = events.lines().rfind(|l| l.starts_with("bound")).expect("no lease");
    let ip = bound.split_whitespace().nth(1).unwrap().trim_start_matches("ip=").to_string();
    let dig = |args: &[&str]| {
        let out =
            support::run(lan.client.cmd("dig").args(["@192.168.1.1", "+short", "+tries=1", "+time=3"]).args(args));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(dig(&["laptop.kubevms"]), ip);
    assert_eq!(dig(&["-x", &ip]), "laptop.kubevms.");
    // The VMs' own names are unaffected, and reachable from the same client.
    assert_eq!(dig(&["worker0.kubevms"]), "192.168.1.14");
    drop(server);
}

#[test]
fn sighup_reloads_the_lab_without_losing_a_lease() {
    if prerequisites(&["udhcpc", "dig"]).is_some() {
        return;
    }
    let lan = lan(VM_MAC);
    let d = lan.dir.path();
    let mut server = serve(&lan.server, d, &[]);
    let script = udhcpc_script(d);
    let client = udhcpc_bound_as_worker0(&lan.client, d, &script);
    let dig = |name: &str| {
        let out = support::run(lan.client.cmd("dig").args(["@192.168.1.1", "+short", "+tries=1", "+time=3", name]));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(dig("registry.kubevms"), "");

    // The control socket reports the live lease.
    let ask = |cmd: &str| -> serde_json::Value {
        use std::io::{BufRead, Write};
        let mut c = std::os::unix::net::UnixStream::connect(d.join("state/kubenet.sock")).unwrap();
        writeln!(c, "{{\"v\":2,\"cmd\":\"{cmd}\"}}").unwrap();
        let mut line = String::new();
        std::io::BufReader::new(c).read_line(&mut line).unwrap();
        let answer: serde_json::Value = serde_json::from_str(&line).unwrap();
        answer["ok"].clone()
    };
    let leases = ask("leases");
    assert_eq!(leases["leases"].as_array().map(Vec::len), Some(1), "{leases}");
    assert_eq!(leases["leases"][0]["mac"], "52:52:52:00:00:04");
    assert_eq!(leases["leases"][0]["ip"], "192.168.1.14");
    assert_eq!(leases["leases"][0]["hostname"], "worker0");
    assert_eq!(ask("status")["status"]["leases"], 1);

    // An extra host entry, then SIGHUP.
    let config = d.join("kubenet.toml");
    let text = read(&config);
    std::fs::write(&config, text.replace("[network.hosts]\n", "[network.hosts]\nregistry = \"192.168.1.5\"\n"))
        .unwrap();
    server.signal("HUP");
    server.wait_for("reloaded", Duration::from_secs(10));
    assert_eq!(dig("registry.kubevms"), "192.168.1.5");
    assert_eq!(dig("worker0.kubevms"), "192.168.1.14");
    assert!(read(&d.join("state/leases")).contains("52:52:52:00:00:04 192.168.1.14"));
    // The lease lives on: a renewal is granted by the reloaded server.
    client.signal("USR1");
    support::wait_file(&d.join("udhcpc.events"), "renew ip=192.168.1.14", Duration::from_secs(20));

    // A broken edit is reported and the running lab keeps serving.
    std::fs::write(&config, "colour = \"blue\"\n").unwrap();
    server.signal("HUP");
    server.wait_for("reload failed", Duration::from_secs(10));
    assert!(server.log_text().contains("kubenet.toml:1:1: colour: unknown field"), "{}", server.log_text());
    assert_eq!(dig("registry.kubevms"), "192.168.1.5");
    drop(client);
    let log = server.stop();
    assert!(log.contains("DHCPACK renewed"), "{log}");
    assert!(log.contains("1 leases kept"), "{log}");
}

/// macOS's vmnet-shared makes its bridge (bridge100) with the lab's host address only when the
/// first VM starts, after `serve` is up. Imitated here: `serve --no-bridge` starts while no
/// interface of its namespace has an address in the lab's subnet; then a bridge named bridge100
/// appears with the host address and the client's veth on it. A real DHCP client and `dig` on
/// it are served by the same `serve` process, with no restart or reload.
#[test]
fn an_interface_that_appears_after_serve_starts_is_served_as_bridge100_is_on_macos() {
    if prerequisites(&["udhcpc", "dig"]).is_some() {
        return;
    }
    let server_ns = Netns::new("b1s");
    let client_ns = Netns::new("b1c");
    support::veth(&server_ns, "kns", &client_ns, "knc");
    client_ns.ip(&["link", "set", "knc", "address", VM_MAC]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let addrs = String::from_utf8_lossy(&server_ns.ip(&["-4", "-o", "addr", "show"]).stdout).into_owned();
    assert!(!addrs.contains("192.168.1."), "the lab's subnet is already there: {addrs}");
    let mut server = serve(&server_ns, d, &[]);
    let pid = server.child.id();

    // Before the bridge exists a DISCOVER goes unanswered: nothing of the lab's subnet is there.
    let script = udhcpc_script(d);
    let early = client_ns
        .cmd("udhcpc")
        .args(["-q", "-n", "-f", "-i", "knc", "-s", &script, "-t", "2", "-T", "1"])
        .output()
        .unwrap();
    assert!(!early.status.success(), "a lease without the lab's interface: {}", String::from_utf8_lossy(&early.stdout));
    assert!(!read(&d.join("udhcpc.events")).contains("bound"));

    // The first VM starts: vmnet makes bridge100 with the host address, the VM's port on it.
    server_ns.ip(&["link", "add", "bridge100", "type", "bridge"]);
    server_ns.ip(&["link", "set", "kns", "master", "bridge100"]);
    server_ns.ip(&["addr", "add", "192.168.1.1/24", "dev", "bridge100"]);
    server_ns.ip(&["link", "set", "bridge100", "up"]);
    let client = udhcpc_bound_as_worker0(&client_ns, d, &script);
    let dig = |name: &str| {
        let out = support::run(client_ns.cmd("dig").args(["@192.168.1.1", "+short", "+tries=1", "+time=3", name]));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(dig("worker0.kubevms"), "192.168.1.14");
    assert_eq!(dig("vmhost.kubevms"), "192.168.1.1");
    drop(client);
    assert!(server.alive() && server.child.id() == pid, "served by the process started before the bridge");
    let log = server.stop();
    // The early DISCOVERs were turned away for their interface, the later one granted.
    assert!(log.contains("outside 192.168.1.0/24: not ours") && log.contains("DHCPACK granted"), "{log}");
}

/// One DHCPREQUEST as a relay agent forwards it (RFC 2131 4.1: giaddr set, hops 1, sent from
/// port 67), for `mac` with option 12 `name`, built and sent by python3 from `src` to the
/// server's `dst` on its own network.
const RELAYED_REQUEST: &str = r#"
import socket, struct, sys
src, dst, mac, name = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3].replace(":", "")), sys.argv[4].encode()
giaddr = socket.inet_aton("192.168.1.50")
header = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 1, 0x5151, 0, 0, bytes(4), bytes(4),
    bytes(4), giaddr, mac + bytes(10), bytes(64), bytes(128)) + b"\x63\x82\x53\x63"
opts = (b"\x35\x01\x03" + b"\x36\x04" + socket.inet_aton("192.168.1.1") + b"\x32\x04"
    + socket.inet_aton("192.168.1.5") + bytes([12, len(name)]) + name + b"\xff")
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((src, 67))
s.sendto(header + opts, (dst, 67))
"#;

/// Issue 26 item 6: a host on another network of the server's (a second veth, not the lab's
/// interface) sets giaddr inside the lab's subnet. Unless `network.dhcp_relays` lists its
/// address it gets no ACK, no lease and no name in the lab's zone; a listed relay is served.
#[test]
fn a_relayed_request_from_outside_the_lab_is_served_only_from_a_listed_relay() {
    if prerequisites(&["python3", "dig"]).is_some() {
        return;
    }
    let lan = lan(VM_MAC);
    let d = lan.dir.path();
    // The second network: 10.99.0.1 on the server, a listed relay .2 and a stranger .3 beyond.
    let outside = Netns::new("ho");
    support::veth(&lan.server, "kno", &outside, "kso");
    lan.server.ip(&["addr", "add", "10.99.0.1/24", "dev", "kno"]);
    outside.ip(&["addr", "add", "10.99.0.2/24", "dev", "kso"]);
    outside.ip(&["addr", "add", "10.99.0.3/24", "dev", "kso"]);
    let lab = support::test_lab();
    assert!(lab.contains("dhcp_relays = []"));
    std::fs::write(d.join("kubenet.toml"), lab.replace("dhcp_relays = []", "dhcp_relays = [\"10.99.0.2\"]")).unwrap();
    let server = serve(&lan.server, d, &[]);
    let send = |src: &str, mac: &str, name: &str| {
        support::run(outside.cmd("python3").args(["-c", RELAYED_REQUEST, src, "10.99.0.1", mac, name]));
    };

    // The stranger first, then the listed relay: once the relay's lease is on file, the
    // stranger's request (sent before it) has been handled.
    send("10.99.0.3", "02:aa:bb:cc:dd:66", "intruder");
    send("10.99.0.2", "02:aa:bb:cc:dd:77", "relayed");
    let leases = support::wait_file(&d.join("state/leases"), "relayed", Duration::from_secs(10));
    assert!(leases.contains("02:aa:bb:cc:dd:77 192.168.1.5 relayed"), "{leases}");
    assert!(!leases.contains("02:aa:bb:cc:dd:66") && !leases.contains("intruder"), "{leases}");

    lan.client.ip(&["addr", "add", "192.168.1.99/24", "dev", "knc"]);
    let dig = |name: &str| {
        let out = support::run(lan.client.cmd("dig").args(["@192.168.1.1", "+short", "+tries=1", "+time=3", name]));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(dig("relayed.kubevms"), "192.168.1.5");
    assert_eq!(dig("intruder.kubevms"), "");

    let log = server.stop();
    assert_eq!(log.matches("DHCPACK granted").count(), 1, "{log}");
    assert!(log.contains("a relayed request from a host that network.dhcp_relays does not list"), "{log}");
    assert!(log.contains("foreign=1"), "{log}");
}

/// A network the host joins later that happens to use the lab's subnet (a Wi-Fi on
/// 192.168.1.0/24, the default lab's): it is not the lab. Only the interface holding the lab's
/// host address is served; a client on the other one gets no offer, and no lease is written.
#[test]
fn an_interface_with_an_address_in_the_lab_subnet_is_not_the_lab() {
    if prerequisites(&["udhcpc"]).is_some() {
        return;
    }
    let lan = lan(VM_MAC);
    let d = lan.dir.path();
    let server = serve(&lan.server, d, &[]);
    // After serve is ready: the host's "Wi-Fi", 192.168.1.77 on the lab's network.
    let wifi = Netns::new("hw");
    support::veth(&lan.server, "knw", &wifi, "ksw");
    lan.server.ip(&["addr", "add", "192.168.1.77/24", "dev", "knw"]);
    let (got, said) = support::udhcpc_once(&wifi, "ksw");
    assert!(!got && !said.contains("obtained"), "{said}");
    // The lab's own client is served as ever.
    let (_, said) = support::udhcpc_once(&lan.client, "knc");
    assert!(said.contains("lease of 192.168.1.14 obtained"), "{said}");
    let log = server.stop();
    assert!(log.contains("foreign=") && !log.contains("foreign=0"), "{log}");
    assert_eq!(log.matches("DHCPACK granted").count(), 1, "{log}");
}
