//! kubenet's VM side against real tools: the files `kubenet setup` writes, read back by
//! qemu-img, isoinfo, cloud-init, ssh and ssh-keygen; the host-key fetch against a real sshd on
//! loopback; and QEMU processes started, found again and stopped by `kubenet serve` inside a
//! namespace the test creates (TCG, no guest OS: the firmware runs and finds nothing to boot).

#[path = "support/mod.rs"]
mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use support::{Netns, kubenet_bin, pid_alive, prerequisites, serve, tools};

/// The reference lab's default image for this host's guests (`{arch}` = amd64 or arm64).
fn default_image() -> String {
    format!("images/ubuntu-24.04-server-cloudimg-{}.img", kubenet_cluster::Arch::HOST.cloud_name())
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

/// A lab definition in `d` and a small qcow2 base image in the state directory `state`.
fn lab_dir(d: &Path, state: &Path, lab: &str) {
    std::fs::write(d.join("kubenet.toml"), lab).unwrap();
    std::fs::create_dir_all(state.join("images")).unwrap();
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", &default_image(), "64M"])
        .current_dir(state)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

fn kubenet(d: &Path, args: &[&str]) -> Output {
    kubenet_cmd(Command::new(kubenet_bin()), d, args)
}

fn kubenet_cmd(mut c: Command, d: &Path, args: &[&str]) -> Output {
    c.args(args).current_dir(d).env("HOME", d.join("home")).env_remove("KUBENET_CONFIG").output().unwrap()
}

fn ok(o: Output) -> String {
    assert!(o.status.success(), "{}", text(&o));
    text(&o)
}

#[test]
fn setup_writes_files_real_tools_accept() {
    if tools(&["qemu-img", "isoinfo", "cloud-init", "ssh", "ssh-keygen"]).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    lab_dir(d, d, &support::test_lab());
    let out = ok(kubenet(d, &["setup", "gateway", "worker0"]));
    assert!(out.contains("worker0    host key made, disk created, seed written"), "{out}");

    // The overlay: qcow2 on the base image by a relative path, the configured size.
    let info = ok(Command::new("qemu-img")
        .args(["info", "--output=json", "worker0/disk.img"])
        .current_dir(d)
        .output()
        .unwrap());
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["backing-filename"], format!("../{}", default_image()));
    assert_eq!(info["virtual-size"], 20u64 << 30);
    assert_eq!(info["format"], "qcow2");

    // The seed: volume id cidata, both files under their Rock Ridge and Joliet names, and the
    // user-data cloud-init itself accepts.
    let seed = d.join("worker0/seed.iso");
    let seed = seed.to_str().unwrap();
    let desc = ok(Command::new("isoinfo").args(["-d", "-i", seed]).output().unwrap());
    assert!(desc.contains("Volume id: cidata") && desc.contains("Rock Ridge") && desc.contains("Joliet"), "{desc}");
    assert!(!desc.contains("Warning"), "{desc}");
    let rr = ok(Command::new("isoinfo").args(["-R", "-f", "-i", seed]).output().unwrap());
    assert!(rr.lines().any(|l| l == "/meta-data") && rr.lines().any(|l| l == "/user-data"), "{rr}");
    let user_data = Command::new("isoinfo").args(["-J", "-x", "/user-data", "-i", seed]).output().unwrap().stdout;
    std::fs::write(d.join("user-data"), &user_data).unwrap();
    let schema = text(&Command::new("cloud-init").args(["schema", "-c"]).arg(d.join("user-data")).output().unwrap());
    assert!(schema.contains("Valid cloud-config"), "{schema}");
    let meta = text(&Command::new("isoinfo").args(["-J", "-x", "/meta-data", "-i", seed]).output().unwrap());
    assert!(meta.contains("local-hostname: worker0"), "{meta}");

    // known_hosts holds the key the VM was given, under its name; ssh_config points there.
    let found =
        ok(Command::new("ssh-keygen").args(["-F", "worker0", "-f"]).arg(d.join("known_hosts")).output().unwrap());
    let public = std::fs::read_to_string(d.join("worker0/ssh_host_ed25519_key.pub")).unwrap();
    let key_b64 = public.split_whitespace().nth(1).unwrap();
    assert!(found.contains(key_b64), "{found}");
    let g = ok(Command::new("ssh").args(["-G", "-F"]).arg(d.join("ssh_config")).arg("worker0").output().unwrap());
    for want in ["hostname 192.168.1.14", "user kube", "stricthostkeychecking true", "hostkeyalias worker0"] {
        assert!(g.lines().any(|l| l == want), "{want} missing:\n{g}");
    }
    assert!(g.contains(&format!("userknownhostsfile {}", d.join("known_hosts").display())), "{g}");
    assert!(
        g.contains(&format!("identityfile {}", d.join("id_ed25519").display())),
        "a lab key, as HOME has none:\n{g}"
    );

    // Again: disk and key kept.
    let ino = |p: &str| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(d.join(p)).unwrap());
    let disk_before = ino("worker0/disk.img");
    let out = ok(kubenet(d, &["setup", "worker0"]));
    assert!(out.contains("worker0    disk kept, seed written"), "{out}");
    assert_eq!(ino("worker0/disk.img"), disk_before);
    assert_eq!(std::fs::read_to_string(d.join("worker0/ssh_host_ed25519_key.pub")).unwrap(), public);

    // reset: a fresh disk next time, the same host key.
    ok(kubenet(d, &["reset", "worker0"]));
    assert!(!d.join("worker0/disk.img").exists());
    assert!(ok(kubenet(d, &["setup", "worker0"])).contains("disk created"));
    assert_eq!(std::fs::read_to_string(d.join("worker0/ssh_host_ed25519_key.pub")).unwrap(), public);

    // A disk smaller than its base image (64 MiB here; Ubuntu's is 3.5 GiB) would give the guest
    // a cut file system: refused, naming both sizes, and no disk is made.
    let small = support::test_lab().replace("disk = \"20G\"", "disk = \"10M\"");
    std::fs::write(d.join("kubenet.toml"), &small).unwrap();
    let out = kubenet(d, &["setup", "control0"]);
    let err = text(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "control0: disk = 10MiB is smaller than its base image {} (64MiB)",
            d.join(default_image()).display()
        )) && err.contains("set the group's `disk` to at least 64MiB"),
        "{err}"
    );
    assert!(!d.join("control0/disk.img").exists());
    std::fs::write(d.join("kubenet.toml"), support::test_lab()).unwrap();

    // A missing base image says where to put which image.
    std::fs::remove_file(d.join(default_image())).unwrap();
    let err = text(&kubenet(d, &["setup", "control0"]));
    assert!(
        err.contains(&format!("{} does not exist: run `kubenet image pull`", d.join(default_image()).display())),
        "{err}"
    );
    assert!(err.contains("noble/current/noble-server-cloudimg-amd64.img"), "{err}");

    // destroy: everything but the images folder and the lab definition.
    let err = text(&kubenet(d, &["destroy"]));
    assert!(err.contains("pass --yes"), "{err}");
    ok(kubenet(d, &["destroy", "--yes"]));
    for gone in ["worker0", "gateway", "known_hosts", "ssh_config", "id_ed25519"] {
        assert!(!d.join(gone).exists(), "{gone} left");
    }
    assert!(d.join("images").is_dir() && d.join("kubenet.toml").is_file());
}

