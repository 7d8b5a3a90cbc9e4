//! `kubenet doctor [--json]`: every prerequisite of the lab on this host, each ok, warn or fail
//! with what to do, so that a missing firmware or a dnsmasq on port 67 shows here rather than
//! in a failed `up`. Exit 1 when anything fails.
//!
//! Each check reads the host and returns [`Check`]s; the verdicts that need judgment (which
//! process holds a port and what to do about it, disk space, versions) are pure functions.

use std::io::Write;
use std::path::{Path, PathBuf};

use kubenet_cluster::{Arch, Lab};
use kubenet_vm::VmFiles;
use kubenet_vm::qemu::{Firmware, HostProfile, ProfileError};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Check {
    pub check: String,
    pub level: Level,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

fn check(name: impl Into<String>, level: Level, detail: impl Into<String>, fix: Option<String>) -> Check {
    Check { check: name.into(), level, detail: detail.into(), fix }
}

/// Runs every check for `lab`.
pub fn run(lab: &Lab, json: bool, out: &mut impl Write) -> anyhow::Result<bool> {
    let mut all = Vec::new();
    all.extend(qemu_and_firmware(lab));
    all.push(accelerator(lab));
    // Asked once: the port checks and the serve check both need it.
    let agent = crate::client::status(&lab.state_dir).ok();
    for (port, what) in [(53, "DNS"), (67, "DHCP")] {
        all.push(port_verdict(port, what, &holders(port), agent.is_some()));
    }
    all.push(serve(agent.as_ref()));
    all.push(service_verdict(crate::commands::service::installed_problems().as_deref()));
    all.extend(images(lab));
    all.push(ssh_key(lab));
    all.extend(state_dir(lab));
    all.push(host_resolver(lab));
    #[cfg(target_os = "linux")]
    all.extend(network(lab));
    all.push(disk_space(lab));
    all.push(memory(lab));
    all.push(tmux());
    if json {
        serde_json::to_writer_pretty(&mut *out, &all).map_err(std::io::Error::from)?;
        writeln!(out)?;
    } else {
        write!(out, "{}", render(&all))?;
    }
    Ok(all.iter().all(|c| c.level != Level::Fail))
}

/// "ok    qemu        ..." with the fix indented under a check that is not ok.
pub fn render(all: &[Check]) -> String {
    let mut s = String::new();
    for c in all {
        let level = match c.level {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        };
        s += &format!("{level:<5} {:<16} {}\n", c.check, c.detail);
        if let Some(fix) = &c.fix {
            s += &format!("{:<22} fix: {fix}\n", "");
        }
    }
    let fails = all.iter().filter(|c| c.level == Level::Fail).count();
    let warns = all.iter().filter(|c| c.level == Level::Warn).count();
    s += &match (fails, warns) {
        (0, 0) => "everything kubenet needs is here\n".to_owned(),
        (0, w) => format!("ready, with {w} warnings\n"),
        (f, _) => format!("{f} problems to fix before `kubenet up`\n"),
    };
    s
}

/// The architectures the lab's guests have.
fn guest_archs(lab: &Lab) -> Vec<Arch> {
    let mut archs: Vec<Arch> = lab.vms.iter().map(|vm| vm.arch.unwrap_or(Arch::HOST)).collect();
    archs.sort();
    archs.dedup();
    archs
}

/// QEMU and firmware per guest architecture, as `serve` will find them.
fn qemu_and_firmware(lab: &Lab) -> Vec<Check> {
    let profile = match HostProfile::detect(lab, None) {
        Ok((p, _)) => p,
        Err(e) => return vec![check("qemu", Level::Fail, e.to_string(), None)],
    };
    let mut out = Vec::new();
    for arch in guest_archs(lab) {
        let name = |what: &str| format!("{what} {arch}");
        match profile.guests.iter().find(|(a, _)| *a == arch).map(|(_, g)| g) {
            Some(Ok(g)) => {
                let version = std::process::Command::new(&g.qemu)
                    .arg("--version")
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").to_owned())
                    .unwrap_or_default();
                out.push(qemu_verdict(&name("qemu"), &g.qemu, &version));
                let detail = match &g.firmware {
                    Firmware::Uefi { code, .. } => format!("UEFI, {}", code.display()),
                    Firmware::Bios => {
                        "BIOS (QEMU's SeaBIOS): no UEFI firmware found, and x86 cloud images boot either way".into()
                    }
                };
                out.push(check(name("firmware"), Level::Ok, detail, None));
            }
            Some(Err(e @ ProfileError::NoFirmware { .. })) => {
                out.push(check(name("qemu"), Level::Ok, arch.qemu_binary(), None));
                out.push(check(name("firmware"), Level::Fail, e.to_string(), None));
            }
            Some(Err(e)) => out.push(check(name("qemu"), Level::Fail, e.to_string(), None)),
            None => out.push(check(name("qemu"), Level::Fail, format!("no profile for {arch} guests"), None)),
        }
    }
    out
}

/// QEMU's version line judged: `-run-with` (9.1) is how QEMU drops root on new versions; older
/// ones use `-runas`, which works too; older than 6.0 has no snapshot jobs.
pub fn qemu_verdict(name: &str, binary: &Path, version_line: &str) -> Check {
    match kubenet_vm::qemu::parse_version(version_line) {
        Some(v) if v < (6, 0) => check(
            name,
            Level::Warn,
            format!("{} {}.{}: live snapshots need QEMU 6.0 or later", binary.display(), v.0, v.1),
            Some("install a newer QEMU".into()),
        ),
        Some(v) => {
            let drop = if v >= (9, 1) { "-run-with" } else { "-runas (-run-with needs 9.1)" };
            check(name, Level::Ok, format!("{} {}.{}, drops root with {drop}", binary.display(), v.0, v.1), None)
        }
        None => check(name, Level::Warn, format!("{}: no version in {version_line:?}", binary.display()), None),
    }
}

/// The accelerator: KVM answering its API on Linux, Hypervisor.framework on macOS.
fn accelerator(lab: &Lab) -> Check {
    use kubenet_cluster::Accelerator;
    let wanted = lab.accelerator;
    if wanted == Accelerator::Tcg {
        return check("accelerator", Level::Ok, "tcg (software emulation), as the lab asks", None);
    }
    let (usable, detail) = if cfg!(target_os = "macos") {
        let out = std::process::Command::new("sysctl").args(["-n", "kern.hv_support"]).output();
        let on = out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "1");
        (on, if on { "hvf (kern.hv_support = 1)".to_owned() } else { "kern.hv_support is not 1".to_owned() })
    } else {
        kvm_api()
    };
    match (usable, wanted) {
        (true, _) => check("accelerator", Level::Ok, detail, None),
        (false, Accelerator::Auto) => check(
            "accelerator",
            Level::Warn,
            format!("{detail}: guests will run under TCG, many times slower"),
            Some("on Linux: load kvm (modprobe kvm_intel or kvm_amd) and join the `kvm` group".into()),
        ),
        (false, _) => check(
            "accelerator",
            Level::Fail,
            format!("{detail}, but the lab asks for {wanted:?}"),
            Some("set accelerator = \"auto\" or \"tcg\", or make the accelerator available".into()),
        ),
    }
}

