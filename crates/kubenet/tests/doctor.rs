//! `kubenet doctor` against real trouble, made inside namespaces the test creates: a dnsmasq
//! holding port 67 (named, with its pid and the fix), the arm64 firmware hidden by a mount
//! namespace (named, with the package), and a base image whose SHA-256 is not the configured
//! one (both hashes shown). A clean lab passes with exit 0.

#[path = "support/mod.rs"]
mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use support::{Netns, kubenet_bin, prerequisites, veth};

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

/// A lab in `d` with its state in `d/state` and a base image there.
fn lab(d: &Path, toml: &str) {
    std::fs::write(d.join("kubenet.toml"), toml).unwrap();
    let images = d.join("state/images");
    std::fs::create_dir_all(&images).unwrap();
    for arch in ["amd64", "arm64"] {
        std::fs::write(images.join(format!("ubuntu-24.04-server-cloudimg-{arch}.img")), b"not really an image")
            .unwrap();
    }
}

fn doctor(mut cmd: Command, d: &Path) -> Output {
    cmd.args(["--dir", "state", "doctor"]).current_dir(d).env("HOME", d).env_remove("KUBENET_CONFIG").output().unwrap()
}

/// The doctor's line for `check`, and the fix line under it if any.
fn line<'a>(report: &'a str, check: &str) -> (&'a str, &'a str) {
    let lines: Vec<&str> = report.lines().collect();
    let i = lines.iter().position(|l| l[6..].starts_with(check)).unwrap_or_else(|| panic!("no {check}:\n{report}"));
    let fix = lines.get(i + 1).filter(|l| l.trim_start().starts_with("fix: ")).copied().unwrap_or("");
    (lines[i], fix)
}

