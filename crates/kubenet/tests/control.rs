//! The control socket of `kubenet serve`: who may use it, what a bad request gets, and the
//! client's message when no agent runs. The agent serves DNS only, on a loopback port.
//!
//! The attacks of issue 26 item 7 come from the lab's owner, an unprivileged uid (65534) that
//! holds the socket: a grace time that would overflow, a line without an end, clients that
//! connect and send nothing. After each the agent still answers, with its memory bounded.
//!
//! Linux only: the owner's connections drop one thread's credentials with Linux's raw per-thread
//! system calls (and the macOS build of these tests would run nothing as root anyway).
#![cfg(target_os = "linux")]

#[path = "support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use support::{Proc, kubenet_bin};

fn kubenet(dir: &std::path::Path) -> Command {
    let mut c = Command::new(kubenet_bin());
    c.current_dir(dir).env_remove("KUBENET_CONFIG").env_remove("SUDO_UID").env_remove("SUDO_GID");
    c
}

fn start(dir: &std::path::Path) -> Proc {
    support::serve_dns_only(dir, support::free_port())
}

fn ask(conn: &mut UnixStream, line: &str) -> serde_json::Value {
    writeln!(conn, "{line}").unwrap();
    let mut answer = String::new();
    BufReader::new(conn.try_clone().unwrap()).read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
}

#[test]
fn without_an_agent_the_client_says_how_to_start_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = kubenet(dir.path()).arg("reload").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("kubenet serve is not running") && err.contains("sudo kubenet serve"), "{err}");
}