/// Opens /dev/kvm and asks KVM_GET_API_VERSION (12 on every kernel since 2.6.22).
fn kvm_api() -> (bool, String) {
    use std::os::fd::AsRawFd;
    const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Err(e) => (false, format!("/dev/kvm: {e}")),
        Ok(f) => {
            // SAFETY: an ioctl without arguments on a file we own.
            let v = unsafe { libc::ioctl(f.as_raw_fd(), KVM_GET_API_VERSION as _) };
            if v == 12 {
                (true, "kvm (/dev/kvm answers API version 12)".into())
            } else {
                (false, format!("/dev/kvm answers API version {v}"))
            }
        }
    }
}

/// Who holds a UDP port: a process name and pid, when they can be found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub name: String,
    pub pid: Option<u32>,
}

/// The inodes of sockets bound to `port` in /proc/net/udp or udp6's text.
pub fn udp_inodes(proc_net_udp: &str, port: u16) -> Vec<u64> {
    proc_net_udp
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local_port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
            (local_port == port).then(|| f.get(9)?.parse().ok())?
        })
        .collect()
}

/// What to do about `holder` on `port`: each program that usually sits there, by name.
pub fn fix_for(holder: &str, port: u16) -> String {
    match holder {
        "dnsmasq" => "stop dnsmasq (`sudo systemctl disable --now dnsmasq`; on macOS `sudo brew services stop dnsmasq`): kubenet serve replaces it".to_owned(),
        "systemd-resolve" | "systemd-resolved" => "set DNSStubListener=no in /etc/systemd/resolved.conf and restart systemd-resolved, or run serve with --dns-listen 192.168.1.1 (the lab's host address) so both fit".to_owned(),
        "bootpd" => "macOS's bootpd (Internet Sharing) holds it: `sudo launchctl unload -w /System/Library/LaunchDaemons/bootps.plist`, and kubenet serve binds first at boot when installed as a service".to_owned(),
        "mDNSResponder" => "macOS's resolver holds it: start kubenet serve as a service (`sudo kubenet service install`) so it binds first, or serve DNS on the lab's address with --dns-listen".to_owned(),
        "dhclient" | "dhcpcd" | "NetworkManager" => format!("{holder} is a DHCP client or manager that took port {port}: stop it on this host, or run serve inside a network namespace"),
        other => format!("stop {other}, or run kubenet serve with --{} on another address", if port == 53 { "dns-listen" } else { "dhcp-listen" }),
    }
}