/// A setup (or up) that cannot succeed makes nothing first: no host keys, no lab key, no
/// folders, not even the state directory.
#[test]
fn a_failed_setup_leaves_nothing_behind() {
    if tools(&["qemu-img"]).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("kubenet.toml"), support::test_lab()).unwrap();
    let listing = || {
        let mut v: Vec<String> =
            std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    };
    for cmd in [&["setup"][..], &["up", "--timeout", "1"]] {
        let out = kubenet(d, &[&["--dir", "."][..], cmd].concat());
        let err = text(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("does not exist: run `kubenet image pull`"), "{err}");
        assert_eq!(listing(), ["kubenet.toml"], "{cmd:?} left files behind");
    }
    // A VM that asks for more memory than any host has: `up` warns before anything starts.
    std::fs::write(d.join("kubenet.toml"), support::test_lab().replace("memory = \"8G\"", "memory = \"4T\"")).unwrap();
    let err = text(&kubenet(d, &["--dir", ".", "up", "worker0", "--timeout", "1"]));
    assert!(err.contains("warning: worker0 asks for 4096.0 GiB of memory, more than this host's "), "{err}");
    assert_eq!(listing(), ["kubenet.toml"]);
    // One VM of several with an image that is too small for it: still nothing made.
    lab_dir(d, d, &support::test_lab().replace("disk = \"20G\"", "disk = \"10M\""));
    let err = text(&kubenet(d, &["setup"]));
    assert!(err.contains("is smaller than its base image"), "{err}");
    assert_eq!(listing(), ["images", "kubenet.toml"]);
    // A state directory that does not exist is not made on the way to failing.
    let nowhere = d.join("not/yet/here");
    let out = kubenet(d, &["--dir", nowhere.to_str().unwrap(), "setup"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(!d.join("not").exists(), "{}", text(&out));
}

#[test]
fn the_host_key_fetch_sees_what_sshd_presents() {
    if prerequisites(&["sshd", "ssh-keygen"]).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("ssh_host_ed25519_key");
    let made = kubenet_vm::keys::load_or_create(&key, "test").unwrap();
    // sshd insists on its privilege separation directory.
    std::fs::create_dir_all("/run/sshd").unwrap();
    let port = support::free_port();
    let mut cmd = Command::new(support::which("sshd").unwrap());
    cmd.args([
        "-D",
        "-e",
        "-f",
        "/dev/null",
        "-o",
        "PidFile=none",
        "-o",
        &format!("ListenAddress=127.0.0.1:{port}"),
        "-h",
    ])
    .arg(&key);
    let mut sshd = support::Proc::spawn(cmd, &dir.path().join("sshd.log"));
    sshd.wait_for("Server listening", Duration::from_secs(10));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let seen = rt.block_on(kubenet_vm::keys::fetch_host_key(addr, Duration::from_secs(5))).unwrap();
    assert_eq!(seen.key_data(), made.public_key().key_data());
    let other = kubenet_vm::keys::generate("other").unwrap();
    assert_ne!(seen.key_data(), other.public_key().key_data());
    // Nothing listens: a prompt error, not a hang.
    drop(sshd);
    let err = rt.block_on(kubenet_vm::keys::fetch_host_key(addr, Duration::from_secs(5))).unwrap_err();
    assert!(err.to_string().contains("127.0.0.1"), "{err}");
}

fn status(ns: &Netns, d: &Path) -> serde_json::Value {
    let out = ok(kubenet_cmd(ns.cmd(kubenet_bin()), d, &["--dir", "state", "status", "--json"]));
    serde_json::from_str(&out).unwrap()
}

/// A VM's folder holds its private host key and the seed carrying it: another local user can
/// read none of it (checked as uid 65534 with setpriv), nor the lab key. A lab whose modes are
/// wider (made by an older kubenet) is set right by the next `setup`. And QEMU running as the
/// lab's owner still opens the disk (with its backing image) and the seed.
#[test]
fn another_user_can_read_no_vm_secret() {
    if tools(&["qemu-img", "setpriv"]).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Only kubenet's own modes may protect the files: the test's folder is open to all.
    use std::os::unix::fs::PermissionsExt;
    let chmod = |p: &Path, mode: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    let mode = |p: &str| std::fs::metadata(d.join(p)).unwrap().permissions().mode() & 0o777;
    chmod(d, 0o755);
    lab_dir(d, d, &support::test_lab());
    ok(kubenet(d, &["setup", "worker0"]));
    let private = ["worker0/seed.iso", "worker0/ssh_host_ed25519_key", "worker0/disk.img", "id_ed25519"];
    let check = || {
        assert_eq!(mode("worker0"), 0o700);
        for f in private {
            assert_eq!(mode(f), 0o600, "{f}");
        }
        let nobody = |args: &[&str]| {
            Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
                .args(args)
                .current_dir("/")
                .output()
                .unwrap()
        };
        for f in private {
            let out = nobody(&["cat", d.join(f).to_str().unwrap()]);
            assert!(!out.status.success() && text(&out).contains("Permission denied"), "{f}: {}", text(&out));
        }
        let out = nobody(&["ls", d.join("worker0").to_str().unwrap()]);
        assert!(!out.status.success() && text(&out).contains("Permission denied"), "{}", text(&out));
        // The public half and the lab's known_hosts stay readable: they are meant to be shared.
        assert!(nobody(&["cat", d.join("known_hosts").to_str().unwrap()]).status.success());
    };
    check();
    // An older lab: everything readable. The next setup closes it again, disk kept.
    chmod(&d.join("worker0"), 0o755);
    for f in private {
        chmod(&d.join(f), 0o644);
    }
    let out = ok(kubenet(d, &["setup", "worker0"]));
    assert!(out.contains("worker0    disk kept, seed written"), "{out}");
    check();

    // The lab handed to uid 65534, as if that user had made it: QEMU as that user opens the
    // overlay through to its base image, and the seed; as any other user it cannot.
    let out = Command::new("chown").args(["-R", "65534:65534"]).arg(d).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let qemu_img_as = |uid: &str, file: &str| {
        Command::new("setpriv")
            .args([&format!("--reuid={uid}"), &format!("--regid={uid}"), "--clear-groups", "--"])
            .args(["qemu-img", "info", "--backing-chain", "-U"])
            .arg(d.join(file))
            .current_dir("/")
            .output()
            .unwrap()
    };
    let owner = text(&qemu_img_as("65534", "worker0/disk.img"));
    assert!(owner.contains("file format: qcow2") && owner.contains("backing file: ../images/"), "{owner}");
    // (--backing-chain: the base image was opened too, and described after the overlay.)
    assert!(owner.contains(&format!("image: {}/worker0/../{}", d.display(), default_image())), "{owner}");
    assert!(qemu_img_as("65534", "worker0/seed.iso").status.success());
    let stranger = qemu_img_as("65533", "worker0/disk.img");
    assert!(!stranger.status.success() && text(&stranger).contains("Permission denied"), "{}", text(&stranger));
}

/// QEMU reads a comma as the end of an option's value: a lab whose folder has a comma (and a
/// space) in its path still starts, with its disk, console and QMP where they belong.
#[test]
fn qemu_starts_from_a_folder_whose_path_has_a_comma_and_a_space() {
    if prerequisites(&["qemu-system-x86_64", "qemu-img"]).is_some() {
        return;
    }
    let ns = Netns::new("vmc");
    let dir = tempfile::Builder::new().prefix("kubenet, a lab ").tempdir().unwrap();
    let d = dir.path();
    let lab = support::tcg_lab();
    lab_dir(d, &d.join("state"), &lab);
    let agent = serve(&ns, d, &[]);
    let cli = |args: &[&str]| kubenet_cmd(ns.cmd(kubenet_bin()), d, &[&["--dir", "state"][..], args].concat());
    let t = text(&cli(&["up", "gateway", "--timeout", "2"]));
    assert!(t.contains("gateway    started (pid "), "{t}");
    let s = status(&ns, d);
    assert_eq!(s[0]["state"], "running", "{s}");
    let pid = s[0]["pid"].as_u64().unwrap();
    let cmdline = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap()).into_owned();
    let vm = d.join("state/gateway").display().to_string();
    assert!(cmdline.contains(&format!("file={}/disk.img\0", vm.replace(',', ",,"))), "{cmdline}");
    // QEMU made its sockets and console log in the real folder, and answers on its QMP socket.
    for f in ["console.log", "serial.sock", "qmp.sock"] {
        assert!(d.join("state/gateway").join(f).exists(), "{f} missing in {vm}");
    }
    let out = ok(cli(&["down", "--grace", "1"]));
    assert!(out.contains("gateway    stopped"), "{out}");
    assert!(!pid_alive(pid));
    agent.stop();
}

