//! `kubenet service`: the systemd unit passes `systemd-analyze verify` and its ExecStart line,
//! run in a namespace the test creates with NOTIFY_SOCKET pointing at a socket the test
//! listens on, brings up a `serve` that says READY=1 once its ports are bound and answers DNS;
//! the launchd property list reads back (Python's plistlib) with the same program arguments.
//! Both start from the root-owned copy of the lab definition. A kubenet in a folder of uid
//! 65534 is not what the service runs: install plans a root-owned copy instead, and `doctor`
//! warns about a service installed with such a binary.

#[path = "support/mod.rs"]
mod support;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use support::{Netns, kubenet_bin, prerequisites, tools};

const LIBEXEC_BIN: &str = "/usr/local/libexec/kubenet/kubenet";
const SERVICE_CONFIG: &str = "/etc/kubenet/service.toml";

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

/// `kubenet --config d/kubenet.toml service install --print [--manager M]`, as if run with sudo
/// by uid 65534.
fn print(d: &Path, extra: &[&str]) -> String {
    let out = Command::new(kubenet_bin())
        .arg("--config")
        .arg(d.join("kubenet.toml"))
        .args(["--dir"])
        .arg(d.join("state"))
        .args(["service", "install", "--print"])
        .args(extra)
        .env("SUDO_UID", "65534")
        .env("SUDO_GID", "65534")
        .env("SUDO_USER", "nobody")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8(out.stdout).unwrap()
}

fn lab(d: &Path) {
    // NAT off: the namespace has nowhere to route to.
    let lab = support::test_lab().replace("nat = true", "nat = false");
    assert!(lab.contains("nat = false"));
    std::fs::write(d.join("kubenet.toml"), lab).unwrap();
}

#[test]
fn the_systemd_unit_verifies_and_its_exec_start_notifies_ready() {
    if prerequisites(&["systemd-analyze", "dig"]).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    lab(d);
    // The lab belongs to its owner, the service's SUDO_UID (see `print`): serve makes and reads
    // its files there with the owner's rights.
    support::run(Command::new("chown").args(["-R", "65534:65534"]).arg(d));
    let unit = print(d, &[]);
    let path = d.join("kubenet.service");
    std::fs::write(&path, &unit).unwrap();
    let out = Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&path).output().unwrap();
    // verify exits 0 even for keys it ignores: every complaint counts.
    assert!(out.status.success() && text(&out).trim().is_empty(), "systemd-analyze verify:\n{}", text(&out));

    // The ExecStart line, as systemd would run it (the test's paths need no quoting), with the
    // unit's environment and a notify socket of the test's own.
    let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).unwrap();
    assert!(!exec.contains('"'), "{exec}");
    let mut argv: Vec<&str> = exec.split_whitespace().collect();
    // This build runs where it is when only root can change it, else its root-owned copy (not
    // made by --print: this test runs the build).
    let exe = std::fs::canonicalize(kubenet_bin()).unwrap();
    let exe = exe.to_str().unwrap();
    assert!(argv[0] == exe || argv[0] == LIBEXEC_BIN, "{exec}");
    argv[0] = exe;
    // The service reads the root-owned copy install makes; --print makes none, so this test
    // points it back at the file it was made from.
    let config = d.join("kubenet.toml");
    assert_eq!(argv[1..3], ["--config", SERVICE_CONFIG], "{exec}");
    argv[2] = config.to_str().unwrap();
    assert!(unit.contains(&format!("a root-owned copy of {} made at install time", config.display())), "{unit}");
    let env = unit.lines().find_map(|l| l.strip_prefix("Environment=")).unwrap();
    let notify = d.join("notify.sock");
    let listener = UnixDatagram::bind(&notify).unwrap();
    listener.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let ns = Netns::new("svc");
    let mut cmd = ns.cmd(argv[0]);
    cmd.args(&argv[1..]).env("NOTIFY_SOCKET", &notify).env_remove("KUBENET_CONFIG");
    for kv in env.split_whitespace() {
        let (k, v) = kv.split_once('=').unwrap();
        cmd.env(k, v);
    }
    let start = Instant::now();
    let agent = support::Proc::spawn(cmd, &d.join("serve.log"));
    let mut buf = [0u8; 512];
    let n = listener.recv(&mut buf).unwrap_or_else(|e| panic!("no notification ({e}):\n{}", agent.log_text()));
    let message = String::from_utf8_lossy(&buf[..n]).into_owned();
    eprintln!("READY after {:.0} ms", start.elapsed().as_secs_f64() * 1000.0);
    assert_eq!(message.trim(), "READY=1");
    // Ready means ready: DNS answers on the lab's bridge address at once.
    let out =
        ns.cmd("dig").args(["+short", "+time=2", "+tries=1", "@192.168.1.1", "worker0.kubevms"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "192.168.1.14", "{}", text(&out));
    let log = agent.stop();
    assert!(log.contains("ready"), "{log}");
}