/// The port's verdict: free, kubenet's own, or someone else's with the fix.
pub fn port_verdict(port: u16, what: &str, holders: &[Holder], serve_running: bool) -> Check {
    let name = format!("port {port}");
    if holders.is_empty() {
        return check(name, Level::Ok, format!("free for kubenet serve's {what}"), None);
    }
    if holders.iter().all(|h| h.name == "kubenet") && serve_running {
        return check(name, Level::Ok, format!("held by kubenet serve ({what})"), None);
    }
    let other = holders.iter().find(|h| h.name != "kubenet").unwrap_or(&holders[0]);
    let who = match other.pid {
        Some(pid) => format!("{} (pid {pid})", other.name),
        None => other.name.clone(),
    };
    check(
        name,
        Level::Fail,
        format!("held by {who}: kubenet serve cannot bind its {what} server"),
        Some(fix_for(&other.name, port)),
    )
}

/// The processes holding UDP `port`: sockets from /proc/net/udp(6), their owners from the
/// file descriptors in /proc (all of them as root; one's own only otherwise). macOS: lsof.
fn holders(port: u16) -> Vec<Holder> {
    if cfg!(target_os = "macos") {
        let Ok(out) = std::process::Command::new("lsof").args(["-nP", &format!("-iUDP:{port}")]).output() else {
            return Vec::new();
        };
        return String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                Some(Holder { name: (*f.first()?).to_owned(), pid: f.get(1).and_then(|p| p.parse().ok()) })
            })
            .collect();
    }
    let mut inodes = Vec::new();
    for table in ["/proc/net/udp", "/proc/net/udp6"] {
        inodes.extend(udp_inodes(&std::fs::read_to_string(table).unwrap_or_default(), port));
    }
    if inodes.is_empty() {
        return Vec::new();
    }
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else { continue };
        let owns = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|l| {
                let l = l.to_string_lossy();
                inodes.iter().any(|i| l == format!("socket:[{i}]"))
            })
        });
        if owns {
            let name = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default().trim().to_owned();
            found.push(Holder { name, pid: Some(pid) });
        }
    }
    if found.is_empty() {
        found.push(Holder {
            name: "a process this user cannot see (run doctor with sudo to name it)".into(),
            pid: None,
        });
    }
    found
}

/// `serve` running for this lab (`agent`: its status, if it answered), and of this version.
fn serve(agent: Option<&crate::proto::StatusReport>) -> Check {
    match agent {
        None => check(
            "serve",
            Level::Warn,
            "not running for this lab: `up` needs it",
            Some("`sudo kubenet serve` in a terminal, or `sudo kubenet service install` for good".into()),
        ),
        Some(s) => serve_verdict(Some(&s.version), env!("CARGO_PKG_VERSION")),
    }
}

