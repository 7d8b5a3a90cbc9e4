//! `kubenet serve` attacked by the lab's own owner (issue 26). uid 65534 owns the lab, its
//! state directory and the control socket, as a user who ran `sudo kubenet serve` would, and
//! tries to turn root against the host: links in the VM's folder to root's files, a pidfile
//! naming a root process, and a reload that moves the lab's network. Everything runs in
//! network namespaces this test makes. After each attack the root-owned victims are byte for
//! byte, owner and mode as they were, no process holds them open, and the agent still answers.

mod support;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use support::{Netns, Proc, kubenet_bin, pid_alive, prerequisites};

use support::{OWNER, as_owner};

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

/// One request line on the control socket, sent by the owner; the answer line.
fn ask(dir: &Path, request: &str) -> serde_json::Value {
    const CLIENT: &str = "import socket, sys\n\
        s = socket.socket(socket.AF_UNIX)\n\
        s.settimeout(120)\n\
        s.connect(sys.argv[1])\n\
        s.sendall(sys.argv[2].encode() + b'\\n')\n\
        print(s.makefile().readline())\n";
    let sock = dir.join("state/kubenet.sock");
    let out = as_owner(None, dir, "/usr/bin/python3", &["-c", CLIENT, sock.to_str().unwrap(), request]);
    assert!(out.status.success(), "{request}: {}", text(&out));
    serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
}

/// Root's files, in a root folder anyone may enter, as an attacker would find them.
struct Victims {
    _dir: tempfile::TempDir,
    files: Vec<(PathBuf, Vec<u8>, u32)>,
}

impl Victims {
    fn new() -> Victims {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new().prefix("kubenet-victims").tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut files = Vec::new();
        for (name, mode) in [("log", 0o644), ("secret", 0o600), ("vars", 0o600)] {
            let p = dir.path().join(name);
            let bytes = format!("root's {name}, not to be touched\n").into_bytes();
            std::fs::write(&p, &bytes).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            files.push((p, bytes, mode));
        }
        Victims { _dir: dir, files }
    }

    fn path(&self, name: &str) -> &Path {
        &self.files.iter().find(|(p, _, _)| p.ends_with(name)).unwrap().0
    }

    /// Every victim as it was: bytes, root's, its mode; and no process has it open.
    fn assert_untouched(&self) {
        for (p, bytes, mode) in &self.files {
            let m = std::fs::metadata(p).unwrap();
            assert_eq!(std::fs::read(p).unwrap(), *bytes, "{} was written", p.display());
            assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (0, 0, *mode), "{} changed hands", p.display());
            let holders = holders_of(p);
            assert!(holders.is_empty(), "{} is held open by {holders:?}", p.display());
        }
    }
}

/// The processes with `file` open, from /proc/*/fd.
fn holders_of(file: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for proc in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(fds) = std::fs::read_dir(proc.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|t| t == file) {
                let comm = std::fs::read_to_string(proc.path().join("comm")).unwrap_or_default();
                found.push(format!("{} ({})", proc.file_name().to_string_lossy(), comm.trim()));
            }
        }
    }
    found
}

/// A lab of the owner's in `d`, gateway prepared by the owner; `serve` runs as root for the
/// owner (SUDO_UID) with its bridge, in `ns`.
fn owners_lab(ns: &Netns, d: &Path) -> Proc {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    let lab = support::tcg_lab();
    std::fs::write(d.join("kubenet.toml"), lab).unwrap();
    let image = format!("images/ubuntu-24.04-server-cloudimg-{}.img", kubenet_cluster::Arch::HOST.cloud_name());
    std::fs::create_dir_all(d.join("state/images")).unwrap();
    std::fs::create_dir_all(d.join("home")).unwrap();
    support::run(
        Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", &image, "64M"]).current_dir(d.join("state")),
    );
    support::run(Command::new("chown").args(["-R", &format!("{OWNER}:{OWNER}")]).arg(d));
    let out = as_owner(None, d, kubenet_bin(), &["--dir", "state", "setup", "gateway"]);
    assert!(out.status.success(), "{}", text(&out));
    support::serve_for_owner(ns, d)
}

fn link(target: &Path, at: &Path) {
    let _ = std::fs::remove_file(at);
    std::os::unix::fs::symlink(target, at).unwrap();
    support::run(Command::new("chown").args(["-h", &format!("{OWNER}:{OWNER}")]).arg(at));
}