/// Alive and not a zombie (a daemonized QEMU's parent is init, which reaps it when it will).
#[test]
fn serve_starts_finds_again_and_stops_qemu() {
    if prerequisites(&["qemu-system-x86_64", "qemu-img"]).is_some() {
        return;
    }
    let ns = Netns::new("vm");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let lab = support::tcg_lab();
    // serve() keeps the lab's state in d/state; every command here is told the same.
    lab_dir(d, &d.join("state"), &lab);
    let agent = serve(&ns, d, &[]);
    let cli = |args: &[&str]| kubenet_cmd(ns.cmd(kubenet_bin()), d, &[&["--dir", "state"][..], args].concat());
    let up = |args: &[&str]| cli(&[&["up", "gateway"][..], args].concat());
    // `up` prepares, starts, and (no OS in this image) times out waiting for a lease, showing
    // the console's last lines.
    let out = up(&["--timeout", "3"]);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("gateway    started (pid ") && t.contains("1 of 1 VMs not ready after 3 s: gateway"), "{t}");
    let header = format!(
        "--- gateway (an {} guest, image {}): last console lines ---",
        kubenet_cluster::Arch::HOST,
        d.join("state").join(default_image()).display()
    );
    assert!(t.contains(&header), "{t}");
    let s = status(&ns, d);
    assert_eq!(s[0]["name"], "gateway");
    assert_eq!(s[0]["state"], "running");
    let pid = s[0]["pid"].as_u64().unwrap();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(String::from_utf8_lossy(&cmdline).contains("qemu-system-x86_64\0-name\0gateway\0-machine\0q35,accel=tcg"));
    assert_eq!(s[1]["state"], "stopped");

    // The agent stops; the VM does not. A new agent finds it and does not start a second one.
    agent.stop();
    assert!(pid_alive(pid), "stopping serve must not stop the VMs");
    let agent = serve(&ns, d, &[]);
    assert_eq!(status(&ns, d)[0]["pid"].as_u64(), Some(pid));
    let t = text(&up(&["--timeout", "1"]));
    assert!(t.contains(&format!("gateway    running (pid {pid})")), "{t}");

    // down: the firmware ignores the ACPI request, so QEMU is stopped after the grace time.
    let out = ok(cli(&["down", "--grace", "2"]));
    assert!(out.contains("gateway    stopped (SIGTERM after the grace time)"), "{out}");
    assert!(out.contains("worker0    not running"), "{out}");
    assert!(!pid_alive(pid));
    assert_eq!(status(&ns, d)[0]["state"], "stopped");

    // A QEMU that dies while `up` waits ends the wait at once, with its console and its log,
    // rather than at the timeout.
    let mut c = ns.cmd(kubenet_bin());
    c.args(["--dir", "state", "up", "gateway", "--timeout", "300"])
        .current_dir(d)
        .env("HOME", d.join("home"))
        .env_remove("KUBENET_CONFIG");
    let mut waiting = support::Proc::spawn(c, &d.join("up.log"));
    // Killed once `up` says it started, and so waits: not as soon as the pidfile exists, which
    // QEMU writes before it builds the machine, while the agent still waits for it to daemonize.
    waiting.wait_for("gateway    started (pid ", Duration::from_secs(30));
    let pid = status(&ns, d)[0]["pid"].as_u64().unwrap();
    assert!(Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap().success());
    let killed = std::time::Instant::now();
    let code = loop {
        if let Some(code) = waiting.child.try_wait().unwrap() {
            break code;
        }
        assert!(killed.elapsed() < Duration::from_secs(20), "up still waits: {}", waiting.log_text());
        std::thread::sleep(Duration::from_millis(100));
    };
    let t = waiting.log_text();
    assert!(!code.success(), "{t}");
    assert!(t.contains("1 of 1 VMs QEMU exited: gateway"), "{t}");
    assert!(t.contains(&header) && t.contains("--- gateway: qemu.log ---"), "{t}");
    let log = agent.stop();
    assert!(log.contains("VM started") || log.contains("VM stopped"), "{log}");
}

/// Stands in for QEMU's serial socket: its command line holds the VM's pidfile path (as
/// QEMU's does, which is how kubenet knows it for that VM's), it writes its pid there, and
/// answers each chunk on the socket with the chunk in capitals, for one connection.
const FAKE_SERIAL: &str = r#"
import os, socket, sys
pidfile, path = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX)
s.bind(path)
s.listen(1)
open(pidfile, "w").write(str(os.getpid()))
print("listening", flush=True)
c, _ = s.accept()
while True:
    data = c.recv(100)
    if not data:
        break
    c.sendall(data.upper())
"#;

/// `kubenet console` from a script: what is typed reaches the VM's serial socket, what comes
/// back reaches standard output, and the end of input detaches.
#[test]
fn console_relays_both_ways() {
    if tools(&["python3"]).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    lab_dir(d, d, &support::test_lab());
    let err = text(&kubenet(d, &["console", "worker0"]));
    assert!(err.contains("worker0 is not running: start it with `kubenet up worker0`"), "{err}");
    std::fs::create_dir_all(d.join("worker0")).unwrap();
    let mut cmd = Command::new("python3");
    cmd.args(["-u", "-c", FAKE_SERIAL]).arg(d.join("worker0/qemu.pid")).arg(d.join("worker0/serial.sock"));
    let mut serial = support::Proc::spawn(cmd, &d.join("serial.log"));
    serial.wait_for("listening", Duration::from_secs(10));
    let mut c = Command::new(kubenet_bin());
    c.args(["console", "worker0"]).current_dir(d).env("HOME", d).env_remove("KUBENET_CONFIG");
    let shown = support::converse(c, b"hello vm\n", "HELLO VM", Duration::from_secs(20));
    assert!(shown.starts_with("HELLO VM\n"), "{shown:?}");
}

/// `up` against an impostor: a namespace with worker0's MAC takes worker0's lease from
/// `serve` and runs sshd at its address with a key kubenet did not make. `up` must stop with a
/// loud error naming the VM, the address and the key's fingerprint, not trust what it finds.
#[test]
fn up_refuses_an_ssh_server_with_a_foreign_host_key() {
    if prerequisites(&["qemu-system-x86_64", "qemu-img", "udhcpc", "sshd", "ssh-keygen"]).is_some() {
        return;
    }
    let p = support::pair("imp", "192.168.1.1/24");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let lab = support::tcg_lab();
    lab_dir(d, &d.join("state"), &lab);
    // --no-bridge: the QEMU started below gets a tap of its own, on nothing, so the impostor
    // is the only worker0 on the wire.
    let agent = serve(&p.server, d, &[]);
    p.client.ip(&["link", "set", "knc", "address", "52:52:52:00:00:04"]);
    let (_, said) = support::udhcpc_once(&p.client, "knc");
    assert!(said.contains("lease of 192.168.1.14 obtained"), "{said}");
    p.client.ip(&["addr", "add", "192.168.1.14/24", "dev", "knc"]);
    let key = d.join("impostor_key");
    let impostor = kubenet_vm::keys::load_or_create(&key, "impostor").unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap();
    let mut cmd = p.client.cmd(support::which("sshd").unwrap().to_str().unwrap());
    cmd.args(["-D", "-e", "-f", "/dev/null", "-o", "PidFile=none", "-o", "ListenAddress=192.168.1.14:22", "-h"])
        .arg(&key);
    let mut sshd = support::Proc::spawn(cmd, &d.join("sshd.log"));
    sshd.wait_for("Server listening", Duration::from_secs(10));

    let cli = |args: &[&str]| kubenet_cmd(p.server.cmd(kubenet_bin()), d, &[&["--dir", "state"][..], args].concat());
    let out = cli(&["up", "worker0", "--timeout", "60"]);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("worker0    lease 192.168.1.14 ("), "{t}");
    let fingerprint = impostor.public_key().fingerprint(Default::default()).to_string();
    assert!(
        t.contains(&format!(
            "worker0: the SSH server at 192.168.1.14:22 presents a host key kubenet did not give it ({fingerprint})"
        )),
        "{t}"
    );
    assert!(!t.contains("ssh ready"), "{t}");
    ok(cli(&["down", "worker0", "--grace", "1"]));
    drop(sshd);
    agent.stop();
}