#[test]
fn requests_bad_requests_and_reload() {
    let dir = tempfile::tempdir().unwrap();
    let port = support::free_port();
    let server = support::serve_dns_only(dir.path(), port);
    let sock = dir.path().join("kubenet.sock");
    assert_eq!(std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777, 0o600);

    let mut conn = UnixStream::connect(&sock).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // Every answer carries the protocol version; an error is {"v":2,"error":...}.
    let bad = ask(&mut conn, "this is not json");
    assert_eq!(bad["v"], 2, "{bad}");
    assert!(bad["error"].as_str().unwrap().starts_with("bad request"), "{bad}");
    let unknown = ask(&mut conn, r#"{"v":2,"cmd":"format-disk"}"#);
    assert!(unknown["error"].as_str().unwrap().starts_with("bad request"), "{unknown}");
    // A client of the untyped protocol (no version) is told what is wrong, not "bad request".
    let old = ask(&mut conn, r#"{"cmd":"status"}"#);
    let why = old["error"].as_str().unwrap();
    assert!(why.starts_with("version mismatch: this kubenet serve speaks control protocol 2, the client 1"), "{old}");
    // The same connection still works after all three.
    let status = ask(&mut conn, r#"{"v":2,"cmd":"status"}"#);
    assert_eq!(status["ok"]["status"]["vms"], 7, "{status}");
    assert_eq!(status["ok"]["status"]["pid"], server.child.id(), "{status}");
    let leases = ask(&mut conn, r#"{"v":2,"cmd":"leases"}"#);
    assert_eq!(leases["ok"]["leases"], serde_json::json!([]));

    let out = kubenet(dir.path()).arg("reload").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "reloaded kubenet.toml");

    // A second serve for the same lab, on the same port: named as what it is, with the first
    // one's pid, before it tries a port.
    let out = kubenet(dir.path())
        .args(["serve", "--dns-only", "--no-bridge", "--dns-listen", "127.0.0.1", "--dns-port", &port.to_string()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let want = format!("kubenet serve is already running for {} (pid {})", dir.path().display(), server.child.id());
    assert!(err.contains(&want), "{want}\n{err}");

    // What a reload cannot change live comes back to the client, not only to serve's log.
    let toml = std::fs::read_to_string(dir.path().join("kubenet.toml")).unwrap();
    let moved = toml.replace("upstream = [\"127.0.0.1:9\"]", "upstream = [\"127.0.0.1:10\"]");
    assert_ne!(moved, toml);
    std::fs::write(dir.path().join("kubenet.toml"), &moved).unwrap();
    let out = kubenet(dir.path()).arg("reload").output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("warning: network.upstream changed: it takes effect when kubenet serve restarts"), "{said}");
    // A broken definition: the client itself stops at it (exit 2, as `config check`), and the
    // agent, asked directly, refuses the reload and keeps serving.
    std::fs::write(dir.path().join("kubenet.toml"), "colour = 1\n").unwrap();
    let out = kubenet(dir.path()).arg("reload").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("colour: unknown field"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let refused = ask(&mut conn, r#"{"v":2,"cmd":"reload"}"#);
    assert!(refused.get("ok").is_none(), "{refused}");
    let why = refused["error"].as_str().unwrap();
    assert!(why.starts_with("reload refused, still serving the previous definition: "), "{refused}");
    assert!(why.contains("colour: unknown field"), "{refused}");
    assert_eq!(ask(&mut conn, r#"{"v":2,"cmd":"status"}"#)["ok"]["status"]["vms"], 7);

    drop(conn);
    server.stop();
    assert!(!sock.exists(), "the socket outlived the agent");
}

#[test]
fn another_user_gets_no_answer() {
    use std::os::unix::process::CommandExt;
    if support::prerequisites(&[]).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The other user must be able to reach the directory to try at all.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut server = start(dir.path());
    let out = kubenet(dir.path()).arg("reload").uid(65534).gid(65534).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "uid 65534 was answered");
    assert!(String::from_utf8_lossy(&out.stderr).contains("kubenet"), "{}", String::from_utf8_lossy(&out.stderr));
    // Even with the file mode opened up, the agent checks the peer's uid itself.
    let sock = dir.path().join("kubenet.sock");
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = kubenet(dir.path()).arg("reload").uid(65534).gid(65534).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "uid 65534 was answered: {} {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        server.log_text()
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("permission denied: only root and uid 0 may use this socket"), "{err}");
    assert!(server.alive());
    assert!(server.log_text().contains("refused a request from uid 65534"), "{}", server.log_text());
    assert!(!server.log_text().contains("reloaded"), "{}", server.log_text());
    server.stop();
}

/// The owner in the attacks below: an unprivileged uid with no home and no groups.
const OWNER: u32 = 65534;

/// `kubenet serve --dns-only` for a lab that `OWNER` made and ran `sudo` from: `dir` is theirs,
/// and SUDO_UID/SUDO_GID name them. None (the test skips) without root.
fn serve_for_owner(dir: &std::path::Path) -> Option<Proc> {
    if support::prerequisites(&[]).is_some() {
        return None;
    }
    std::fs::write(dir.join("kubenet.toml"), support::test_lab()).unwrap();
    std::os::unix::fs::chown(dir, Some(OWNER), Some(OWNER)).unwrap();
    std::os::unix::fs::chown(dir.join("kubenet.toml"), Some(OWNER), Some(OWNER)).unwrap();
    let port = support::free_port().to_string();
    let mut cmd = Command::new(kubenet_bin());
    cmd.current_dir(dir)
        .args(["serve", "--dns-only", "--no-bridge", "--dns-listen", "127.0.0.1", "--dns-port", &port])
        .env_remove("KUBENET_CONFIG")
        .env("SUDO_UID", OWNER.to_string())
        .env("SUDO_GID", OWNER.to_string())
        .env("RUST_LOG", "debug");
    let mut p = Proc::spawn(cmd, &dir.join("serve.log"));
    p.wait_for("ready", Duration::from_secs(15));
    Some(p)
}

/// A connection made by `uid` itself: a thread of this test drops to that uid, with no groups,
/// and connects, so the agent's SO_PEERCRED and the file system see only that user. Linux's
/// credentials are per thread underneath libc's wrappers, so the raw calls change this thread
/// alone, which then ends; the rest of the test stays root.
fn connect_as(uid: u32, path: &std::path::Path) -> UnixStream {
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        // SAFETY: raw setgroups/setresgid/setresuid on this thread's own credentials; they take
        // no pointers but setgroups' (a null list of length 0).
        let dropped = unsafe {
            libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) == 0
                && libc::syscall(libc::SYS_setresgid, uid, uid, uid) == 0
                && libc::syscall(libc::SYS_setresuid, uid, uid, uid) == 0
        };
        assert!(dropped, "cannot drop this thread to uid {uid}: {}", std::io::Error::last_os_error());
        let s = UnixStream::connect(&path).unwrap_or_else(|e| panic!("uid {uid} cannot connect: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s
    })
    .join()
    .unwrap()
}

/// The agent's peak resident memory (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).expect("VmHWM in /proc/PID/status");
    kb.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap() * 1024
}

fn status_answers(sock: &std::path::Path) {
    let mut conn = connect_as(OWNER, sock);
    let status = ask(&mut conn, r#"{"v":2,"cmd":"status"}"#);
    assert_eq!(status["ok"]["status"]["vms"], 7, "{status}");
}

#[test]
fn a_grace_time_past_the_clock_is_refused_and_the_agent_lives() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut server) = serve_for_owner(dir.path()) else { return };
    let sock = dir.path().join("kubenet.sock");
    let mut conn = connect_as(OWNER, &sock);
    // 2^64-1 seconds: once "overflow when adding duration to instant", a panic that took DNS and
    // DHCP down with it.
    let stop = ask(&mut conn, r#"{"v":2,"cmd":"stop","vms":["worker0"],"grace_secs":18446744073709551615}"#);
    let why = stop["error"].as_str().unwrap_or_else(|| panic!("answered: {stop}"));
    assert!(why.contains("grace_secs 18446744073709551615 is out of range: it must be 0 to 3600"), "{stop}");
    // The most a grace time may be is accepted (no VM runs, so nothing waits).
    let ok = ask(&mut conn, r#"{"v":2,"cmd":"stop","vms":["worker0"],"grace_secs":3600}"#);
    assert_eq!(ok["ok"]["stopped"][0]["result"], "notrunning", "{ok}");
    // Other numbers and names out of range, on the same connection.
    let many = format!(r#"{{"v":2,"cmd":"start","vms":{}}}"#, serde_json::json!(vec!["worker0"; 1025]));
    assert!(ask(&mut conn, &many)["error"].as_str().unwrap().contains("vms lists 1025 names: at most 1024"));
    let tag = ask(&mut conn, r#"{"v":2,"cmd":"snapshot","op":"save","tag":"../x","vms":[]}"#);
    assert!(tag["error"].as_str().unwrap().starts_with("bad request: tag: `../x` cannot name a snapshot"), "{tag}");
    assert_eq!(ask(&mut conn, r#"{"v":2,"cmd":"status"}"#)["ok"]["status"]["vms"], 7);
    status_answers(&sock);
    assert!(server.alive(), "{}", server.log_text());
    assert!(!server.log_text().contains("panicked"), "{}", server.log_text());
    drop(conn);
    server.stop();
}

#[test]
fn a_line_without_an_end_is_refused_with_memory_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut server) = serve_for_owner(dir.path()) else { return };
    let sock = dir.path().join("kubenet.sock");
    let pid = server.child.id();
    let before = peak_rss(pid);
    let mut conn = connect_as(OWNER, &sock);
    conn.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    // 64 MiB of one JSON string and no newline, in 1 MiB writes, until the agent closes or the
    // 64 MiB are out: bounded in count (64 writes) and time (5 s a write).
    let chunk = vec![b'a'; 1 << 20];
    let mut sent = 0usize;
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    conn.write_all(b"{\"v\":2,\"cmd\":\"").unwrap();
    for _ in 0..64 {
        match conn.write_all(&chunk) {
            Ok(()) => sent += chunk.len(),
            Err(_) => break,
        }
    }
    let mut answer = String::new();
    let _ = reader.read_line(&mut answer);
    // Either the agent's answer, or (if it came after the socket closed) an empty read.
    assert!(
        answer.is_empty() || answer.contains("request too long: a request line is at most 65536 bytes"),
        "{answer:?}"
    );
    assert!(
        answer.contains("request too long") || sent < 64 << 20,
        "the agent took all 64 MiB and said nothing: {answer:?}"
    );
    let peak = peak_rss(pid);
    assert!(peak < 64_000_000, "the agent's peak RSS went from {before} to {peak} bytes");
    status_answers(&sock);
    assert!(server.alive(), "{}", server.log_text());
    drop(conn);
    server.stop();
}

#[test]
fn silent_clients_are_dropped_and_capped_while_others_are_answered() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut server) = serve_for_owner(dir.path()) else { return };
    let sock = dir.path().join("kubenet.sock");
    let opened = Instant::now();
    // One client connects and sends nothing, another half a request line.
    let mut silent = connect_as(OWNER, &sock);
    let mut half = connect_as(OWNER, &sock);
    half.write_all(br#"{"v":2,"cmd":"#).unwrap();
    // A third asks 20,000 times and never reads: the agent's answers fill the socket.
    let mut deaf = connect_as(OWNER, &sock);
    deaf.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
    let asks = format!("{}\n", r#"{"v":2,"cmd":"status"}"#).repeat(20_000);
    let _ = deaf.write_all(asks.as_bytes());
    // Meanwhile another is answered at once.
    let asked = Instant::now();
    status_answers(&sock);
    assert!(asked.elapsed() < Duration::from_secs(2), "status took {:?}", asked.elapsed());
    // The connections past the cap (32) are told so and closed at once, not queued.
    std::thread::sleep(Duration::from_millis(300));
    let held: Vec<UnixStream> = (0..29).map(|_| connect_as(OWNER, &sock)).collect();
    let mut extra = connect_as(OWNER, &sock);
    let mut busy = String::new();
    BufReader::new(extra.try_clone().unwrap()).read_line(&mut busy).unwrap();
    assert!(busy.contains("busy: 32 control connections are open; try again"), "{busy:?}");
    let mut rest = Vec::new();
    assert_eq!(std::io::Read::read_to_end(&mut extra, &mut rest).unwrap(), 0, "not closed");
    // The silent ones are closed after the timeout (10 s), not before, and not much later.
    for (what, conn) in [("silent", &mut silent), ("half a line", &mut half)] {
        let mut rest = Vec::new();
        let n = std::io::Read::read_to_end(conn, &mut rest).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(n, 0, "{what}: {:?}", String::from_utf8_lossy(&rest));
        let after = opened.elapsed();
        assert!(after >= Duration::from_secs(9) && after < Duration::from_secs(16), "{what} closed after {after:?}");
    }
    // The deaf one, read only once its answer has waited past the timeout, was closed: it gets
    // at most what fitted in the socket, then the end (a reset, as its requests went unread).
    std::thread::sleep(Duration::from_secs(12).saturating_sub(opened.elapsed()));
    let mut deaf_reader = BufReader::new(deaf);
    let mut answered = 0;
    let mut line = String::new();
    while answered < 20_000 && matches!(deaf_reader.read_line(&mut line), Ok(n) if n > 0) {
        answered += 1;
        line.clear();
    }
    assert!(answered < 20_000, "all {answered} answers went to a client that read none for 12 s");
    drop(held);
    // Once the silent ones are gone, there is room again.
    let start = Instant::now();
    loop {
        let mut conn = connect_as(OWNER, &sock);
        let a = ask(&mut conn, r#"{"v":2,"cmd":"status"}"#);
        if a["ok"]["status"]["vms"] == 7 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "still {a} after the silent clients left");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(server.alive(), "{}", server.log_text());
    assert!(server.log_text().contains("no request line within 10s"), "{}", server.log_text());
    server.stop();
}
