//! `kubenet ssh` on many VMs, `kubenet cp` and `kubenet ssh-config`, against real OpenSSH and
//! no VM: in a namespace of the test's own, each "VM" is an sshd at the VM's address (on the
//! namespace's loopback) presenting the host key `kubenet setup` made for it, with a stand-in
//! process where its QEMU would be (a process whose argv names the VM's pidfile, which is what
//! `kubenet` checks). Each VM's files are a folder of its own (remote/NAME), where its SFTP
//! server starts, so `VM:relative/path` is that VM's. The real guests do the same in
//! tests/e2e.rs; this runs in seconds.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use support::{Netns, Proc, kubenet_bin, prerequisites};

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

const VMS: [(&str, &str); 6] = [
    ("control0", "192.168.1.11"),
    ("control1", "192.168.1.12"),
    ("control2", "192.168.1.13"),
    ("worker0", "192.168.1.14"),
    ("worker1", "192.168.1.15"),
    ("worker2", "192.168.1.16"),
];

/// The lab: the reference one logging in as root (the one user sshd here can log in as).
struct Lab {
    ns: Netns,
    d: std::path::PathBuf,
    _procs: Vec<Proc>,
}

impl Lab {
    fn kubenet(&self, args: &[&str]) -> Output {
        self.ns
            .cmd(kubenet_bin())
            .args(["--dir", "state"])
            .args(args)
            .current_dir(&self.d)
            .env("HOME", self.d.join("home"))
            .env("NO_COLOR", "1")
            .env_remove("KUBENET_CONFIG")
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.kubenet(args);
        assert!(out.status.success(), "kubenet {}:\n{}", args.join(" "), text(&out));
        text(&out)
    }
}