#[test]
fn the_launchd_plist_reads_back_with_the_same_arguments() {
    if tools(&["python3"]).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    lab(d);
    let plist = print(d, &["--manager", "launchd"]);
    let read = r#"
import json, plistlib, sys
p = plistlib.loads(sys.stdin.buffer.read())
print(json.dumps({k: p[k] for k in ["Label", "ProgramArguments", "RunAtLoad", "KeepAlive", "EnvironmentVariables", "StandardErrorPath"]}))
"#;
    let mut child = Command::new("python3")
        .args(["-c", read])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(plist.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "plistlib: {}\n{plist}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let exe = std::fs::canonicalize(kubenet_bin()).unwrap();
    let args = v["ProgramArguments"].as_array().unwrap();
    assert!(args[0] == serde_json::json!(exe) || args[0] == LIBEXEC_BIN, "{args:?}");
    // Started from root's copy, reloaded from the owner's file.
    let owners = d.join("kubenet.toml");
    let want =
        serde_json::json!(["--config", SERVICE_CONFIG, "--dir", d.join("state"), "serve", "--reload-from", owners]);
    assert_eq!(serde_json::json!(args[1..]), want);
    assert_eq!(v["Label"], "dev.kubenet.serve");
    assert_eq!(v["RunAtLoad"], true);
    assert_eq!(v["KeepAlive"], true);
    assert_eq!(v["EnvironmentVariables"]["SUDO_UID"], "65534");
    assert_eq!(v["StandardErrorPath"], "/var/log/kubenet.log");

    // Installing for another system's manager is refused; only printing is.
    let out = Command::new(kubenet_bin()).args(["service", "install", "--manager", "launchd"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "--manager needs --print: {}", text(&out));
}

/// A kubenet in a folder that uid 65534 owns: that user could swap the binary, so the
/// service must not run it. `install --print` (run as that user would through sudo) plans the
/// root-owned copy and says why; and `doctor`, with a unit that runs it installed (in a mount
/// namespace of the test's own, so the host's /etc/systemd/system is untouched), warns.
#[test]
fn a_binary_in_a_folder_others_own_is_copied_and_doctor_warns_about_it() {
    if prerequisites(&["unshare", "mount"]).is_some() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    lab(d);
    let theirs = d.join("nobody-bin");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    let bin = theirs.join("kubenet");
    std::fs::copy(kubenet_bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();

    let out = Command::new(&bin)
        .arg("--config")
        .arg(d.join("kubenet.toml"))
        .arg("--dir")
        .arg(d.join("state"))
        .args(["service", "install", "--print"])
        .env("SUDO_UID", "65534")
        .env("SUDO_GID", "65534")
        .env("SUDO_USER", "nobody")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let unit = String::from_utf8_lossy(&out.stdout).into_owned();
    let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).unwrap();
    assert!(exec.starts_with(&format!("{LIBEXEC_BIN} --config {SERVICE_CONFIG} ")), "{exec}");
    let why = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        why.contains(&format!(
            "install would copy {} to {LIBEXEC_BIN}: {} belongs to uid 65534, not root",
            bin.display(),
            theirs.display()
        )),
        "{why}"
    );

    // doctor with a unit installed that runs the binary in place (as an older kubenet wrote
    // it), then with one that runs a binary only root can change.
    let doctor_with = |exe: &Path| {
        let unit_text = unit
            .replace(&format!("{LIBEXEC_BIN} "), &format!("{} ", exe.display()))
            .replace(SERVICE_CONFIG, d.join("kubenet.toml").to_str().unwrap());
        let path = d.join("kubenet.service");
        std::fs::write(&path, unit_text).unwrap();
        let script = format!(
            "mount -t tmpfs none /etc/systemd/system && cp {} /etc/systemd/system/kubenet.service && exec \"$0\" \"$@\"",
            path.display()
        );
        let out = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script, kubenet_bin()])
            .args(["--dir", "state", "doctor"])
            .current_dir(d)
            .env("HOME", d)
            .env_remove("KUBENET_CONFIG")
            .output()
            .unwrap();
        let report = text(&out);
        report
            .lines()
            .find(|l| l.get(6..).is_some_and(|l| l.starts_with("service ")))
            .unwrap_or_else(|| panic!("{report}"))
            .to_owned()
    };
    let line = doctor_with(&bin);
    assert_eq!(
        line,
        format!(
            "warn  service          the root service runs what others than root can replace: {} belongs to uid 65534, not root",
            theirs.display()
        )
    );
    let root_copy = d.join("kubenet-root");
    std::fs::copy(kubenet_bin(), &root_copy).unwrap();
    std::fs::set_permissions(&root_copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    let line = doctor_with(&root_copy);
    assert_eq!(line, "ok    service          installed; its binary and lab definition are root's alone");
}

