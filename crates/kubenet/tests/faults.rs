//! Faults: the server killed mid-stream, a state directory it cannot write, an upstream that
//! answers garbage. Each in namespaces or on loopback the test creates.

#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::prerequisites;

/// A relay-mode DHCP client: DORA for fresh MACs from 192.168.1.254:67, one line per ACK
/// ("MAC IP"), until its count is done or the server stops answering. With "renew FILE" it sends
/// one INIT-REBOOT REQUEST per "MAC IP" line of FILE and prints "MAC IP ACK|NAK|none".
const RELAY_CLIENT: &str = r#"
import socket, struct, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("192.168.1.254", 67))
s.settimeout(0.5)
SERVER = ("192.168.1.1", 67)
def packet(mac, xid, kind, opts=b""):
    h = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 1, xid, 0, 0, bytes(4), bytes(4), bytes(4),
        bytes([192, 168, 1, 254]), mac + bytes(10), bytes(64), bytes(128))
    return h + b"\x63\x82\x53\x63" + bytes([53, 1, kind]) + opts + b"\xff"
def reply(xid):
    while True:
        data = s.recv(1500)
        if struct.unpack("!I", data[4:8])[0] != xid:
            continue
        kind = data[data.index(b"\x35\x01", 240) + 2]
        return kind, socket.inet_ntoa(data[16:20])
def mac_of(text):
    return bytes(int(b, 16) for b in text.split(":"))
if sys.argv[1] == "renew":
    for i, line in enumerate(open(sys.argv[2])):
        m, ip = line.split()
        xid = 0x5000 + i
        s.sendto(packet(mac_of(m), xid, 3, bytes([50, 4]) + socket.inet_aton(ip)), SERVER)
        try:
            kind, yi = reply(xid)
            print(m, yi, {5: "ACK", 6: "NAK"}.get(kind, kind), flush=True)
        except socket.timeout:
            print(m, ip, "none", flush=True)
    sys.exit(0)
misses = 0
for i in range(int(sys.argv[2])):
    mac = bytes([2, 0xfa, 0, 0, i >> 8, i & 255])
    text = ":".join("%02x" % b for b in mac)
    xid = 0x1000 + i
    try:
        s.sendto(packet(mac, xid, 1), SERVER)
        kind, offered = reply(xid)
        s.sendto(packet(mac, xid, 3, bytes([54, 4, 192, 168, 1, 1, 50, 4]) + socket.inet_aton(offered)), SERVER)
        kind, acked = reply(xid)
        if kind == 5:
            print(text, acked, flush=True)
        misses = 0
    except socket.timeout:
        misses += 1
        if misses >= 4:
            break
"#;

/// The test lab on a /16 with a pool of 25,000 addresses; the VMs keep 192.168.1.10-16.
fn big_pool_lab() -> String {
    let mut lab = support::test_lab();
    for (from, to) in [
        ("subnet = \"192.168.1.0/24\"", "subnet = \"192.168.0.0/16\""),
        ("dhcp_range = [\"192.168.1.2\", \"192.168.1.20\"]", "dhcp_range = [\"192.168.100.1\", \"192.168.199.254\"]"),
        ("ip_offset = 10", "ip_offset = 266"),
    ] {
        assert!(lab.contains(from), "the reference lab no longer has {from}");
        lab = lab.replace(from, to);
    }
    lab
}

#[test]
fn kill_9_mid_stream_loses_no_acked_lease() {
    if prerequisites(&["python3"]).is_some() {
        return;
    }
    let support::Pair { server: server_ns, client: client_ns } = support::pair("f", "192.168.1.1/16");
    client_ns.ip(&["addr", "add", "192.168.1.254/16", "dev", "knc"]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("kubenet.toml"), big_pool_lab()).unwrap();
    kubenet_cluster_check(&dir.path().join("kubenet.toml"));

    let server = support::serve(&server_ns, dir.path(), &[]);
    let client =
        client_ns.cmd("python3").args(["-c", RELAY_CLIENT, "stream", "5000"]).stdout(Stdio::piped()).spawn().unwrap();
    // Let exchanges flow, then kill the server without warning.
    std::thread::sleep(Duration::from_millis(1500));
    support::run(Command::new("kill").args(["-KILL", &server.child.id().to_string()]));
    let out = client.wait_with_output().unwrap();
    drop(server);
    let acked: BTreeMap<String, String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let (m, ip) = l.split_once(' ').unwrap();
            (m.to_string(), ip.to_string())
        })
        .collect();
    assert!(acked.len() > 50, "only {} exchanges before the kill; the test proves nothing", acked.len());
    eprintln!("{} leases ACKed before kill -9", acked.len());

    // Every ACKed lease is in the file, and every line of the file is whole.
    let file = std::fs::read_to_string(dir.path().join("state/leases")).unwrap();
    let mut on_disk = BTreeMap::new();
    for line in file.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f.len(), 5, "torn line in the lease file: {line:?}");
        on_disk.insert(f[1].to_string(), f[2].to_string());
    }
    for (mac, ip) in &acked {
        assert_eq!(on_disk.get(mac), Some(ip), "lease {mac} {ip} was ACKed but is not on disk");
    }

    // A restarted server renews every one of them to the same client.
    let server = support::serve(&server_ns, dir.path(), &[]);
    assert!(!server.log_text().contains("skipped"), "{}", server.log_text());
    let list = dir.path().join("acked");
    std::fs::write(&list, acked.iter().map(|(m, ip)| format!("{m} {ip}\n")).collect::<String>()).unwrap();
    let out = support::run(client_ns.cmd("python3").args(["-c", RELAY_CLIENT, "renew"]).arg(&list));
    let renewed = String::from_utf8_lossy(&out.stdout);
    let results: Vec<&str> = renewed.lines().collect();
    assert_eq!(results.len(), acked.len());
    for line in results {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f[2], "ACK", "after the restart: {line}");
        assert_eq!(acked[f[0]], f[1], "renewed to another address: {line}");
    }
    eprintln!("all {} on disk after the kill and renewed to the same client by the restarted server", acked.len());
    drop(server);
}