#[test]
fn doctor_names_a_dnsmasq_on_port_67_with_its_fix() {
    if prerequisites(&["dnsmasq"]).is_some() {
        return;
    }
    let ns = Netns::new("doc");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    lab(d, &support::test_lab());
    let clean = doctor(ns.cmd(kubenet_bin()), d);
    let report = text(&clean);
    assert_eq!(line(&report, "port 67").0, "ok    port 67          free for kubenet serve's DHCP", "{report}");

    // dnsmasq as a DHCP server on 67 (no DNS: -p 0), in the foreground, started by this test.
    let mut c = ns.cmd("dnsmasq");
    c.args(["-d", "-C", "/dev/null", "-p", "0", "--dhcp-range=10.99.0.10,10.99.0.20"])
        .arg(format!("--dhcp-leasefile={}", d.join("dnsmasq.leases").display()))
        .arg(format!("--pid-file={}", d.join("dnsmasq.pid").display()));
    let mut dnsmasq = support::Proc::spawn(c, &d.join("dnsmasq.log"));
    dnsmasq.wait_for("DHCP, IP range", Duration::from_secs(10));
    let pid = dnsmasq.child.id();
    let out = doctor(ns.cmd(kubenet_bin()), d);
    let report = text(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    let (check, fix) = line(&report, "port 67");
    assert_eq!(
        check,
        format!("FAIL  port 67          held by dnsmasq (pid {pid}): kubenet serve cannot bind its DHCP server")
    );
    assert!(
        fix.contains("sudo systemctl disable --now dnsmasq") && fix.contains("brew services stop dnsmasq"),
        "{fix}"
    );
    assert!(line(&report, "port 53").0.starts_with("ok "), "dnsmasq's DNS is off (-p 0): {report}");
    assert!(report.contains("doctor found problems"), "{report}");
    drop(dnsmasq);
}

#[test]
fn doctor_names_missing_firmware_and_a_wrong_image_hash() {
    if prerequisites(&["unshare", "mount", "qemu-system-aarch64"]).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // worker* are arm64 guests; the control group has an image of its own, pinned to a hash it
    // does not have. (`arch`, `image` and `image_sha256` are per group.)
    let reference = support::test_lab();
    // (The last of each: the comments above the groups mention them too.)
    let at = |key: &str| reference.rfind(key).unwrap();
    let (head, controls, workers) = (
        &reference[..at("prefix = \"control\"")],
        &reference[at("prefix = \"control\"")..at("prefix = \"worker\"")],
        &reference[at("prefix = \"worker\"")..],
    );
    let default_image = "image = \"images/ubuntu-24.04-server-cloudimg-{arch}.img\"";
    assert!(controls.contains(default_image) && workers.contains("arch = \"auto\""));
    let controls = controls.replace(
        default_image,
        &format!("image = \"images/control-{{arch}}.img\"\nimage_sha256 = \"{}\"", "0".repeat(64)),
    );
    let workers = workers.replace("arch = \"auto\"", "arch = \"aarch64\"");
    lab(d, &format!("{head}{controls}{workers}"));
    std::fs::write(d.join("state/images/control-amd64.img"), b"changed").unwrap();
    let check =
        Command::new(kubenet_bin()).args(["--dir", "state", "config", "check"]).current_dir(d).output().unwrap();
    assert!(check.status.success(), "{}", text(&check));

    // A mount namespace of the test's own, with the arm64 firmware folders hidden.
    let hide: Vec<&str> = ["/usr/share/AAVMF", "/usr/share/edk2", "/usr/share/qemu-efi-aarch64"]
        .into_iter()
        .filter(|p| Path::new(p).is_dir())
        .collect();
    assert!(!hide.is_empty());
    let mounts: String = hide.iter().map(|p| format!("mount -t tmpfs none {p} && ")).collect();
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &format!("{mounts}exec \"$0\" \"$@\""),
        kubenet_bin(),
    ]);
    let out = doctor(cmd, d);
    let report = text(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    let (fw, _) = line(&report, "firmware aarch64");
    assert!(fw.starts_with("FAIL ") && fw.contains("qemu-efi-aarch64"), "{report}");
    assert!(line(&report, "firmware x86_64").0.starts_with("ok "), "{report}");

    let image = d.join("state/images/control-amd64.img");
    let sums = Command::new("sha256sum").arg(&image).output().unwrap();
    let got = String::from_utf8_lossy(&sums.stdout).split_whitespace().next().unwrap().to_owned();
    let want = format!(
        "FAIL  image            {} has SHA-256 {got}, but image_sha256 is {}: damaged or replaced",
        image.display(),
        "0".repeat(64)
    );
    assert!(report.lines().any(|l| l == want), "{want}\n{report}");
}

#[test]
fn doctor_names_a_foreign_interface_as_bridge_and_an_overlapping_subnet() {
    let ns = Netns::new("docn");
    let peer = Netns::new("docp");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    lab(d, &support::test_lab());
    let report = text(&doctor(ns.cmd(kubenet_bin()), d));
    assert_eq!(
        line(&report, "bridge").0,
        "ok    bridge           kubenet0 does not exist yet: `kubenet serve` makes it"
    );
    assert_eq!(
        line(&report, "subnet").0,
        "ok    subnet           192.168.1.0/24 is on no other interface of this host"
    );

    // A veth called kubenet0, and the lab's network on another veth (the host's LAN).
    veth(&ns, "kubenet0", &peer, "p0");
    veth(&ns, "wlan0", &peer, "p1");
    ns.ip(&["addr", "add", "192.168.1.4/24", "dev", "wlan0"]);
    let out = doctor(ns.cmd(kubenet_bin()), d);
    let report = text(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert_eq!(
        line(&report, "bridge").0,
        "FAIL  bridge           kubenet0 exists and is not a bridge kubenet made: pick another network.bridge"
    );
    let (subnet, fix) = line(&report, "subnet");
    assert_eq!(
        subnet,
        "FAIL  subnet           the lab's 192.168.1.0/24 overlaps wlan0's 192.168.1.0/24: pick another subnet"
    );
    assert!(fix.contains("network.subnet"), "{fix}");
}