/// An HTTP server on a free loopback port, `python3 ARGS... PORT`, once it accepts.
fn http_server(args: &[&str], log: &Path) -> (support::Proc, u16) {
    let port = support::free_port();
    let mut cmd = Command::new("python3");
    cmd.args(args).arg(port.to_string());
    let p = support::Proc::spawn(cmd, log);
    let start = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < Duration::from_secs(10), "{args:?} did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    (p, port)
}

/// The image file name as Ubuntu names them, for this CPU.
/// The files in the lab's images folder, sorted.
fn image_files(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d.join("images"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn file_of(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

fn published_name() -> String {
    format!("noble-server-cloudimg-{}.img", kubenet_cluster::Arch::HOST.cloud_name())
}

/// The "publisher": in `site`, an image (3,000,000 bytes that depend on `seed`) and its
/// SHA256SUMS made by sha256sum. Returns the image.
fn publish(site: &Path, seed: u32) -> Vec<u8> {
    let file = published_name();
    let image: Vec<u8> = (0..3_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761 ^ seed) >> 24) as u8).collect();
    std::fs::write(site.join(&file), &image).unwrap();
    let sums = ok(Command::new("sha256sum").arg("--binary").arg(&file).current_dir(site).output().unwrap());
    std::fs::write(site.join("SHA256SUMS"), sums).unwrap();
    image
}

/// `d/kubenet.toml`: the test lab, its images from the server on loopback `port`.
fn lab_pulling_from(d: &Path, port: u16) {
    let default = "image = \"images/ubuntu-24.04-server-cloudimg-{arch}.img\"";
    let lab = support::test_lab().replace(
        default,
        &format!("{default}\nimage_url = \"http://127.0.0.1:{port}/noble-server-cloudimg-{{arch}}.img\""),
    );
    std::fs::write(d.join("kubenet.toml"), lab).unwrap();
}

#[test]
fn image_pull_verifies_against_the_publishers_sums() {
    if tools(&["python3", "sha256sum"]).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let site = d.join("site");
    std::fs::create_dir_all(&site).unwrap();
    let file = published_name();
    let image = publish(&site, 0);
    let http = ["-m", "http.server", "--bind", "127.0.0.1", "--directory", site.to_str().unwrap()];
    let (_server, port) = http_server(&http, &d.join("http.log"));
    lab_pulling_from(d, port);
    let target = d.join(default_image());

    // Missing: setup names the command; pull fetches and verifies.
    let err = text(&kubenet(d, &["setup", "gateway"]));
    assert!(err.contains("run `kubenet image pull`") && err.contains(&format!("127.0.0.1:{port}/{file}")), "{err}");
    let out = ok(kubenet(d, &["image", "pull"]));
    assert!(out.contains("downloaded 2.9 MiB, SHA-256 verified"), "{out}");
    assert_eq!(std::fs::read(&target).unwrap(), image);
    assert!(ok(kubenet(d, &["image", "pull"])).contains("up to date"));
    // The hash it verified, beside the image in sha256sum's format (for `kubenet doctor`).
    let sums = format!("{}.sha256", file_of(&target));
    let check = Command::new("sha256sum").args(["-c", &sums]).current_dir(target.parent().unwrap()).output().unwrap();
    assert!(check.status.success() && text(&check).contains(": OK"), "{}", text(&check));

    // A sums file that disagrees: refused, the image in place untouched, no partial file left.
    std::fs::write(site.join("SHA256SUMS"), format!("{} *{file}\n", "0".repeat(64))).unwrap();
    let out = kubenet(d, &["image", "pull"]);
    let err = text(&out);
    assert!(!out.status.success() && err.contains("does not match the expected 0000"), "{err}");
    assert!(err.contains("SHA256SUMS") && err.contains("left as it was"), "{err}");
    assert_eq!(std::fs::read(&target).unwrap(), image, "a failed pull changes nothing");
    assert_eq!(image_files(d), [file_of(&target), file_of(&target) + ".sha256"]);

    // Not listed at all, and a server that is not there: clear errors.
    std::fs::write(site.join("SHA256SUMS"), format!("{} *other.img\n", "0".repeat(64))).unwrap();
    let err = text(&kubenet(d, &["image", "pull"]));
    assert!(err.contains(&format!("lists no SHA-256 for {file}")), "{err}");
    drop(_server);
    let err = text(&kubenet(d, &["image", "pull"]));
    // The image and its VMs are named first, and the way around the missing file.
    assert!(
        err.contains(&format!("cannot check http://127.0.0.1:{port}/{file} (the image of gateway, control0"))
            && err.contains(&format!("checksums at http://127.0.0.1:{port}/SHA256SUMS cannot be read"))
            && err.contains("set the group's `image_sha256`"),
        "{err}"
    );
}

/// An HTTP server on loopback for resumed downloads: serves the files of its folder, honours
/// `Range: bytes=N-` with 206 unless the folder's `control` file says `noranges`, and when
/// `control` says `cut N` ends the next whole-file answer after N bytes (Content-Length still
/// the whole size), as a dropped connection would. Logs each request's range.
const RANGE_SERVER: &str = r#"
import http.server, os, sys
root = sys.argv[1]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        path = os.path.join(root, os.path.basename(self.path))
        if not os.path.isfile(path):
            self.send_error(404); return
        data = open(path, "rb").read()
        ctl = open(os.path.join(root, "control")).read().split()
        rng = self.headers.get("Range")
        print("GET", self.path, "range", rng, flush=True)
        if rng and "noranges" not in ctl:
            start = int(rng.split("=")[1].rstrip("-"))
            if start >= len(data):
                self.send_response(416); self.send_header("Content-Range", "bytes */%d" % len(data))
                self.send_header("Content-Length", "0"); self.end_headers(); return
            self.send_response(206)
            self.send_header("Content-Range", "bytes %d-%d/%d" % (start, len(data) - 1, len(data)))
            self.send_header("Content-Length", str(len(data) - start)); self.end_headers()
            self.wfile.write(data[start:]); return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data))); self.end_headers()
        if "cut" in ctl and path.endswith(".img"):
            n = int(ctl[ctl.index("cut") + 1])
            open(os.path.join(root, "control"), "w").write("")
            self.wfile.write(data[:n]); self.wfile.flush()
            self.close_connection = True; return
        self.wfile.write(data)
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[2])), H).serve_forever()
"#;