/// Everything but worker2 "runs": an sshd and a stand-in QEMU each.
fn lab(d: &Path) -> Option<Lab> {
    if prerequisites(&["sshd", "ssh", "scp", "ssh-keygen", "qemu-img", "python3"]).is_some() {
        return None;
    }
    let lab = support::test_lab().replace("user = \"kube\"", "user = \"root\"");
    assert!(lab.contains("user = \"root\""));
    std::fs::write(d.join("kubenet.toml"), lab).unwrap();
    std::fs::create_dir_all(d.join("state/images")).unwrap();
    std::fs::create_dir_all(d.join("home")).unwrap();
    let image = format!("images/ubuntu-24.04-server-cloudimg-{}.img", kubenet_cluster::Arch::HOST.cloud_name());
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", &image, "64M"])
        .current_dir(d.join("state"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let ns = Netns::new("rem");
    let mut lab = Lab { ns, d: d.to_path_buf(), _procs: Vec::new() };
    lab.ok(&["setup"]);
    // The lab key `setup` made (HOME has none of its own), authorised for root.
    let out = Command::new("ssh-keygen").args(["-y", "-f"]).arg(d.join("state/id_ed25519")).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let lab_key = out.stdout;
    std::fs::write(d.join("authorized_keys"), lab_key).unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap();
    for (name, ip) in &VMS[..5] {
        lab.ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"]);
        let vm = d.join("state").join(name);
        // The VM's own files: SFTP (and so scp) starts there, and a relative path is the VM's.
        let files = d.join("remote").join(name);
        std::fs::create_dir_all(&files).unwrap();
        let mut sshd = lab.ns.cmd(support::which("sshd").unwrap().to_str().unwrap());
        sshd.args(["-D", "-e", "-f", "/dev/null", "-o", "PidFile=none", "-o", "StrictModes=no"])
            .arg("-o")
            .arg(format!("AuthorizedKeysFile={}", d.join("authorized_keys").display()))
            .args(["-o", "PermitRootLogin=prohibit-password", "-o", &format!("ListenAddress={ip}:22")])
            .arg("-o")
            .arg(format!("Subsystem=sftp {} -d {}", sftp_server(), files.display()))
            .arg("-h")
            .arg(vm.join("ssh_host_ed25519_key"));
        let mut p = Proc::spawn(sshd, &d.join(format!("sshd-{name}.log")));
        p.wait_for("Server listening", Duration::from_secs(10));
        lab._procs.push(p);
        // The stand-in QEMU: its argv names the pidfile, which names it.
        let pidfile = vm.join("qemu.pid");
        let mut qemu = Command::new("/usr/bin/python3");
        qemu.args(["-c", "import sys,os,time; open(sys.argv[1],'w').write(str(os.getpid())); time.sleep(600)"])
            .arg(&pidfile);
        lab._procs.push(Proc::spawn(qemu, &d.join(format!("qemu-{name}.log"))));
        support::wait_file(&pidfile, "", Duration::from_secs(10));
    }
    Some(lab)
}

fn sftp_server() -> &'static str {
    ["/usr/lib/openssh/sftp-server", "/usr/libexec/sftp-server", "/usr/lib/ssh/sftp-server"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("sftp-server (openssh-sftp-server)")
}

/// Prints the address of the sshd it reached ($SSH_CONNECTION's third word), and fails on
/// worker0 with status 7.
const WHERE: &str = "set -- $SSH_CONNECTION; echo at $3; echo warn $3 >&2; test $3 != 192.168.1.14 || exit 7";

#[test]
fn a_command_on_many_vms_in_parallel_with_labelled_output_and_a_summary() {
    let dir = tempfile::tempdir().unwrap();
    let Some(lab) = lab(dir.path()) else { return };

    let out = lab.kubenet(&["ssh", "control*", "@worker", "--", WHERE]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    for (name, ip) in &VMS[..5] {
        assert!(stdout.contains(&format!("{name:<8} | at {ip}\n")), "{name}: {stdout}");
        // stderr stays stderr, labelled too.
        assert!(stderr.contains(&format!("{name:<8} | warn {ip}\n")), "{name}: {stderr}");
        assert!(!stdout.contains("warn"), "{stdout}");
    }
    assert!(
        stderr.contains(
            "kubenet: 2 of 6 VMs failed; worker0: exit 7; worker2: not running (start it with `kubenet up worker2`)"
        ),
        "{stderr}"
    );
    // In parallel: each control node waits until all three have begun, which one after another
    // would never see.
    let meet = format!(
        "set -- $SSH_CONNECTION; touch {d}/met-$3; for n in 11 12 13; do while [ ! -e {d}/met-192.168.1.$n ]; do sleep 0.1; done; done; echo met",
        d = dir.path().display()
    );
    let out = lab.ok(&["ssh", "@control", "--timeout", "60s", "--", &meet]);
    assert_eq!(out.matches(" | met\n").count(), 3, "{out}");
    // All of them well: no failure, no summary, exit 0.
    let out = lab.ok(&["ssh", "control0", "worker[01]", "@control", "--", "true"]);
    assert!(!out.contains("failed"), "{out}");
}

#[test]
fn serial_stops_at_the_first_failure_and_timeout_ends_a_vm() {
    let dir = tempfile::tempdir().unwrap();
    let Some(lab) = lab(dir.path()) else { return };
    let script = "set -- $SSH_CONNECTION; echo ran $3; test $3 != 192.168.1.12";
    let out = lab.kubenet(&["ssh", "--serial", "@control", "--", script]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("control0 | ran 192.168.1.11") && t.contains("control1 | ran 192.168.1.12"), "{t}");
    assert!(!t.contains("192.168.1.13"), "control2 must not run: {t}");
    assert!(t.contains("2 of 3 VMs failed; control1: exit 1; control2: not run (--serial stopped"), "{t}");

    let start = Instant::now();
    let out = lab.kubenet(&["ssh", "--timeout", "2s", "control0", "worker1", "--", "sleep 30"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("control0: timed out after 2s; worker1: timed out after 2s"), "{t}");
    assert!(start.elapsed() < Duration::from_secs(25), "not waited out: {:?}", start.elapsed());

    // Errors of the command line: exit 2, nothing run.
    let out = lab.kubenet(&["ssh", "db*", "--", "true"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("`db*` matches no VM in this lab"), "{}", text(&out));
    let out = lab.kubenet(&["ssh", "@control"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("give the command to run on each after `--`"), "{}", text(&out));
    let out = lab.kubenet(&["ssh", "--timeout", "-3s", "control0", "--", "true"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    // One VM by name, not running: said at once.
    let out = lab.kubenet(&["ssh", "worker2", "--", "true"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("worker2 is not running: start it with `kubenet up worker2`"), "{}", text(&out));
}

#[test]
fn cp_to_many_vms_and_back_into_a_folder_each_keeping_modes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let Some(lab) = lab(d) else { return };
    let remote = |name: &str, path: &str| d.join("remote").join(name).join(path);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    // A file and a directory with a file inside, with modes to keep.
    let bytes: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(d.join("ca.pem"), &bytes).unwrap();
    std::fs::set_permissions(d.join("ca.pem"), std::fs::Permissions::from_mode(0o640)).unwrap();
    std::fs::write(d.join("ca-key.pem"), b"secret").unwrap();
    std::fs::set_permissions(d.join("ca-key.pem"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::create_dir_all(d.join("conf/sub")).unwrap();
    std::fs::write(d.join("conf/sub/run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(d.join("conf/sub/run.sh"), std::fs::Permissions::from_mode(0o751)).unwrap();

    // Two files to every control node, each into its home (`VM:`).
    let out = lab.ok(&["cp", "ca.pem", "ca-key.pem", "control*:"]);
    assert!(!out.contains("failed"), "{out}");
    for name in ["control0", "control1", "control2"] {
        assert_eq!(std::fs::read(remote(name, "ca.pem")).unwrap(), bytes, "{name}");
        assert_eq!(mode(&remote(name, "ca.pem")), 0o640, "{name}");
        assert_eq!(std::fs::read(remote(name, "ca-key.pem")).unwrap(), b"secret");
        assert_eq!(mode(&remote(name, "ca-key.pem")), 0o600, "{name}");
    }
    assert!(!remote("worker0", "ca.pem").exists());
    // A directory needs -r: scp's complaint comes labelled with the VM.
    let out = lab.kubenet(&["cp", "conf", "worker0:"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("worker0 | "), "{}", text(&out));
    lab.ok(&["cp", "-r", "conf", "worker[01]:"]);
    for name in ["worker0", "worker1"] {
        let script = remote(name, "conf/sub/run.sh");
        assert_eq!(std::fs::read(&script).unwrap(), b"#!/bin/sh\necho hi\n", "{name}");
        assert_eq!(mode(&script), 0o751, "{name}");
    }

    // From many: a folder each, nothing overwritten (each VM's file differs); worker2 is not
    // running and is said to be.
    for name in ["worker0", "worker1"] {
        std::fs::write(remote(name, "syslog"), format!("the log of {name}\n")).unwrap();
    }
    let out = lab.kubenet(&["cp", "@worker:syslog", "logs/"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("1 of 3 VMs failed; worker2: not running"), "{t}");
    for name in ["worker0", "worker1"] {
        assert_eq!(
            std::fs::read_to_string(d.join("logs").join(name).join("syslog")).unwrap(),
            format!("the log of {name}\n")
        );
    }
    assert!(!d.join("logs/worker2/syslog").exists());
    // A directory from many, with -r.
    lab.ok(&["cp", "-r", "worker0:conf", "worker1:conf", "back"]);
    for name in ["worker0", "worker1"] {
        let got = d.join("back").join(name).join("conf/sub/run.sh");
        assert_eq!(std::fs::read(&got).unwrap(), b"#!/bin/sh\necho hi\n", "{name}");
        assert_eq!(mode(&got), 0o751);
    }
    // From one VM by name: as scp, into the destination itself.
    lab.ok(&["cp", "control1:ca.pem", "back.pem"]);
    assert_eq!(std::fs::read(d.join("back.pem")).unwrap(), bytes);
    // Both sides local: a usage error.
    let out = lab.kubenet(&["cp", "ca.pem", "other.pem"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[test]
fn ssh_config_install_makes_plain_ssh_reach_a_vm_and_destroy_takes_it_out() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let Some(lab) = lab(d) else { return };
    let line = lab.ok(&["ssh-config"]);
    let include = format!("Include \"{}\"", d.join("state/ssh_config").display());
    assert_eq!(line.trim(), include);
    let config = d.join("home/.ssh/config");
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    std::fs::write(&config, "Host example\n    User someone\n").unwrap();
    let out = lab.ok(&["ssh-config", "--install"]);
    assert!(out.contains("added `Include"), "{out}");
    assert!(out.contains("config.kubenet-backup"), "{out}");
    let text_now = std::fs::read_to_string(&config).unwrap();
    assert!(text_now.contains(&format!("\n{include}\n\nHost example\n")), "at the top: {text_now}");
    assert_eq!(
        std::fs::read_to_string(d.join("home/.ssh/config.kubenet-backup")).unwrap(),
        "Host example\n    User someone\n"
    );
    // Once only.
    let out = lab.ok(&["ssh-config", "--install"]);
    assert!(out.contains("already has"), "{out}");
    assert_eq!(std::fs::read_to_string(&config).unwrap().matches(&include).count(), 1);

    // Plain `ssh worker0`, as root, whose OpenSSH reads the home of its passwd entry: that home
    // is this test's, in a mount namespace of this command's own. Strict host keys, no prompt.
    let home = d.join("home");
    let out = lab
        .ns
        .cmd("unshare")
        .args([
            "--mount",
            "sh",
            "-c",
            "mount --bind \"$0\" /root && ssh -o BatchMode=yes worker0 'echo reached $(hostname -s)'",
        ])
        .arg(&home)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("reached "), "{}", text(&out));

    // destroy takes the line out again (the VMs must be stopped first: end the stand-ins).
    let Lab { ns, d: lab_dir, _procs } = lab;
    drop(_procs);
    let lab = Lab { ns, d: lab_dir, _procs: Vec::new() };
    lab.ok(&["destroy", "--yes"]);
    assert_eq!(std::fs::read_to_string(&config).unwrap(), "Host example\n    User someone\n");
}
