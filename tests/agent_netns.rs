//! `kubenet serve` with its Linux host network, inside a namespace the test creates: the bridge
//! with the host address and a tap per VM appear, real DHCP clients on veth ports of that bridge
//! get their fixed addresses, `dig` from their namespace resolves the lab, SIGHUP adds a host
//! entry without losing a lease, a VM added by a reload gets its tap when it starts, and SIGTERM
//! takes the bridge and every tap away again.

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
    let image = d.join("state/images/ubuntu-24.04-server-cloudimg.img");
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
    assert!(cli(&["down", "extra", "--grace", "1"]).contains("extra"));

    let log = agent.stop();
    assert!(log.contains("host network removed"), "{log}");
    let l = links(&server);
    assert!(!l.contains("kubenet0"), "bridge or taps left behind:\n{l}");
}