pub fn serve_verdict(agent: Option<&str>, cli: &str) -> Check {
    match agent {
        Some(v) if v == cli => check("serve", Level::Ok, format!("running, version {v}"), None),
        other => check(
            "serve",
            Level::Fail,
            format!("running, version {}, but this kubenet is {cli}", other.unwrap_or("older than 0.1 (unknown)")),
            Some("restart kubenet serve (or `sudo kubenet service install` again) so both are the same".into()),
        ),
    }
}

/// The installed service (`problems`: None when none is installed): it runs as root at every
/// boot, so a binary or lab definition anyone but root can replace makes its owner root.
pub fn service_verdict(problems: Option<&[String]>) -> Check {
    match problems {
        None => {
            check("service", Level::Ok, "not installed (`sudo kubenet service install` starts serve at boot)", None)
        }
        Some([]) => check("service", Level::Ok, "installed; its binary and lab definition are root's alone", None),
        Some(p) => check(
            "service",
            Level::Warn,
            format!("the root service runs what others than root can replace: {}", p.join("; ")),
            Some(format!(
                "`sudo kubenet service install` again: it copies kubenet to {} and the lab definition to {}",
                crate::commands::service::LIBEXEC_BIN,
                crate::commands::service::SERVICE_CONFIG
            )),
        ),
    }
}

/// Each base image: there, and matching its `image_sha256` or the hash `image pull` checked.
fn images(lab: &Lab) -> Vec<Check> {
    let mut seen: Vec<PathBuf> = Vec::new();
    let mut out = Vec::new();
    for vm in &lab.vms {
        let path = kubenet_vm::files::base_image(lab, vm, Arch::HOST);
        if seen.contains(&path) {
            continue;
        }
        seen.push(path.clone());
        let expected =
            vm.image_sha256.clone().map(|h| (h, "image_sha256")).or_else(|| {
                kubenet_vm::image::recorded_sum(&path).map(|h| (h, "the hash `kubenet image pull` verified"))
            });
        let actual =
            if path.is_file() { Some(kubenet_vm::image::file_sha256(&path).map_err(|e| e.to_string())) } else { None };
        out.push(image_verdict(&path, actual, expected.as_ref().map(|(h, f)| (h.as_str(), *f))));
    }
    out
}

pub fn image_verdict(path: &Path, actual: Option<Result<String, String>>, expected: Option<(&str, &str)>) -> Check {
    let name = "image";
    let shown = path.display();
    match (actual, expected) {
        (None, _) => check(name, Level::Fail, format!("{shown} is missing"), Some("`kubenet image pull`".into())),
        (Some(Err(e)), _) => check(name, Level::Fail, format!("{shown}: {e}"), None),
        (Some(Ok(_)), None) => check(
            name,
            Level::Warn,
            format!("{shown} is there but unchecked: no image_sha256, and not fetched by `kubenet image pull`"),
            Some("set the group's image_sha256, or let `kubenet image pull` fetch and verify it".into()),
        ),
        (Some(Ok(got)), Some((want, from))) if got.eq_ignore_ascii_case(want) => {
            check(name, Level::Ok, format!("{shown} matches {from}"), None)
        }
        (Some(Ok(got)), Some((want, from))) => check(
            name,
            Level::Fail,
            format!("{shown} has SHA-256 {got}, but {from} is {want}: damaged or replaced"),
            Some("`kubenet image pull` fetches it again (VMs set up on it keep their overlays: `kubenet reset` them if the image really changed)".into()),
        ),
    }
}

fn home() -> PathBuf {
    std::env::home_dir().unwrap_or_else(|| PathBuf::from("/"))
}

/// The login key the VMs will trust.
fn ssh_key(lab: &Lab) -> Check {
    let candidates = kubenet_vm::keys::login_key_candidates(lab, &home());
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        let text = std::fs::read_to_string(found).unwrap_or_default();
        let ok = text.split_whitespace().next().is_some_and(|t| t.starts_with("ssh-") || t.starts_with("ecdsa-"));
        return if ok {
            check("ssh key", Level::Ok, format!("{} goes into every VM", found.display()), None)
        } else {
            check("ssh key", Level::Fail, format!("{} is not an OpenSSH public key", found.display()), None)
        };
    }
    match &lab.login.ssh_public_key {
        Some(p) => check(
            "ssh key",
            Level::Fail,
            format!("login.ssh_public_key = {} does not exist", p.display()),
            Some(
                "point it at your public key, or remove it and kubenet uses ~/.ssh/id_ed25519.pub or makes a lab key"
                    .into(),
            ),
        ),
        None => check(
            "ssh key",
            Level::Ok,
            format!("none in ~/.ssh: kubenet makes and uses {}", kubenet_vm::LabFiles::new(lab).lab_key().display()),
            None,
        ),
    }
}