/// A socket of root's that greets its one client as QEMU's QMP does and records what it is
/// then told, within 20 s: a client that took it for QEMU's would answer with
/// `qmp_capabilities`.
const ROOT_LISTENER: &str = "import socket, sys\n\
    s = socket.socket(socket.AF_UNIX)\n\
    s.bind(sys.argv[1])\n\
    s.listen(1)\n\
    s.settimeout(20)\n\
    open(sys.argv[2], 'w').write('listening')\n\
    try:\n\
    \x20   c, _ = s.accept()\n\
    \x20   c.settimeout(3)\n\
    \x20   try:\n\
    \x20       c.sendall(b'{\"QMP\": {\"version\": {}, \"capabilities\": []}}\\r\\n')\n\
    \x20   except OSError:\n\
    \x20       pass\n\
    \x20   data = b''\n\
    \x20   try:\n\
    \x20       while True:\n\
    \x20           d = c.recv(4096)\n\
    \x20           if not d:\n\
    \x20               break\n\
    \x20           data += d\n\
    \x20   except OSError:\n\
    \x20       pass\n\
    \x20   open(sys.argv[2], 'w').write('got %d bytes' % len(data))\n\
    except OSError:\n\
    \x20   open(sys.argv[2], 'w').write('no connection')\n";