fn kubenet_cluster_check(path: &std::path::Path) {
    let out = Command::new(support::kubenet_bin()).args(["config", "check"]).arg(path).output().unwrap();
    assert!(out.status.success(), "test lab invalid: {}", String::from_utf8_lossy(&out.stderr));
}

/// When the state directory stops taking writes.
#[derive(PartialEq)]
enum When {
    BeforeStart,
    WhileServing,
}

/// Serves with a state directory that refuses writes, mounted by `setup` inside the server's
/// own mount namespace (`ip netns exec` gives each command one; `nsenter` joins it later), and
/// checks that a client's ACK is withheld with a clear error while the server keeps serving.
fn unwritable_state(setup: &str, when: When) {
    if prerequisites(&["udhcpc", "dig"]).is_some() {
        return;
    }
    let support::Pair { server: server_ns, client: client_ns } = support::pair("r", "192.168.1.1/24");
    client_ns.ip(&["link", "set", "knc", "address", "52:52:52:00:00:04"]);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(dir.path().join("kubenet.toml"), support::test_lab()).unwrap();
    let before = if when == When::BeforeStart { setup } else { "true" };
    let script = format!(
        "set -e; S={state}; {before}; cd {dir}; exec {bin} serve --no-bridge --dir $S",
        state = state.display(),
        dir = dir.path().display(),
        bin = support::kubenet_bin()
    );
    let mut cmd = server_ns.cmd("sh");
    cmd.args(["-c", &script]).env("RUST_LOG", "info");
    let mut server = support::Proc::spawn(cmd, &dir.path().join("serve.log"));
    server.wait_for("ready", Duration::from_secs(15));
    if when == When::WhileServing {
        let pid = server.child.id().to_string();
        let inside = format!("S={}; {setup}", state.display());
        support::run(Command::new("nsenter").args(["-t", &pid, "-m", "sh", "-c", &inside]));
    }

    let out = client_ns
        .cmd("udhcpc")
        .args(["-q", "-n", "-f", "-i", "knc", "-s", "/bin/true", "-t", "2", "-T", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a lease was ACKed though it could not be written");
    assert!(server.alive(), "the server died:\n{}", server.log_text());
    let log = server.log_text();
    assert!(log.contains("cannot write the lease file") && log.contains("withholding"), "{log}");
    // DNS is unaffected.
    client_ns.ip(&["addr", "add", "192.168.1.50/24", "dev", "knc"]);
    let dig =
        support::run(client_ns.cmd("dig").args(["@192.168.1.1", "+short", "+tries=1", "+time=3", "worker0.kubevms"]));
    assert_eq!(String::from_utf8_lossy(&dig.stdout).trim(), "192.168.1.14");
    server.stop();
}

#[test]
fn a_state_directory_gone_read_only_withholds_acks_with_a_clear_error() {
    unwritable_state("mount --bind -o ro $S $S", When::WhileServing);
}

#[test]
fn a_full_disk_withholds_acks_with_a_clear_error() {
    unwritable_state(
        "mount -t tmpfs -o size=16k,mode=0755 tmpfs $S; dd if=/dev/zero of=$S/fill bs=4k count=64 2>/dev/null || true",
        When::BeforeStart,
    );
}

#[test]
fn a_read_only_state_directory_at_start_is_a_one_line_error() {
    if prerequisites(&[]).is_some() {
        return;
    }
    let ns = support::Netns::new("ro");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(dir.path().join("kubenet.toml"), support::test_lab()).unwrap();
    let script = format!(
        "mount --bind -o ro {s} {s} && cd {d} && exec {bin} serve --no-bridge --dir {s}",
        s = state.display(),
        d = dir.path().display(),
        bin = support::kubenet_bin()
    );
    let out = ns.cmd("sh").args(["-c", &script]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(last.contains("kubenet.sock") && last.contains("Read-only file system"), "{err}");
}