/// The state directory: the user's, and no VM secret readable by others.
fn state_dir(lab: &Lab) -> Vec<Check> {
    use std::os::unix::fs::MetadataExt;
    let dir = &lab.state_dir;
    let Ok(meta) = std::fs::metadata(dir) else {
        return vec![check(
            "state",
            Level::Ok,
            format!("{} does not exist yet: `kubenet up` makes it", dir.display()),
            None,
        )];
    };
    let (uid, _) = crate::agent::control::owner();
    let mut out = Vec::new();
    if meta.uid() != uid {
        out.push(check(
            "state",
            Level::Fail,
            format!("{} belongs to uid {}, not to you (uid {uid})", dir.display(), meta.uid()),
            Some(format!("sudo chown -R {uid} {}", dir.display())),
        ));
    }
    let mut open = Vec::new();
    for vm in &lab.vms {
        let files = VmFiles::new(lab, vm);
        for (p, max) in
            [(files.dir.clone(), 0o700), (files.host_key(), 0o600), (files.seed(), 0o600), (files.disk(), 0o600)]
        {
            if let Ok(m) = std::fs::metadata(&p)
                && m.mode() & 0o077 != 0
            {
                open.push(format!("{} ({:o}, want {max:o})", p.display(), m.mode() & 0o777));
            }
        }
    }
    if !open.is_empty() {
        out.push(check(
            "state",
            Level::Fail,
            format!("other users can read VM secrets: {}", open.join(", ")),
            Some("`kubenet setup` sets the modes right".into()),
        ));
    }
    if out.is_empty() {
        out.push(check("state", Level::Ok, format!("{}: yours, VM folders private", dir.display()), None));
    }
    out
}

/// Whether the host itself resolves the lab's names through kubenet.
fn host_resolver(lab: &Lab) -> Check {
    let domain = &lab.network.domain;
    let set = if cfg!(target_os = "macos") {
        std::fs::read_to_string(Path::new("/etc/resolver").join(domain))
            .is_ok_and(|t| t.contains(&lab.network.host_address.to_string()))
    } else {
        std::process::Command::new("resolvectl")
            .arg("domain")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&format!("~{domain}")))
    };
    if set {
        check("host resolver", Level::Ok, format!("*.{domain} resolves through kubenet on this host"), None)
    } else {
        check(
            "host resolver",
            Level::Warn,
            format!("this host does not resolve *.{domain} (the VMs do; `kubenet ssh` needs no names)"),
            Some("`sudo kubenet serve --host-resolver` sets it up while serve runs".into()),
        )
    }
}

/// The lab's bridge and subnet against the host's interfaces, as `serve` will judge them
/// ([`crate::agent::hostnet::bridge_verdict`], [`crate::agent::hostnet::overlap`]), read from /sys and the
/// interface list of the network namespace doctor runs in.
#[cfg(target_os = "linux")]
fn network(lab: &Lab) -> Vec<Check> {
    use crate::agent::hostnet::{LinkFacts, LinkKind};
    let name = &lab.network.bridge;
    let sys = Path::new("/sys/class/net").join(name);
    let facts = sys.exists().then(|| LinkFacts {
        kind: if sys.join("bridge").is_dir() {
            LinkKind::Bridge
        } else if sys.join("tun_flags").exists() {
            LinkKind::Tap
        } else {
            LinkKind::Other
        },
        alias: std::fs::read_to_string(sys.join("ifalias")).ok().map(|a| a.trim().to_owned()).filter(|a| !a.is_empty()),
    });
    let bridge = bridge_check(name, facts.as_ref(), &crate::agent::hostnet::mark(&lab.state_dir));
    // The lab's own bridge carries the lab's subnet; any other interface, a foreign one of the
    // bridge's name included, counts.
    let except = if bridge.level == Level::Ok { name.as_str() } else { "" };
    vec![bridge, subnet_check(lab.network.subnet, &crate::agent::hostnet::host_networks(except))]
}