/// The uids of a process: real, effective, saved, file system.
fn uids(pid: u64) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix("Uid:")).unwrap().split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Links from the VM's folder to root's files: QEMU's log, the seed, the UEFI variables. Root
/// follows none of them, QEMU (the owner's) opens none of them, and a VM whose folder holds
/// only a link for its log still starts, as the owner, with a log of its own.
#[test]
fn links_in_the_vm_folder_reach_no_file_of_roots() {
    if prerequisites(&["qemu-system-x86_64", "qemu-img", "setpriv", "python3"]).is_some() {
        return;
    }
    let victims = Victims::new();
    let ns = Netns::new("atk");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let agent = owners_lab(&ns, d);
    let vm = d.join("state/gateway");
    let start = r#"{"v":2,"cmd":"start","vms":["gateway"]}"#;

    // Everything at once: the guest would get root's secret as its seed and root's vars as
    // its firmware store, and root would empty its log. QEMU, as the owner, cannot open them.
    let seed = std::fs::read(vm.join("seed.iso")).unwrap();
    link(victims.path("log"), &vm.join("qemu.log"));
    link(victims.path("secret"), &vm.join("seed.iso"));
    link(victims.path("vars"), &vm.join("efi-vars.fd"));
    link(victims.path("log"), &vm.join("console.log"));
    let a = ask(d, start);
    let outcome = &a["ok"]["started"][0];
    assert_eq!(outcome["result"], "failed", "{a}");
    assert!(outcome["error"].as_str().unwrap().contains("Permission denied"), "{a}");
    victims.assert_untouched();

    // Only the log a link: it is replaced by the owner's own file, and the VM runs as the
    // owner, every uid of it.
    for f in ["seed.iso", "efi-vars.fd", "console.log"] {
        std::fs::remove_file(vm.join(f)).unwrap();
    }
    std::fs::write(vm.join("seed.iso"), &seed).unwrap();
    support::run(Command::new("chown").args([&format!("{OWNER}:{OWNER}")]).arg(vm.join("seed.iso")));
    let a = ask(d, start);
    assert_eq!(a["ok"]["started"][0]["result"], "started", "{a}");
    let pid = a["ok"]["started"][0]["pid"].as_u64().unwrap();
    let _qemu = support::KillOnDrop(pid);
    assert_eq!(uids(pid), format!("{OWNER} {OWNER} {OWNER} {OWNER}"));
    for f in ["qemu.log", "console.log", "efi-vars.fd", "qemu.pid"] {
        let m = std::fs::symlink_metadata(vm.join(f)).unwrap();
        assert!(m.is_file() && m.uid() == 65534, "{f}: {m:?}");
    }
    victims.assert_untouched();

    // While it runs, the log becomes a link to root's file, and QMP's socket a link to a
    // socket of root's: `stop` reads through nothing, says nothing to root's socket (its peer
    // is not this VM's QEMU), and the VM stops all the same.
    link(victims.path("log"), &vm.join("qemu.log"));
    let heard = victims.path("log").with_file_name("heard");
    let roots_socket = victims.path("log").with_file_name("root.sock");
    let mut listener =
        Command::new("/usr/bin/python3").args(["-c", ROOT_LISTENER]).args([&roots_socket, &heard]).spawn().unwrap();
    support::wait_file(&heard, "listening", Duration::from_secs(10));
    link(&roots_socket, &vm.join("qmp.sock"));
    let a = ask(d, r#"{"v":2,"cmd":"stop","vms":["gateway"],"grace_secs":1}"#);
    assert_eq!(a["ok"]["stopped"][0]["result"], "terminated", "{a}");
    assert!(!pid_alive(pid));
    let _ = listener.wait();
    assert_eq!(std::fs::read_to_string(&heard).unwrap(), "got 0 bytes", "root's socket was spoken to");
    victims.assert_untouched();
    assert_eq!(ask(d, r#"{"v":2,"cmd":"status"}"#)["ok"]["status"]["vms"], 7);
    agent.stop();
}

/// A pidfile is the owner's to write. One naming a process of root's, even one whose command
/// line holds the pidfile's path as QEMU's does, is not a VM: `stop` signals nothing.
#[test]
fn a_pidfile_naming_a_root_process_is_not_a_vm() {
    if prerequisites(&["qemu-img", "setpriv", "python3"]).is_some() {
        return;
    }
    let ns = Netns::new("atp");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let agent = owners_lab(&ns, d);
    let pidfile = d.join("state/gateway/qemu.pid");
    let mut victim =
        Command::new("python3").args(["-c", "import time; time.sleep(120)"]).arg(&pidfile).spawn().unwrap();
    std::fs::write(&pidfile, victim.id().to_string()).unwrap();
    support::run(Command::new("chown").args([&format!("{OWNER}:{OWNER}")]).arg(&pidfile));
    let vms = ask(d, r#"{"v":2,"cmd":"vms"}"#);
    assert_eq!(vms["ok"]["vms"][0]["state"], "stopped", "{vms}");
    let a = ask(d, r#"{"v":2,"cmd":"stop","vms":["gateway"],"grace_secs":1}"#);
    assert_eq!(a["ok"]["stopped"][0]["result"], "notrunning", "{a}");
    assert!(victim.try_wait().unwrap().is_none(), "root's process was stopped");
    let _ = victim.kill();
    let _ = victim.wait();
    agent.stop();
}

/// The owner edits the network (subnet, host address, range, bridge) and reloads: the agent
/// refuses what would leave the network it started with, takes what is safe, and a DHCP client
/// on the lab's bridge still gets its address on the start-time network.
#[test]
fn a_reload_cannot_move_the_lab_to_another_network() {
    if prerequisites(&["qemu-img", "setpriv", "python3", "udhcpc"]).is_some() {
        return;
    }
    let ns = Netns::new("atr");
    let client = Netns::new("atrc");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let agent = owners_lab(&ns, d);
    let config = d.join("kubenet.toml");
    let original = std::fs::read_to_string(&config).unwrap();
    let edit = |to: String| {
        std::fs::write(&config, to).unwrap();
        let out = as_owner(None, d, kubenet_bin(), &["--dir", "state", "reload"]);
        text(&out)
    };
    // A whole new network: refused, and said why.
    let moved = edit(original.replace("192.168.1.", "10.9.9.").replace("kubenet0", "lan0"));
    assert!(moved.contains("would leave the running subnet 192.168.1.0/24"), "{moved}");
    // The bridge and the DNS upstream alone: taken as warnings, the old values hold.
    let later =
        edit(original.replace("bridge = \"kubenet0\"", "bridge = \"lan0\"").replace("127.0.0.1:9", "127.0.0.1:7"));
    assert!(later.contains("warning: network.bridge changed: it takes effect when kubenet serve restarts"), "{later}");

    // A client on the lab's bridge, as worker0.
    support::veth(&ns, "atv0", &client, "atv1");
    ns.ip(&["link", "set", "atv0", "master", "kubenet0"]);
    client.ip(&["link", "set", "atv1", "address", "52:52:52:00:00:04"]);
    let (_, said) = support::udhcpc_once(&client, "atv1");
    assert!(said.contains("lease of 192.168.1.14 obtained from 192.168.1.1"), "{said}");
    let status = ask(d, r#"{"v":2,"cmd":"status"}"#);
    assert_eq!(status["ok"]["status"]["vms"], 7, "{status}");
    let log = agent.stop();
    assert!(log.contains("reload failed"), "{log}");
}

/// A state directory that is not the owner's (another user's lab: its interfaces are marked
/// with that directory), or that others may write (they could plant what root reads there), is
/// refused before anything is made.
#[test]
fn a_state_directory_not_the_owners_alone_is_refused() {
    if prerequisites(&["setpriv"]).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("kubenet.toml"), support::test_lab()).unwrap();
    let serve = |state: &Path| {
        let port = support::free_port().to_string();
        Command::new(kubenet_bin())
            .current_dir(d)
            .args(["--dir", state.to_str().unwrap(), "serve", "--dns-only", "--no-bridge"])
            .args(["--dns-listen", "127.0.0.1", "--dns-port", &port])
            .env("SUDO_UID", OWNER)
            .env("SUDO_GID", OWNER)
            .env_remove("KUBENET_CONFIG")
            .output()
            .unwrap()
    };
    // root's folder, for owner 65534.
    let roots = d.join("roots");
    std::fs::create_dir(&roots).unwrap();
    let out = serve(&roots);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("belongs to uid 0, not to the lab's owner (uid 65534)"), "{}", text(&out));
    // The owner's, but world-writable.
    let open = d.join("open");
    std::fs::create_dir(&open).unwrap();
    support::run(Command::new("chown").args([&format!("{OWNER}:{OWNER}")]).arg(&open));
    support::run(Command::new("chmod").args(["0777"]).arg(&open));
    support::run(Command::new("chmod").args(["0755"]).arg(d));
    let out = serve(&open);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("can be written by others than its owner (mode 777)"), "{}", text(&out));
}

/// The owner puts a socket of their own where the agent's will be, answering with an endless
/// line: serve's start-up check ("is one running already?") reads at most 64 KiB of it within
/// 5 s, as the owner, and serve refuses to start beside it instead of filling its memory.
#[test]
fn a_fake_agent_socket_cannot_fill_serves_memory() {
    if prerequisites(&["setpriv", "python3"]).is_some() {
        return;
    }
    const ENDLESS: &str = "import socket, sys\n\
        s = socket.socket(socket.AF_UNIX)\n\
        s.bind(sys.argv[1])\n\
        s.listen(4)\n\
        s.settimeout(30)\n\
        try:\n\
        \x20   while True:\n\
        \x20       c, _ = s.accept()\n\
        \x20       c.settimeout(10)\n\
        \x20       try:\n\
        \x20           for _ in range(64 * 1024):\n\
        \x20               c.sendall(b'x' * 4096)\n\
        \x20       except OSError:\n\
        \x20           pass\n\
        except OSError:\n\
        \x20   pass\n";
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(d.join("kubenet.toml"), support::test_lab()).unwrap();
    std::fs::create_dir(d.join("state")).unwrap();
    support::run(Command::new("chown").args(["-R", &format!("{OWNER}:{OWNER}")]).arg(d));
    let sock = d.join("state/kubenet.sock");
    let mut fake = Command::new("setpriv")
        .args([&format!("--reuid={OWNER}"), &format!("--regid={OWNER}"), "--clear-groups", "--"])
        .args(["/usr/bin/python3", "-c", ENDLESS])
        .arg(&sock)
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "the fake socket did not appear");
        std::thread::sleep(Duration::from_millis(50));
    }
    let port = support::free_port().to_string();
    let mut serve = Command::new(kubenet_bin());
    serve
        .current_dir(d)
        .args([
            "--dir",
            "state",
            "serve",
            "--dns-only",
            "--no-bridge",
            "--dns-listen",
            "127.0.0.1",
            "--dns-port",
            &port,
        ])
        .env("SUDO_UID", OWNER)
        .env("SUDO_GID", OWNER)
        .env_remove("KUBENET_CONFIG");
    let log = d.join("serve.log");
    let mut agent = Proc::spawn(serve, &log);
    let began = std::time::Instant::now();
    let mut peak_kb = 0u64;
    let status = loop {
        let hwm = std::fs::read_to_string(format!("/proc/{}/status", agent.child.id())).unwrap_or_default();
        let kb = hwm
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok());
        peak_kb = peak_kb.max(kb.unwrap_or(0));
        if let Some(status) = agent.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "serve still runs beside a fake agent:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = fake.kill();
    let _ = fake.wait();
    assert!(!status.success(), "{}", agent.log_text());
    assert!(agent.log_text().contains("another kubenet serve is running"), "{}", agent.log_text());
    assert!(peak_kb < 64 * 1024, "serve's peak RSS reached {peak_kb} kB");
}
