//! Test hosts for kubenet's system tests: network namespaces and veth links the test creates
//! itself, the kubenet binary run inside them, and cleanup of exactly what was created.
//! Traffic never leaves these namespaces.
//!
//! These tests need root, iproute2 and the clients from scripts/install-test-deps.sh. Without
//! them a test prints why and returns; with CI=true (as `.ci/run` sets) a missing prerequisite
//! fails the test instead, so CI cannot pass by skipping.

#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static SEQ: AtomicU32 = AtomicU32::new(0);

pub fn kubenet_bin() -> &'static str {
    env!("CARGO_BIN_EXE_kubenet")
}

/// None when the test can run; else why not. Panics instead under CI=true.
pub fn prerequisites(tools: &[&str]) -> Option<String> {
    check(missing(tools))
}

/// As [`prerequisites`], for tests that need only tools (loopback, no namespaces, no root).
pub fn tools(tools: &[&str]) -> Option<String> {
    check(
        tools
            .iter()
            .find(|t| which(t).is_none())
            .map(|t| format!("`{t}` is not installed: run scripts/install-test-deps.sh")),
    )
}

/// Skips a test for `reason` (printed), or panics under CI=true.
pub fn skip(reason: &str) {
    check(Some(reason.to_owned()));
}

/// Whether `pid` is a live process (not gone, not a zombie waiting for its parent: a daemonized
/// QEMU's parent is init, which may reap it late).
pub fn pid_alive(pid: u64) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next());
    state.is_some_and(|s| s != 'Z')
}

fn check(reason: Option<String>) -> Option<String> {
    if let Some(r) = &reason {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI=true but this test cannot run: {r}");
        }
        eprintln!("SKIPPED: {r}");
    }
    reason
}

fn missing(tools: &[&str]) -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status.lines().find(|l| l.starts_with("Uid:")).is_some_and(|l| l.split_whitespace().nth(2) == Some("0"));
    if !root {
        return Some("needs root to create network namespaces (run the tests as root)".into());
    }
    for t in std::iter::once("ip").chain(tools.iter().copied()) {
        if which(t).is_none() {
            return Some(format!("`{t}` is not installed: run scripts/install-test-deps.sh"));
        }
    }
    None
}

pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/sbin", "/usr/sbin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// Waits until the file `p` holds `needle`; returns its text, or panics with it after `timeout`.
pub fn wait_file(p: &Path, needle: &str, timeout: Duration) -> String {
    let start = Instant::now();
    loop {
        let t = std::fs::read_to_string(p).unwrap_or_default();
        if t.contains(needle) {
            return t;
        }
        assert!(start.elapsed() < timeout, "{} has no {needle:?} after {timeout:?}:\n{t}", p.display());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One DHCP exchange by busybox's udhcpc on `iface` in `ns`, configuring nothing: whether it
/// got a lease, and what it said ("lease of IP obtained from SERVER").
pub fn udhcpc_once(ns: &Netns, iface: &str) -> (bool, String) {
    let out = ns
        .cmd("udhcpc")
        .args(["-i", iface, "-n", "-q", "-f", "-t", "4", "-T", "2", "-s", "/bin/true"])
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

/// A daemonized process this test started (a QEMU), killed by its pid if the test ends before it
/// stopped it, so a failed assertion leaves nothing running.
pub struct KillOnDrop(pub u64);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if pid_alive(self.0) {
            let _ = Command::new("kill").args(["-KILL", &self.0.to_string()]).status();
        }
    }
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!("kn{}{}-{}", tag, SEQ.fetch_add(1, Ordering::Relaxed), std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> Output {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command run inside the namespace.
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A veth pair with one end in each namespace, created there directly (never in the host's).
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) {
    run(Command::new("ip")
        .args(["link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns", &b.name]));
    a.ip(&["link", "set", a_if, "up"]);
    b.ip(&["link", "set", b_if, "up"]);
}

/// A server namespace and a client namespace joined by veth: `kns` on the server's side holds
/// `server_cidr` (the lab's host address), `knc` is the client's.
pub struct Pair {
    pub server: Netns,
    pub client: Netns,
}

pub fn pair(tag: &str, server_cidr: &str) -> Pair {
    let server = Netns::new(&format!("{tag}s"));
    let client = Netns::new(&format!("{tag}c"));
    veth(&server, "kns", &client, "knc");
    server.ip(&["addr", "add", server_cidr, "dev", "kns"]);
    Pair { server, client }
}

/// A process this test started, killed by its PID on drop.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(mut cmd: Command, log: &Path) -> Proc {
        let f = std::fs::File::create(log).unwrap();
        cmd.stdout(f.try_clone().unwrap()).stderr(f).stdin(Stdio::null());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        Proc { child, log: log.to_path_buf() }
    }

    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Waits until the log contains `needle`; panics with the log after `timeout`.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) {
        let start = Instant::now();
        loop {
            if self.log_text().contains(needle) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("process exited ({status}) before logging {needle:?}:\n{}", self.log_text());
            }
            if start.elapsed() > timeout {
                panic!("no {needle:?} after {timeout:?}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends a signal to this process only.
    pub fn signal(&self, sig: &str) {
        run(Command::new("kill").args([&format!("-{sig}"), &self.child.id().to_string()]));
    }

    /// SIGTERM, then waits (up to 10 s) for a clean exit; returns the log.
    pub fn stop(mut self) -> String {
        self.signal("TERM");
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(status.success(), "exited with {status} after SIGTERM:\n{}", self.log_text());
                return self.log_text();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("did not stop within 10 s of SIGTERM:\n{}", self.log_text());
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The reference lab with its DNS upstream pointed at the discard port on the namespace's own
/// loopback: a test server never forwards to the host's real resolvers.
pub fn test_lab() -> String {
    let reference = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/kubenet.toml")).unwrap();
    assert!(reference.contains("upstream = []"));
    reference.replace("upstream = []", "upstream = [\"127.0.0.1:9\"]")
}

/// The test lab for real QEMU here: TCG (this machine's /dev/kvm opens but runs no guest, and
/// TCG runs anywhere) and 256 MiB a VM, so a few of them fit beside each other.
pub fn tcg_lab() -> String {
    let lab = test_lab()
        .replace("accelerator = \"auto\"", "accelerator = \"tcg\"")
        .replace("memory = \"2G\"", "memory = \"256M\"")
        .replace("memory = \"8G\"", "memory = \"256M\"");
    assert!(
        lab.contains("accelerator = \"tcg\"") && !lab.contains("memory = \"2G\"") && !lab.contains("memory = \"8G\"")
    );
    lab
}

/// The test lab with its DNS upstream replaced (a fake the test runs itself).
pub fn test_lab_with_upstream(upstream: &str) -> String {
    test_lab().replace("upstream = [\"127.0.0.1:9\"]", &format!("upstream = [\"{upstream}\"]"))
}

/// A port free on 127.0.0.1 for both UDP and TCP (a DNS server binds both).
pub fn free_port() -> u16 {
    loop {
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = u.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// `kubenet serve --dns-only` on 127.0.0.1:`port`, run from `dir` (so it uses `dir/kubenet.toml`,
/// written from [`test_lab`] unless the test wrote its own), once it says "ready". No root
/// needed. SUDO_UID/SUDO_GID are removed so the control socket is the running user's.
pub fn serve_dns_only(dir: &Path, port: u16) -> Proc {
    if !dir.join("kubenet.toml").exists() {
        std::fs::write(dir.join("kubenet.toml"), test_lab()).unwrap();
    }
    let mut cmd = Command::new(kubenet_bin());
    cmd.current_dir(dir)
        .args(["serve", "--dns-only", "--no-bridge", "--dns-listen", "127.0.0.1", "--dns-port", &port.to_string()])
        .env_remove("KUBENET_CONFIG")
        .env_remove("SUDO_UID")
        .env_remove("SUDO_GID")
        .env("RUST_LOG", "debug");
    let mut p = Proc::spawn(cmd, &dir.join("serve.log"));
    p.wait_for("ready", Duration::from_secs(15));
    p
}

/// `kubenet serve --no-bridge` in `ns`, with its state in `dir`, once it says "ready". Uses
/// `dir/kubenet.toml`, written from [`test_lab`] unless the test wrote its own.
pub fn serve(ns: &Netns, dir: &Path, extra: &[&str]) -> Proc {
    let mut args = vec!["--no-bridge"];
    args.extend(extra);
    serve_in(ns, dir, &args)
}

/// `kubenet serve` with its Linux host network (bridge, taps; NAT as the lab says) in `ns`.
pub fn serve_bridged(ns: &Netns, dir: &Path) -> Proc {
    serve_in(ns, dir, &[])
}

/// The unprivileged owner of the labs the attack and fault tests make: nobody, a uid with no
/// rights of its own on any test host.
pub const OWNER: &str = "65534";

/// `kubenet serve` with its bridge in `ns` for [`OWNER`]'s lab in `dir` (SUDO_UID, as `sudo
/// kubenet serve` run by that user), state in `dir/state`, once it says "ready".
pub fn serve_for_owner(ns: &Netns, dir: &Path) -> Proc {
    let mut cmd = ns.cmd(kubenet_bin());
    cmd.current_dir(dir)
        .args(["serve", "--dir"])
        .arg(dir.join("state"))
        .env_remove("KUBENET_CONFIG")
        .env("SUDO_UID", OWNER)
        .env("SUDO_GID", OWNER)
        .env("RUST_LOG", "debug");
    let mut p = Proc::spawn(cmd, &dir.join("serve.log"));
    p.wait_for("ready", Duration::from_secs(15));
    p
}

/// `program ARGS` as [`OWNER`] (setpriv), from `dir` with HOME at `dir/home`, in `ns` when
/// given.
pub fn as_owner(ns: Option<&Netns>, dir: &Path, program: &str, args: &[&str]) -> Output {
    let mut c = match ns {
        Some(ns) => ns.cmd("setpriv"),
        None => Command::new("setpriv"),
    };
    c.args([&format!("--reuid={OWNER}"), &format!("--regid={OWNER}"), "--clear-groups", "--", program])
        .args(args)
        .current_dir(dir)
        .env("HOME", dir.join("home"))
        .env_remove("KUBENET_CONFIG")
        .env_remove("SUDO_UID")
        .env_remove("SUDO_GID");
    c.output().unwrap_or_else(|e| panic!("{c:?}: {e}"))
}

fn serve_in(ns: &Netns, dir: &Path, extra: &[&str]) -> Proc {
    if !dir.join("kubenet.toml").exists() {
        std::fs::write(dir.join("kubenet.toml"), test_lab()).unwrap();
    }
    let mut cmd = ns.cmd(kubenet_bin());
    // The test's lab is root's: under `sudo scripts/test`, SUDO_UID would make serve work for
    // the developer instead, in root's folders.
    cmd.current_dir(dir)
        .args(["serve", "--dir"])
        .arg(dir.join("state"))
        .args(extra)
        .env_remove("SUDO_UID")
        .env_remove("SUDO_GID")
        .env_remove("KUBENET_CONFIG")
        .env("RUST_LOG", "debug");
    let n = std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
    let mut p = Proc::spawn(cmd, &dir.join(format!("serve{n}.log")));
    p.wait_for("ready", Duration::from_secs(15));
    p
}

/// Runs `cmd` with piped input and output, as `kubenet console` is used from a script: writes
/// `input` (again every 2 s) until the output shows `want` or `timeout` passes, then closes
/// the input, which ends the command, and asserts it ended well. Returns what it printed.
pub fn converse(mut cmd: Command, input: &[u8], want: &str, timeout: Duration) -> String {
    use std::io::Write;
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut stdin = child.stdin.take().unwrap();
    let mut seen = Vec::new();
    let shows = |seen: &[u8]| String::from_utf8_lossy(seen).contains(want);
    let deadline = Instant::now() + timeout;
    while !shows(&seen) && Instant::now() < deadline {
        stdin.write_all(input).unwrap();
        let until = Instant::now() + Duration::from_secs(2);
        while let Some(left) = until.checked_duration_since(Instant::now())
            && let Ok(chunk) = rx.recv_timeout(left)
        {
            seen.extend(chunk);
            if shows(&seen) {
                break;
            }
        }
    }
    drop(stdin);
    let status = child.wait().unwrap();
    assert!(status.success(), "{cmd:?}: {status}");
    String::from_utf8_lossy(&seen).into_owned()
}