/// The `bridge` line: free, this lab's own, or someone's interface `serve` will refuse.
#[cfg(target_os = "linux")]
pub fn bridge_check(name: &str, existing: Option<&crate::agent::hostnet::LinkFacts>, mark: &str) -> Check {
    match crate::agent::hostnet::bridge_verdict(name, existing, mark) {
        Ok(crate::agent::hostnet::Take::Create) => {
            check("bridge", Level::Ok, format!("{name} does not exist yet: `kubenet serve` makes it"), None)
        }
        Ok(crate::agent::hostnet::Take::Adopt) => {
            check("bridge", Level::Ok, format!("{name} is this lab's bridge"), None)
        }
        Err(e) => check(
            "bridge",
            Level::Fail,
            e.to_string(),
            Some("set network.bridge to a name no interface of this host has".into()),
        ),
    }
}

/// The `subnet` line: the lab's subnet against every network of the host's interfaces.
#[cfg(target_os = "linux")]
pub fn subnet_check(subnet: ipnet::Ipv4Net, host: &[(String, ipnet::Ipv4Net)]) -> Check {
    match crate::agent::hostnet::overlap(subnet, host) {
        None => check("subnet", Level::Ok, format!("{} is on no other interface of this host", subnet.trunc()), None),
        Some(e) => check(
            "subnet",
            Level::Fail,
            e.to_string(),
            Some("set network.subnet, host_address and dhcp_range to a network this host does not have".into()),
        ),
    }
}

/// Space for the disks: thin overlays, but each may grow to its size.
fn disk_space(lab: &Lab) -> Check {
    let mut probe = lab.state_dir.clone();
    while !probe.exists() {
        if !probe.pop() {
            probe = PathBuf::from(".");
            break;
        }
    }
    let needed: u64 = lab.vms.iter().map(|vm| vm.disk.0).sum();
    match nix::sys::statvfs::statvfs(&probe) {
        // The casts are for macOS, where the block counts are u32.
        #[allow(clippy::unnecessary_cast)]
        Ok(s) => space_verdict(&probe, s.blocks_available() as u64 * s.fragment_size() as u64, needed),
        Err(e) => check("disk space", Level::Warn, format!("{}: {e}", probe.display()), None),
    }
}

pub fn space_verdict(dir: &Path, available: u64, needed: u64) -> Check {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let detail = format!(
        "{:.1} GiB free in {}, the lab's disks may grow to {:.1} GiB",
        gib(available),
        dir.display(),
        gib(needed)
    );
    if available < 2 << 30 {
        check("disk space", Level::Fail, detail, Some("free some space: a guest that fills its disk stops".into()))
    } else if available < needed {
        check(
            "disk space",
            Level::Warn,
            detail,
            Some("the disks are thin and start small, but a full file system pauses the guests".into()),
        )
    } else {
        check("disk space", Level::Ok, detail, None)
    }
}

/// This host's memory: /proc/meminfo's MemTotal on Linux, `sysctl hw.memsize` on macOS.
pub fn host_memory() -> Option<u64> {
    if cfg!(target_os = "macos") {
        let out = std::process::Command::new("sysctl").args(["-n", "hw.memsize"]).output().ok()?;
        return String::from_utf8_lossy(&out.stdout).trim().parse().ok();
    }
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 =
        info.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// Warnings for `vms` on a host with `host` bytes of memory: each VM that asks for more than
/// the host has, and the VMs together asking for more (QEMU starts them anyway; the guests
/// then swap or are killed by the host).
pub fn memory_warnings(vms: &[&kubenet_cluster::Vm], host: u64) -> Vec<String> {
    let gib = |b: u64| format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64);
    let mut out: Vec<String> = vms
        .iter()
        .filter(|vm| vm.memory.0 > host)
        .map(|vm| format!("{} asks for {} of memory, more than this host's {}", vm.name, gib(vm.memory.0), gib(host)))
        .collect();
    let total: u64 = vms.iter().map(|vm| vm.memory.0).sum();
    if out.is_empty() && total > host {
        out.push(format!(
            "the {} VMs together ask for {} of memory, more than this host's {}: start fewer, or lower their `memory`",
            vms.len(),
            gib(total),
            gib(host)
        ));
    }
    out
}