/// `kubenet man DIR`: a page per command, subcommands included, and `man -l` renders each
/// without a complaint.
#[test]
fn man_pages_render_for_every_command() {
    if tools(&["man"]).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(kubenet_bin()).arg("man").arg(dir.path()).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let mut pages: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    pages.sort();
    for want in
        ["kubenet.1", "kubenet-serve.1", "kubenet-snapshot-restore.1", "kubenet-service-install.1", "kubenet-up.1"]
    {
        assert!(pages.iter().any(|p| p == want), "{want} missing: {pages:?}");
    }
    assert!(text(&out).contains(&format!("wrote {} man pages", pages.len())), "{}", text(&out));
    for page in &pages {
        let out = Command::new("man")
            .args(["-l", "-P", "cat"])
            .arg(dir.path().join(page))
            .env("MANWIDTH", "80")
            .output()
            .unwrap();
        let name = page.trim_end_matches(".1");
        let shown = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && out.stderr.is_empty(), "{page}: {}", text(&out));
        assert!(shown.contains("NAME") && shown.contains("SYNOPSIS") && shown.contains(name), "{page}:\n{shown}");
    }
}

/// The packaging script, run from the workspace.
fn package(args: &[&str], out: &Path) -> Output {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/package");
    Command::new(script).args(args).env("OUT", out).env("KUBENET_PACKAGE_PROFILE", "dev").output().unwrap()
}

/// The Homebrew formula, rendered for a source archive of this checkout, is valid Ruby and
/// names that archive's SHA-256.
#[test]
fn the_homebrew_formula_is_valid_ruby_for_the_source_archive() {
    if tools(&["ruby", "git", "sha256sum"]).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = package(&["homebrew", "https://example.invalid/kubenet-0.1.0.tar.gz"], dir.path());
    assert!(out.status.success(), "{}", text(&out));
    let formula = dir.path().join("kubenet.rb");
    let check = Command::new("ruby").arg("-c").arg(&formula).output().unwrap();
    assert!(check.status.success() && text(&check).contains("Syntax OK"), "{}", text(&check));
    let archive = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "gz"))
        .unwrap();
    let sums = Command::new("sha256sum").arg(&archive).output().unwrap();
    let sum = String::from_utf8_lossy(&sums.stdout).split_whitespace().next().unwrap().to_owned();
    let text = std::fs::read_to_string(&formula).unwrap();
    assert!(
        text.contains(&format!("sha256 \"{sum}\""))
            && text.contains("url \"https://example.invalid/kubenet-0.1.0.tar.gz\""),
        "{text}"
    );
    assert!(text.contains("std_cargo_args(path: \"crates/kubenet\")"), "{text}");
    let listing = Command::new("tar").arg("tzf").arg(&archive).output().unwrap();
    assert!(String::from_utf8_lossy(&listing.stdout).lines().any(|l| l.ends_with("/crates/kubenet/Cargo.toml")));
}

/// The Debian package (cargo-deb) installs with dpkg, its kubenet runs, its man pages render,
/// and dpkg -r leaves nothing. Into a root of the test's own (`dpkg --root`), so the machine's
/// own packages are not touched; its dependencies (libc6, QEMU) are not in that root's database,
/// hence --force-depends.
#[test]
fn the_deb_installs_runs_and_removes_cleanly() {
    if tools(&["dpkg", "dpkg-deb", "man"]).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = package(&["deb"], dir.path());
    assert!(out.status.success(), "{}", text(&out));
    let deb = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .unwrap();
    let root = dir.path().join("root");
    for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    let dpkg = |args: &[&str]| {
        let o = Command::new("dpkg").arg(format!("--root={}", root.display())).args(args).output().unwrap();
        assert!(o.status.success(), "dpkg {args:?}: {}", text(&o));
        text(&o)
    };
    dpkg(&["--force-depends", "-i", deb.to_str().unwrap()]);
    let v = Command::new(root.join("usr/bin/kubenet")).arg("--version").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&v.stdout).trim(), format!("kubenet {}", env!("CARGO_PKG_VERSION")));
    for f in [
        "usr/share/man/man1/kubenet-snapshot-save.1.gz",
        "usr/share/bash-completion/completions/kubenet",
        "usr/share/kubenet/kubenet.toml",
    ] {
        assert!(root.join(f).is_file(), "{f} not installed");
    }
    let man = Command::new("man")
        .args(["-l", "-P", "cat"])
        .arg(root.join("usr/share/man/man1/kubenet-up.1.gz"))
        .output()
        .unwrap();
    assert!(man.status.success() && String::from_utf8_lossy(&man.stdout).contains("kubenet-up"), "{}", text(&man));

    dpkg(&["-r", "kubenet"]);
    let left: Vec<String> = walk(&root)
        .into_iter()
        .filter(|p| !p.starts_with(root.join("var/lib/dpkg")))
        .map(|p| p.display().to_string())
        .collect();
    assert!(left.is_empty(), "left after dpkg -r: {left:?}");
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
    }
    out
}