#[test]
fn image_pull_resumes_a_cut_download() {
    if tools(&["python3", "sha256sum"]).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let site = d.join("site");
    std::fs::create_dir_all(&site).unwrap();
    let file = published_name();
    // A new image and sums, and what the server does next (see RANGE_SERVER).
    let publish = |seed: u32, control: &str| {
        let image = publish(&site, seed);
        std::fs::write(site.join("control"), control).unwrap();
        image
    };
    std::fs::write(site.join("control"), "").unwrap();
    let (server, port) = http_server(&["-u", "-c", RANGE_SERVER, site.to_str().unwrap()], &d.join("http.log"));
    lab_pulling_from(d, port);
    let target = d.join(default_image());
    let part =
        d.join(format!("images/.ubuntu-24.04-server-cloudimg-{}.img.part", kubenet_cluster::Arch::HOST.cloud_name()));
    let image_requests =
        || server.log_text().lines().filter(|l| l.contains(".img")).map(str::to_owned).collect::<Vec<_>>();

    // Cut after 1,000,000 bytes: an error that says what is kept and how to go on.
    let image = publish(1, "cut 1000000");
    let out = kubenet(d, &["image", "pull"]);
    let err = text(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("the first 1000000 bytes are kept") && err.contains("again resumes"), "{err}");
    assert_eq!(std::fs::metadata(&part).unwrap().len(), 1_000_000);
    assert!(!target.exists());
    // Again: only the rest is asked for, and the whole is verified.
    let out = ok(kubenet(d, &["image", "pull"]));
    assert!(out.contains("downloaded 2.9 MiB (resumed at 1.0 MiB), SHA-256 verified"), "{out}");
    assert_eq!(std::fs::read(&target).unwrap(), image);
    assert_eq!(image_requests().last().unwrap(), &format!("GET /{file} range bytes=1000000-"));
    assert_eq!(image_files(d), [file_of(&target), file_of(&target) + ".sha256"], "no .part or stamp left");

    // A part left by an image the publisher has since replaced is not resumed.
    publish(2, "cut 500000");
    assert!(!kubenet(d, &["image", "pull"]).status.success());
    assert_eq!(std::fs::metadata(&part).unwrap().len(), 500_000);
    let image = publish(3, "");
    let n = image_requests().len();
    assert!(ok(kubenet(d, &["image", "pull"])).contains("downloaded 2.9 MiB, SHA-256 verified"));
    assert_eq!(image_requests()[n..], [format!("GET /{file} range None")]);
    assert_eq!(std::fs::read(&target).unwrap(), image);

    // A server that ignores ranges answers the whole file: taken from the start, still right.
    publish(4, "cut 700000");
    assert!(!kubenet(d, &["image", "pull"]).status.success());
    std::fs::write(site.join("control"), "noranges").unwrap();
    let n = image_requests().len();
    let out = ok(kubenet(d, &["image", "pull"]));
    assert!(out.contains("downloaded 2.9 MiB, SHA-256 verified"), "{out}");
    assert_eq!(image_requests()[n..], [format!("GET /{file} range bytes=700000-")], "one request, its 200 used");
    assert_eq!(std::fs::read(&target).unwrap(), publish(4, ""));
}

#[test]
fn tmux_builds_the_tutorials_layout_headless() {
    if tools(&["tmux", "python3"]).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    lab_dir(d, d, &support::test_lab());
    // A tmux server of this test's own (its socket under TMUX_TMPDIR), ended by the guard.
    let sockets = d.join("tmux");
    std::fs::create_dir_all(&sockets).unwrap();
    let tmux = |args: &[&str]| {
        let o = Command::new("tmux").args(args).env("TMUX_TMPDIR", &sockets).env_remove("TMUX").output().unwrap();
        ok(o)
    };
    struct KillServer<'a>(&'a Path);
    impl Drop for KillServer<'_> {
        fn drop(&mut self) {
            let _ = Command::new("tmux").arg("kill-server").env("TMUX_TMPDIR", self.0).env_remove("TMUX").output();
        }
    }
    let _server = KillServer(&sockets);
    let run = || {
        let mut c = Command::new(kubenet_bin());
        c.env("TMUX_TMPDIR", &sockets).env_remove("TMUX");
        ok(kubenet_cmd(c, d, &["tmux", "lab"]))
    };
    // Nothing set up, nothing running: no session of 14 empty panes, but why and what to do.
    let mut c = Command::new(kubenet_bin());
    c.env("TMUX_TMPDIR", &sockets).env_remove("TMUX");
    let err = text(&kubenet_cmd(c, d, &["tmux", "lab"]));
    assert!(err.contains("nothing of the lab is set up yet: the layout would be 14 panes with nothing in them; start the lab with `kubenet up`"), "{err}");
    // One VM "running" (a stand-in that holds its pidfile, as QEMU does): the layout is built,
    // and the panes of the VMs that do not run stay, showing why.
    std::fs::create_dir_all(d.join("gateway")).unwrap();
    let mut cmd = Command::new("python3");
    cmd.args(["-u", "-c", FAKE_SERIAL]).arg(d.join("gateway/qemu.pid")).arg(d.join("gateway/serial.sock"));
    let mut serial = support::Proc::spawn(cmd, &d.join("serial.log"));
    serial.wait_for("listening", Duration::from_secs(10));
    let out = run();
    assert!(out.contains("not on a terminal: attach with `tmux attach -t lab`"), "{out}");

    let windows = tmux(&["list-windows", "-t", "lab", "-F", "#{window_name} #{window_panes} #{synchronize-panes}"]);
    assert_eq!(windows, "qemu 7 0\nssh-gateway 1 0\nssh-controls 3 1\nssh-workers 3 1\n");
    let starts = tmux(&["list-panes", "-t", "lab:ssh-workers", "-F", "#{pane_start_command}"]);
    let prefix = format!("{} --config {} --dir {}", kubenet_bin(), d.join("kubenet.toml").display(), d.display());
    let want: Vec<String> = ["worker0", "worker1", "worker2"].iter().map(|n| format!("{prefix} ssh {n}")).collect();
    // tmux shows a start command in quotes.
    assert_eq!(starts.lines().map(|l| l.trim_matches('"')).collect::<Vec<_>>(), want, "{starts}");
    let active = tmux(&["display-message", "-p", "-t", "lab:ssh-workers", "#{pane_start_command}"]);
    assert!(active.trim().trim_matches('"').ends_with("ssh worker0"), "the first pane is active: {active}");
    let consoles = tmux(&["list-panes", "-t", "lab:qemu", "-F", "#{pane_start_command}"]);
    assert!(consoles.lines().next().unwrap().trim_matches('"').ends_with(" console gateway"), "{consoles}");
    // The panes whose command ended stay, showing why.
    assert_eq!(tmux(&["show-options", "-w", "-v", "-t", "lab:qemu", "remain-on-exit"]), "on\n");

    // Again: the session is there; it is not built twice.
    assert!(run().contains("tmux session lab exists"));
    assert_eq!(tmux(&["list-windows", "-t", "lab"]).lines().count(), 4);
}

#[test]
fn ssh_include_lets_plain_ssh_reach_the_lab() {
    if tools(&["ssh", "qemu-img"]).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    lab_dir(d, d, &support::test_lab());
    let user_config = d.join("home/.ssh/config");
    std::fs::create_dir_all(user_config.parent().unwrap()).unwrap();
    std::fs::write(&user_config, "Host github.com\n    User git\n").unwrap();

    let out = ok(kubenet(d, &["setup", "--ssh-include", "worker0"]));
    assert!(out.contains(&format!("to {}", user_config.display())), "{out}");
    ok(kubenet(d, &["setup", "--ssh-include", "worker0"]));
    let text_now = std::fs::read_to_string(&user_config).unwrap();
    assert_eq!(text_now.matches("Include ").count(), 1, "added once:\n{text_now}");
    // ssh itself, reading that file: the lab's names resolve, the user's own hosts are as before.
    let g = |host: &str| ok(Command::new("ssh").args(["-G", "-F"]).arg(&user_config).arg(host).output().unwrap());
    let w = g("worker0");
    assert!(
        w.lines().any(|l| l == "hostname 192.168.1.14") && w.lines().any(|l| l == "stricthostkeychecking true"),
        "{w}"
    );
    assert!(g("github.com").lines().any(|l| l == "user git"));

    ok(kubenet(d, &["destroy", "--yes"]));
    assert_eq!(std::fs::read_to_string(&user_config).unwrap(), "Host github.com\n    User git\n");
}