fn memory(lab: &Lab) -> Check {
    let Some(host) = host_memory() else { return check("memory", Level::Warn, "cannot tell this host's memory", None) };
    let vms: Vec<&kubenet_cluster::Vm> = lab.vms.iter().collect();
    let total: u64 = vms.iter().map(|vm| vm.memory.0).sum();
    match memory_warnings(&vms, host).as_slice() {
        [] => check(
            "memory",
            Level::Ok,
            format!("the VMs ask for {} MiB of this host's {} MiB", total >> 20, host >> 20),
            None,
        ),
        warnings => check(
            "memory",
            Level::Warn,
            warnings.join("; "),
            Some("lower the groups' `memory`, or `kubenet up` only some VMs".into()),
        ),
    }
}

fn tmux() -> Check {
    match std::process::Command::new("tmux").arg("-V").output() {
        Ok(o) if o.status.success() => {
            check("tmux", Level::Ok, String::from_utf8_lossy(&o.stdout).trim().to_owned(), None)
        }
        _ => check("tmux", Level::Warn, "not found: only `kubenet tmux` needs it", Some("install tmux".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_udp_is_read_by_port() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
                    \x20 12: 00000000:0043 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 31337 2 0000000000000000 0\n\
                    \x20 13: 0100007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000   101        0 4242 2 0000000000000000 0\n";
        assert_eq!(udp_inodes(text, 67), [31337]);
        assert_eq!(udp_inodes(text, 53), [4242]);
        assert!(udp_inodes(text, 5353).is_empty());
    }

    #[test]
    fn a_port_held_by_another_server_names_it_and_the_fix() {
        let dnsmasq = [Holder { name: "dnsmasq".into(), pid: Some(77) }];
        let c = port_verdict(67, "DHCP", &dnsmasq, false);
        assert_eq!(c.level, Level::Fail);
        assert_eq!(c.detail, "held by dnsmasq (pid 77): kubenet serve cannot bind its DHCP server");
        assert!(c.fix.unwrap().contains("systemctl disable --now dnsmasq"));
        let ours = [Holder { name: "kubenet".into(), pid: Some(5) }];
        assert_eq!(port_verdict(53, "DNS", &ours, true).level, Level::Ok);
        assert_eq!(port_verdict(53, "DNS", &ours, false).level, Level::Fail, "a kubenet that is not this lab's serve");
        assert_eq!(port_verdict(53, "DNS", &[], false).level, Level::Ok);
        assert!(fix_for("mDNSResponder", 53).contains("service install"));
        assert!(fix_for("bootpd", 67).contains("bootps.plist"));
        assert!(fix_for("systemd-resolve", 53).contains("DNSStubListener=no"));
    }

    #[test]
    fn verdicts() {
        assert_eq!(
            qemu_verdict("qemu x86_64", Path::new("q"), "QEMU emulator version 9.2.0").detail,
            "q 9.2, drops root with -run-with"
        );
        assert!(qemu_verdict("q", Path::new("q"), "QEMU emulator version 7.2.22 (Debian)").detail.contains("-runas"));
        assert_eq!(qemu_verdict("q", Path::new("q"), "QEMU emulator version 5.2.0").level, Level::Warn);
        assert_eq!(serve_verdict(Some("0.1.0"), "0.1.0").level, Level::Ok);
        let old = serve_verdict(None, "0.2.0");
        assert_eq!(old.level, Level::Fail);
        assert!(old.fix.unwrap().contains("restart kubenet serve"));
        let p = Path::new("/lab/images/x.img");
        assert_eq!(image_verdict(p, None, None).level, Level::Fail);
        assert_eq!(image_verdict(p, Some(Ok("ab".into())), Some(("AB", "image_sha256"))).level, Level::Ok);
        let bad = image_verdict(p, Some(Ok("ab".into())), Some(("cd", "image_sha256")));
        assert_eq!(bad.detail, "/lab/images/x.img has SHA-256 ab, but image_sha256 is cd: damaged or replaced");
        assert_eq!(image_verdict(p, Some(Ok("ab".into())), None).level, Level::Warn);
        assert_eq!(space_verdict(p, 1 << 30, 1 << 40).level, Level::Fail);
        assert_eq!(space_verdict(p, 50 << 30, 140 << 30).level, Level::Warn);
        assert_eq!(space_verdict(p, 500 << 30, 140 << 30).level, Level::Ok);
    }

    #[test]
    fn memory_beyond_the_host_is_named() {
        let lab = kubenet_cluster::load(&kubenet_cluster::Choice::Embedded, Path::new("/lab")).unwrap();
        let vms: Vec<&kubenet_cluster::Vm> = lab.vms.iter().collect();
        // The reference lab: 4 x 2 GiB + 3 x 8 GiB = 32 GiB.
        assert!(memory_warnings(&vms, 64 << 30).is_empty());
        assert_eq!(
            memory_warnings(&vms, 24 << 30),
            [
                "the 7 VMs together ask for 32.0 GiB of memory, more than this host's 24.0 GiB: start fewer, or lower their `memory`"
            ]
        );
        let w = memory_warnings(&vms, 4 << 30);
        assert_eq!(w.len(), 3, "each worker alone: {w:?}");
        assert_eq!(w[0], "worker0 asks for 8.0 GiB of memory, more than this host's 4.0 GiB");
    }

    #[test]
    fn the_report_ends_with_a_verdict() {
        let ok = check("tmux", Level::Ok, "tmux 3.3a", None);
        let bad = check("port 67", Level::Fail, "held by dnsmasq", Some("stop it".into()));
        assert_eq!(
            render(std::slice::from_ref(&ok)),
            "ok    tmux             tmux 3.3a\neverything kubenet needs is here\n"
        );
        let r = render(&[ok, bad]);
        assert!(r.contains("FAIL  port 67          held by dnsmasq\n                       fix: stop it\n"), "{r}");
        assert!(r.ends_with("1 problems to fix before `kubenet up`\n"), "{r}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_network_lines_name_the_interface_serve_would_refuse() {
        use crate::agent::hostnet::{LinkFacts, LinkKind};
        let m = "kubenet:/lab";
        assert_eq!(bridge_check("kubenet0", None, m).level, Level::Ok);
        let ours = LinkFacts { kind: LinkKind::Bridge, alias: Some(m.into()) };
        assert_eq!(bridge_check("kubenet0", Some(&ours), m).detail, "kubenet0 is this lab's bridge");
        let veth = LinkFacts { kind: LinkKind::Other, alias: None };
        let c = bridge_check("eth0", Some(&veth), m);
        assert_eq!(
            (c.level, c.detail.as_str()),
            (Level::Fail, "eth0 exists and is not a bridge kubenet made: pick another network.bridge")
        );
        let net = |s: &str| s.parse::<ipnet::Ipv4Net>().unwrap();
        let lab = net("192.168.1.0/24");
        assert_eq!(subnet_check(lab, &[("eth0".into(), net("10.0.0.2/8"))]).level, Level::Ok);
        let c = subnet_check(lab, &[("eth0".into(), net("10.0.0.2/8")), ("wlan0".into(), net("192.168.1.4/24"))]);
        assert_eq!(
            (c.level, c.detail.as_str()),
            (Level::Fail, "the lab's 192.168.1.0/24 overlaps wlan0's 192.168.1.0/24: pick another subnet")
        );
    }

    #[test]
    fn a_service_others_can_replace_is_a_warning_with_the_fix() {
        assert_eq!(service_verdict(None).level, Level::Ok);
        assert_eq!(service_verdict(Some(&[])).level, Level::Ok);
        let c = service_verdict(Some(&["/home/ann/.cargo/bin belongs to uid 1000, not root".to_owned()]));
        assert_eq!(c.level, Level::Warn);
        assert_eq!(
            c.detail,
            "the root service runs what others than root can replace: /home/ann/.cargo/bin belongs to uid 1000, not root"
        );
        assert!(c.fix.unwrap().contains("/usr/local/libexec/kubenet/kubenet"));
    }
}
