//! `kubenet serve` with its Linux host network, inside a namespace the test creates: the bridge
//! with the host address and a tap per VM appear, real DHCP clients on veth ports of that bridge
//! get their fixed addresses, `dig` from their namespace resolves the lab, SIGHUP adds a host
//! entry without losing a lease, and SIGTERM takes the bridge and taps away again.

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
    if prerequisites(&["udhcpc", "dig"]).is_some() {
        return;
    }
    let server = Netns::new("br");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // NAT off: this namespace has nowhere to route to, and the test must not touch the host's
    // nftables.
    let lab = support::test_lab().replace("nat = true", "nat = false");
    assert!(lab.contains("nat = false"));
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

    let log = agent.stop();
    assert!(log.contains("host network removed"), "{log}");
    let l = links(&server);
    assert!(!l.contains("kubenet0"), "bridge or taps left behind:\n{l}");
}