/// `qemu-io -c CMD` on a VM's disk; its output.
fn qemu_io(d: &Path, vm: &str, cmd: &str) -> String {
    ok(Command::new("qemu-io").args(["-f", "qcow2", "-c", cmd]).arg(d.join(vm).join("disk.img")).output().unwrap())
}

/// The names of the internal snapshots in a VM's disk.
fn disk_snapshots(d: &Path, vm: &str) -> Vec<String> {
    let out = ok(Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(d.join(vm).join("disk.img"))
        .output()
        .unwrap());
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["snapshots"].as_array().map_or(vec![], |a| a.iter().map(|s| s["name"].as_str().unwrap().to_owned()).collect())
}

/// A QEMU tool holding a disk open for writing, as a running VM would: qemu-img cannot take
/// or apply a snapshot there. Ends (by its PID) when dropped. It waits on /proc/locks, not on a
/// qemu-img probe: a probe holds the disk for an instant and can make qemu-io's own open fail.
fn hold_disk(d: &Path, vm: &str) -> support::Proc {
    use std::os::unix::fs::MetadataExt;
    let disk = d.join(vm).join("disk.img");
    let inode = std::fs::metadata(&disk).unwrap().ino().to_string();
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "qcow2", "-c", "sleep 120000"]).arg(&disk);
    let mut held = support::Proc::spawn(cmd, &d.join(format!("{vm}.qemu-io.log")));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    // A line of /proc/locks: "1: OFDLCK ADVISORY WRITE -1 fd:01:1234 100 100" (inode last).
    let locked = || {
        std::fs::read_to_string("/proc/locks")
            .unwrap()
            .lines()
            .any(|l| l.split_whitespace().nth(5).and_then(|f| f.rsplit(':').next()) == Some(&inode))
    };
    while !locked() {
        let exited = held.child.try_wait().unwrap();
        assert!(
            exited.is_none() && std::time::Instant::now() < deadline,
            "qemu-io never locked {vm}'s disk (exited: {exited:?}); its log:\n{}",
            held.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    held
}

#[test]
fn snapshots_take_the_lab_back_all_or_nothing() {
    if tools(&["qemu-img", "qemu-io"]).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    lab_dir(d, d, &support::test_lab());
    ok(kubenet(d, &["setup"]));
    let vms = ["gateway", "control0", "control1", "control2", "worker0", "worker1", "worker2"];
    let write_all = |pattern: &str| {
        for vm in vms {
            qemu_io(d, vm, &format!("write -P {pattern} 1M 64k"));
        }
    };
    // qemu-io's read -P checks every byte, and fails saying so.
    let holds = |vm: &str, pattern: &str| {
        let out = Command::new("qemu-io")
            .args(["-f", "qcow2", "-r", "-U", "-c", &format!("read -P {pattern} 1M 64k")])
            .arg(d.join(vm).join("disk.img"))
            .output()
            .unwrap();
        let verified = !text(&out).contains("Pattern verification failed");
        assert_eq!(out.status.success(), verified, "{}", text(&out));
        verified
    };
    std::fs::write(d.join("leases"), "0 52:52:52:00:00:04 192.168.1.14 worker0 *\n").unwrap();

    // The stopped lab, 7 VMs: saved, changed, restored.
    write_all("0xaa");
    let out = ok(kubenet(d, &["snapshot", "save", "s1"]));
    eprintln!("{out}");
    assert!(out.contains("worker2    saved") && out.contains("snapshot s1: 7 VMs in"), "{out}");
    for vm in vms {
        assert_eq!(disk_snapshots(d, vm), ["s1"], "{vm}");
    }
    std::fs::write(d.join("leases"), "0 52:52:52:00:00:04 192.168.1.99 worker0 *\n").unwrap();
    write_all("0xbb");
    assert!(!holds("worker0", "0xaa"));
    let out = ok(kubenet(d, &["snapshot", "restore", "s1"]));
    eprintln!("{out}");
    assert!(out.contains("snapshot s1 (taken") && out.contains("restored on 7 VMs in"), "{out}");
    for vm in vms {
        assert!(holds(vm, "0xaa"), "{vm} did not get its first pattern back");
        assert_eq!(disk_snapshots(d, vm), ["s1"], "{vm}: only the snapshot, no undo left behind");
    }
    assert_eq!(std::fs::read_to_string(d.join("leases")).unwrap(), "0 52:52:52:00:00:04 192.168.1.14 worker0 *\n");
    let list = ok(kubenet(d, &["snapshot", "list"]));
    assert!(list.lines().next().unwrap().starts_with("NAME") && list.contains("stopped"), "{list}");
    assert_eq!(
        list.lines().filter(|l| l.contains("worker") || l.contains("control") || l.contains("gateway")).count(),
        7
    );

    // Bad names and a taken name: refused, nothing made.
    for bad in ["a/b", "with space", ".x"] {
        let out = kubenet(d, &["snapshot", "save", bad]);
        assert_eq!(out.status.code(), Some(1), "{bad}");
        assert!(text(&out).contains("cannot name a snapshot"), "{}", text(&out));
    }
    let out = kubenet(d, &["snapshot", "save", "--", "-rf"]);
    assert!(text(&out).contains("`-rf` cannot name a snapshot"), "{}", text(&out));
    let err = text(&kubenet(d, &["snapshot", "save", "s1"]));
    assert!(err.contains("a snapshot named `s1` exists already"), "{err}");
    let err = text(&kubenet(d, &["snapshot", "restore", "nope"]));
    assert!(err.contains("no snapshot named `nope` (there are: s1)"), "{err}");
    let out = kubenet(d, &["snapshot", "save", "s9", "--vm", "worker9"]);
    assert_eq!(out.status.code(), Some(2), "an unknown VM is a usage error");
    assert_eq!(disk_snapshots(d, "worker0"), ["s1"]);

    // A save that fails at the last VM (its disk held open): the ones before lose it again.
    write_all("0xcc");
    {
        let _held = hold_disk(d, "worker2");
        let out = kubenet(d, &["snapshot", "save", "s2"]);
        let err = text(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("worker2: `qemu-img snapshot -c s2") && err.contains("lock"), "{err}");
        for vm in vms {
            assert_eq!(disk_snapshots(d, vm), ["s1"], "{vm}: s2 left behind");
        }
        assert!(!d.join("snapshots/s2").exists());
        // A restore that fails there: every disk keeps what it had.
        let err = text(&kubenet(d, &["snapshot", "restore", "s1"]));
        assert!(err.contains("worker2: `qemu-img snapshot -c .kubenet-undo") && err.contains("lock"), "{err}");
        for vm in vms {
            assert!(holds(vm, "0xcc"), "{vm} changed by a failed restore");
        }
    }
    for vm in vms {
        assert_eq!(disk_snapshots(d, vm), ["s1"], "{vm}");
    }

    // A disk made anew since (reset): the whole-lab restore names it and changes nothing; the
    // other VMs can still go back with --vm.
    ok(kubenet(d, &["reset", "worker1"]));
    ok(kubenet(d, &["setup", "worker1"]));
    let err = text(&kubenet(d, &["snapshot", "restore", "s1"]));
    assert!(err.contains("worker1: its disk no longer holds the snapshot"), "{err}");
    assert!(holds("worker0", "0xcc"));
    ok(kubenet(d, &["snapshot", "restore", "s1", "--vm", "worker0", "control0"]));
    assert!(holds("worker0", "0xaa") && holds("control0", "0xaa") && holds("control1", "0xcc"));

    // A VM added to the lab since: named.
    let mut bigger = support::test_lab();
    let workers = bigger.rfind("count = 3").unwrap();
    bigger.replace_range(workers..workers + 9, "count = 4");
    std::fs::write(d.join("kubenet.toml"), &bigger).unwrap();
    let err = text(&kubenet(d, &["snapshot", "restore", "s1", "--vm", "worker0"]));
    assert!(!err.contains("added to the lab"), "--vm asks only about worker0: {err}");
    let err = text(&kubenet(d, &["snapshot", "restore", "s1"]));
    assert!(err.contains("added to the lab since"), "{err}");
    std::fs::write(d.join("kubenet.toml"), support::test_lab()).unwrap();

    // A disk that is not qcow2.
    let raw = d.join("control2/disk.img");
    std::fs::rename(&raw, d.join("control2/disk.qcow2")).unwrap();
    ok(Command::new("qemu-img").args(["create", "-q", "-f", "raw"]).arg(&raw).arg("1M").output().unwrap());
    let err = text(&kubenet(d, &["snapshot", "save", "s3"]));
    assert!(err.contains("is raw, not qcow2"), "{err}");
    assert_eq!(disk_snapshots(d, "worker0"), ["s1"]);
    std::fs::rename(d.join("control2/disk.qcow2"), &raw).unwrap();

    // Delete: gone from every disk that had it, and from the list.
    let out = ok(kubenet(d, &["snapshot", "delete", "s1"]));
    assert!(out.contains("worker1    snapshot s1 deleted"), "{out}");
    for vm in vms {
        assert!(disk_snapshots(d, vm).is_empty(), "{vm}");
    }
    assert!(ok(kubenet(d, &["snapshot", "list"])).contains("no snapshots yet"));
}

/// What QEMU says it is doing (`query-status`), asked over its QMP socket.
fn qemu_run_state(qmp: &Path) -> String {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut q = kubenet_vm::qmp::Qmp::connect(qmp).await.unwrap();
        q.execute("query-status").await.unwrap()["status"].as_str().unwrap().to_owned()
    })
}

