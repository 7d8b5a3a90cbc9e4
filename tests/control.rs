//! The control socket of `kubenet serve`: who may use it, what a bad request gets, and the
//! client's message when no agent runs. The agent serves DNS only, on a loopback port.

#[path = "support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

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