/// Live snapshots through `serve`, of QEMUs running under TCG with no guest OS (the firmware
/// runs): the memory lands in each disk, the VMs run on afterwards, `delete` reaches into
/// running VMs, and a restore starts the stopped ones and loads them. (The guest-side proof,
/// files back and clocks set, is in tests/e2e.rs.)
#[test]
fn live_snapshots_pause_save_and_load_running_qemu() {
    if prerequisites(&["qemu-system-x86_64", "qemu-img"]).is_some() {
        return;
    }
    let ns = Netns::new("snap");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let lab = support::tcg_lab();
    lab_dir(d, &d.join("state"), &lab);
    let agent = serve(&ns, d, &[]);
    let cli = |args: &[&str]| kubenet_cmd(ns.cmd(kubenet_bin()), d, &[&["--dir", "state"][..], args].concat());
    let state = d.join("state");
    // Started; no OS, so `up` gives up waiting at once.
    assert!(!cli(&["up", "gateway", "worker0", "--timeout", "1"]).status.success());
    let pids: Vec<u64> = status(&ns, d).as_array().unwrap().iter().filter_map(|r| r["pid"].as_u64()).collect();
    assert_eq!(pids.len(), 2);

    let err = text(&cli(&["snapshot", "save", "s1", "--vm", "gateway"]));
    assert!(err.contains("gateway still running") && err.contains("add --live"), "{err}");

    // The lab as it is, partly running (issue 28): gateway and worker0 saved live, control0
    // (set up, stopped) its disk, the rest never set up. The restore puts each back as it was:
    // control0 stopped again with its disk reverted, worker0 (stopped since) running.
    ok(cli(&["setup", "control0"]));
    let out = ok(cli(&["snapshot", "save", "s0", "--live"]));
    eprintln!("{out}");
    assert!(out.contains("gateway    saved live (memory ") && out.contains("worker0    saved live (memory "), "{out}");
    assert!(out.contains("control0   saved stopped (disk "), "{out}");
    assert!(out.contains("worker2    not set up: no disk to save"), "{out}");
    assert!(out.contains("snapshot s0: 2 VMs live and 1 stopped in"), "{out}");
    // A mark written on control0's disk after the save: the restore must take it away.
    let control0 = state.join("control0/disk.img");
    // (qemu-io exits 1 when a pattern does not match: its words say which.)
    let io = |cmd: &str| text(&Command::new("qemu-io").args(["-c", cmd]).arg(&control0).output().unwrap());
    assert!(!io("read -P 0 1M 64k").contains("failed"), "the disk starts with zeros there");
    assert!(io("write -P 0xab 1M 64k").contains("wrote 65536/65536 bytes"));
    assert!(io("read -P 0 1M 64k").contains("Pattern verification failed"), "the mark is there");
    assert!(!cli(&["up", "control0", "--timeout", "1"]).status.success());
    ok(cli(&["down", "worker0", "--grace", "1"]));
    let out = ok(cli(&["snapshot", "restore", "s0"]));
    eprintln!("{out}");
    assert!(out.contains("control0   restored stopped"), "{out}");
    assert!(out.contains("live) restored on 3 VMs"), "{out}");
    let rows = status(&ns, d);
    assert_eq!(rows[0]["pid"].as_u64(), Some(pids[0]), "gateway kept running, the same QEMU");
    assert_eq!(rows[1]["state"], "stopped", "control0 was saved stopped: {rows}");
    assert_eq!(rows[4]["state"], "running", "worker0 was saved running: {rows}");
    assert_eq!(qemu_run_state(&state.join("worker0/qmp.sock")), "running");
    // control0's disk is as it was at the save: the mark is gone.
    let read = io("read -P 0 1M 64k");
    assert!(!read.contains("failed") && read.contains("read 65536/65536 bytes"), "{read}");
    ok(cli(&["snapshot", "delete", "s0"]));
    let pids: Vec<u64> = status(&ns, d).as_array().unwrap().iter().filter_map(|r| r["pid"].as_u64()).collect();
    assert_eq!(pids.len(), 2);

    let out = ok(cli(&["snapshot", "save", "s1", "--live", "--vm", "gateway", "worker0"]));
    eprintln!("{out}");
    assert!(out.contains("gateway    saved live (memory ") && out.contains("snapshot s1: 2 VMs live in"), "{out}");
    for vm in ["gateway", "worker0"] {
        let info = ok(Command::new("qemu-img")
            .args(["info", "-U", "--output=json"])
            .arg(state.join(vm).join("disk.img"))
            .output()
            .unwrap());
        let info: serde_json::Value = serde_json::from_str(&info).unwrap();
        let snap = &info["snapshots"][0];
        assert_eq!(snap["name"], "s1", "{vm}: {info}");
        assert!(snap["vm-state-size"].as_u64().unwrap() > 100_000, "{vm}: the memory was saved: {snap}");
        assert_eq!(qemu_run_state(&state.join(vm).join("qmp.sock")), "running", "{vm} resumed");
    }
    let list = ok(cli(&["snapshot", "list"]));
    assert!(list.contains("live") && list.lines().nth(1).unwrap().split_whitespace().last() != Some("-"), "{list}");
    let err = text(&cli(&["snapshot", "save", "s1", "--live", "--vm", "gateway"]));
    assert!(err.contains("a snapshot named `s1` exists already"), "{err}");

    // Restore: worker0 stopped first; serve starts it and loads both.
    ok(cli(&["down", "worker0", "--grace", "1"]));
    let out = ok(cli(&["snapshot", "restore", "s1"]));
    eprintln!("{out}");
    assert!(out.contains("snapshot s1 (taken ") && out.contains("live) restored on 2 VMs"), "{out}");
    // No guest, no sshd: the clock could not be set, and the way to do it by hand is shown.
    assert!(out.contains("worker0    restored live; its clock is behind and could not be set"), "{out}");
    let rows = status(&ns, d);
    assert_eq!(rows[0]["pid"].as_u64(), Some(pids[0]), "gateway kept running, the same QEMU");
    assert_eq!(rows[4]["state"], "running", "worker0 started for the restore");
    for vm in ["gateway", "worker0"] {
        assert_eq!(qemu_run_state(&state.join(vm).join("qmp.sock")), "running", "{vm} resumed after the load");
    }
    let log = std::fs::read_to_string(&agent.log).unwrap();
    assert!(log.contains("live snapshot") && log.contains("Load"), "{log}");

    // Delete from running VMs, through serve.
    let out = ok(cli(&["snapshot", "delete", "s1"]));
    assert!(out.contains("worker0    snapshot s1 deleted"), "{out}");
    let info = ok(Command::new("qemu-img").args(["info", "-U"]).arg(state.join("worker0/disk.img")).output().unwrap());
    assert!(!info.contains("Snapshot list"), "{info}");

    // Without serve, a live restore says what it needs.
    ok(cli(&["snapshot", "save", "s2", "--live", "--vm", "gateway"]));
    ok(cli(&["down", "--grace", "1"]));
    agent.stop();
    let err = text(&cli(&["snapshot", "restore", "s2"]));
    assert!(
        err.contains("restoring the live snapshot s2 needs kubenet serve") && err.contains("sudo kubenet serve"),
        "{err}"
    );
}

/// The by-descriptor start (what macOS uses, where QEMU begins as root) against a real QEMU on
/// Linux: the agent opens the guest's files and binds its sockets as the owner (uid 65534) and
/// QEMU gets only descriptors. It runs, as the owner, holding exactly the lab's files; its
/// console log fills and QMP answers on the owner's socket; a seed.iso that is a link to a
/// root-only file stops the start, and the file is neither opened nor changed.
#[test]
#[cfg(target_os = "linux")]
fn qemu_gets_the_guests_files_as_descriptors_opened_as_the_owner() {
    if prerequisites(&["qemu-system-x86_64", "qemu-img"]).is_some() {
        return;
    }
    if kubenet_cluster::Arch::HOST != kubenet_cluster::Arch::X86_64 {
        return support::skip("the test's guest is x86_64 and runs natively only on an x86_64 host");
    }
    use kubenet_vm::qemu::{Accel, Firmware, Guest, HostProfile};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let ns = Netns::new("vmfd");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    let lab = support::tcg_lab();
    lab_dir(d, d, &lab);
    ok(kubenet(d, &["setup", "gateway"]));
    let out = Command::new("chown").args(["-R", "65534:65534"]).arg(d).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let lab = kubenet_cluster::load(&kubenet_cluster::Choice::File("kubenet.toml".into()), d).unwrap();
    let vm = lab.vm_by_name("gateway").unwrap();
    let files = kubenet_vm::VmFiles::new(&lab, vm);
    let owner = kubenet_vm::owner::Owner { uid: 65534, gid: 65534, groups: vec![65534], name: "nobody".into() };
    // UEFI where OVMF is installed, so the variable store goes by descriptor too.
    let candidates =
        kubenet_vm::qemu::firmware_candidates(kubenet_cluster::Os::Linux, kubenet_cluster::Arch::X86_64, None);
    let firmware = candidates
        .into_iter()
        .find(|(c, v)| c.exists() && v.exists())
        .map_or(Firmware::Bios, |(code, vars_template)| Firmware::Uefi { code, vars_template });
    let uefi = matches!(firmware, Firmware::Uefi { .. });
    let guest = Guest { qemu: support::which("qemu-system-x86_64").unwrap(), firmware, drop_to: None };
    let profile = HostProfile {
        os: kubenet_cluster::Os::Linux,
        arch: kubenet_cluster::Arch::X86_64,
        accel: Accel::Tcg,
        files_by_fd: true,
        guests: vec![(kubenet_cluster::Arch::X86_64, Ok(guest))],
    };
    // The agent's side, on a thread inside the test's namespace, where the tap is made.
    let launch = || {
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns_file = std::fs::File::open(format!("/run/netns/{}", ns.name)).unwrap();
                use std::os::fd::AsRawFd;
                // SAFETY: setns on an open namespace file, for this thread alone.
                assert_eq!(unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
                kubenet_vm::process::launch(&lab, vm, &profile, &owner)
            })
            .join()
            .unwrap()
        })
    };
    let pid = match launch() {
        Ok(kubenet_vm::process::Launched::Started(pid)) => pid as u64,
        other => panic!("{other:?}: {}", std::fs::read_to_string(files.qemu_log()).unwrap_or_default()),
    };
    let _qemu = support::KillOnDrop(pid);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.lines().any(|l| l.split_whitespace().eq(["Uid:", "65534", "65534", "65534", "65534"])), "{status}");
    // No file of the lab's is named on the command line; all come as descriptors.
    let cmdline = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap()).into_owned();
    assert!(cmdline.contains("\0-add-fd\0") && cmdline.contains("\"filename\":\"/dev/fdset/2\""), "{cmdline}");
    for f in ["disk.img", "seed.iso", "efi-vars.fd", "console.log", ".sock", "images/"] {
        assert!(!cmdline.contains(f), "{f} by path in {cmdline}");
    }
    let held: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
        .map(|p| p.display().to_string())
        .collect();
    let base = d.join(default_image()).display().to_string();
    let mut want = vec![files.disk(), files.seed(), files.console_log()];
    if uefi {
        want.push(files.efi_vars());
    }
    for f in want.iter().map(|p| p.display().to_string()).chain([base]) {
        assert!(held.contains(&f), "QEMU does not hold {f}: {held:?}");
    }
    assert!(held.iter().filter(|h| h.starts_with("socket:")).count() >= 2, "{held:?}");
    // The sockets are the owner's, and QMP answers on one: the VM runs.
    assert_eq!(std::fs::symlink_metadata(files.qmp_socket()).unwrap().uid(), 65534);
    assert_eq!(std::fs::symlink_metadata(files.serial_socket()).unwrap().uid(), 65534);
    let state = qemu_run_state(&files.qmp_socket());
    assert_eq!(state, "running");
    // The firmware prints to the serial console, which QEMU logs through its descriptor.
    let start = std::time::Instant::now();
    while std::fs::metadata(files.console_log()).unwrap().len() == 0 {
        assert!(start.elapsed() < Duration::from_secs(60), "the console log stays empty");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(std::fs::metadata(files.console_log()).unwrap().uid(), 65534);
    assert_eq!(kubenet_vm::process::running(&files), Some(pid as u32));
    assert!(Command::new("kill").arg(pid.to_string()).status().unwrap().success());
    let start = std::time::Instant::now();
    while pid_alive(pid) {
        assert!(start.elapsed() < Duration::from_secs(20), "QEMU {pid} did not end on SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    }

    // seed.iso as a link to a root-only file: nothing starts, and the file is as it was.
    let secret = d.join("secret");
    std::fs::write(&secret, "root only").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(&secret, Some(0), Some(0)).unwrap();
    let kept = files.dir.join("seed.kept");
    std::fs::rename(files.seed(), &kept).unwrap();
    std::os::unix::fs::symlink(&secret, files.seed()).unwrap();
    let err = launch().unwrap_err().to_string();
    assert!(err.contains("seed.iso"), "{err}");
    std::fs::remove_file(files.seed()).unwrap();
    std::fs::rename(&kept, files.seed()).unwrap();
    // The overlay's backing file pointed at it (what the owner can do with qemu-img): refused
    // before QEMU runs, naming the disk and the file.
    let rebase = |to: &str| {
        let out = Command::new("qemu-img")
            .args(["rebase", "-u", "-f", "qcow2", "-F", "raw", "-b", to])
            .arg(files.disk())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
    };
    rebase(secret.to_str().unwrap());
    let err = launch().unwrap_err().to_string();
    assert!(err.contains("disk.img: its backing file") && err.contains("is not in the lab's images folder"), "{err}");
    let meta = std::fs::metadata(&secret).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o600));
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "root only");
    assert_eq!(kubenet_vm::process::running(&files), None);
}
