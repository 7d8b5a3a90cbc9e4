//! The control socket of `kubenet serve`: `STATE/kubenet.sock`, mode 0600, owned by the user who
//! ran sudo, so that every other command runs as that user. Only root and that user get
//! answers (checked again per connection with SO_PEERCRED).
//!
//! Protocol: JSON lines. Each request is one object with a `cmd`; each answer is one object with
//! `ok` and either the result or `error`. A connection may carry several requests.
//!
//! ```text
//! {"cmd":"status"}  -> {"ok":true,"status":{"config":..,"vms":7,"leases":3,"dns":{..}}}
//! {"cmd":"leases"}  -> {"ok":true,"leases":[{"mac":..,"ip":..,"hostname":..,"expires":..}]}
//! {"cmd":"reload"}  -> {"ok":true,"reloaded":"<config>","warnings":[..]} or {"ok":false,"error":".."}
//! {"cmd":"vms"}     -> {"ok":true,"vms":[{"name":"gateway","state":"running","pid":..,"since":..},..]}
//! {"cmd":"start","vms":["worker0"]}  -> {"ok":true,"vms":[{"name":"worker0","result":"started","pid":..}]}
//! {"cmd":"stop","vms":[],"grace_secs":60} -> {"ok":true,"vms":[{"name":..,"result":"powerdown"},..]}
//! {"cmd":"snapshot","op":"save","tag":"s1","vms":["worker0"]} -> {"ok":true,"vms":["worker0"]}
//! ```
//!
//! `start` and `stop` take VM names (none: every VM); the command line QEMU runs is always
//! built from the lab definition, never from the request. A VM that fails has an `error` in its
//! entry; the request itself fails only for an unknown name. `snapshot` (op `save`, `load` or
//! `delete`) works on running VMs over QMP, all paused, then all resumed; a save that fails on
//! one VM is deleted again from the others, and the request fails.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// The socket's file name in the state directory.
pub const SOCKET: &str = "kubenet.sock";
/// A request line longer than this is refused.
const MAX_LINE: usize = 64 * 1024;

#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
enum Request {
    Status,
    Leases,
    Reload,
    Vms,
    Start {
        #[serde(default)]
        vms: Vec<String>,
    },
    Stop {
        #[serde(default)]
        vms: Vec<String>,
        #[serde(default)]
        grace_secs: Option<u64>,
    },
    Snapshot {
        op: kubenet_vm::live::LiveOp,
        tag: String,
        vms: Vec<String>,
    },
}

/// How long `stop` waits for a guest to power off before SIGTERM, unless the request says.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

/// A reload's outcome: the definition now served and what waits for a restart, or why it was
/// refused.
pub type ReloadResult = Result<(String, Vec<String>), String>;

/// A reload asked for over the socket; the agent's main loop answers it.
pub type ReloadRequest = oneshot::Sender<ReloadResult>;

/// What the agent shares with the socket.
pub struct Shared {
    /// The user who may ask besides root.
    pub owner: u32,
    pub status: Box<dyn Fn() -> Value + Send + Sync>,
    /// Asks the DHCP server for its active leases; None when it does not run (`--dns-only`).
    pub leases: Option<mpsc::UnboundedSender<kubenet_dhcp::server::LeaseQuery>>,
    pub reloads: mpsc::UnboundedSender<ReloadRequest>,
    pub vms: crate::vms::Supervisor,
}

/// The user behind sudo (SUDO_UID/SUDO_GID), else the one running.
pub fn owner() -> (u32, u32) {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse().ok());
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    (env("SUDO_UID").unwrap_or(uid), env("SUDO_GID").unwrap_or(gid))
}

/// Binds the socket: a stale file from a crashed agent is replaced, a live agent is an error.
pub fn bind(state_dir: &Path, owner: (u32, u32)) -> anyhow::Result<(UnixListener, Removal)> {
    use anyhow::Context;
    let path = state_dir.join(SOCKET);
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            anyhow::bail!(
                "another kubenet serve is running for {} (its socket {} answers)",
                state_dir.display(),
                path.display()
            );
        }
        std::fs::remove_file(&path).with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(&path).with_context(|| format!("cannot create the control socket {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    std::os::unix::fs::chown(&path, Some(owner.0), Some(owner.1))
        .with_context(|| format!("cannot give {} to uid {}", path.display(), owner.0))?;
    Ok((listener, Removal(path)))
}

/// Removes the socket file when the agent stops.
pub struct Removal(PathBuf);

impl Drop for Removal {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub async fn serve(listener: UnixListener, shared: Arc<Shared>, shutdown: CancellationToken) -> io::Result<()> {
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => { tracing::debug!("control accept: {e}"); continue; }
            },
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, &shared).await {
                tracing::debug!("control connection: {e}");
            }
        });
    }
}

async fn connection(stream: UnixStream, shared: &Shared) -> io::Result<()> {
    let uid = stream.peer_cred()?.uid();
    let (read, mut write) = stream.into_split();
    if uid != 0 && uid != shared.owner {
        tracing::warn!(uid, "control socket: refused a request from uid {uid}");
        // Take the request line first, so that the refusal is not lost to a client still
        // writing when the connection closes.
        let mut first = String::new();
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(2), BufReader::new(read).read_line(&mut first)).await;
        let refusal = json!({"ok": false, "error": format!("permission denied: only root and uid {} may use this socket", shared.owner)});
        return send(&mut write, &refusal).await;
    }
    let mut lines = BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await? {
        if line.len() > MAX_LINE {
            return send(&mut write, &json!({"ok": false, "error": "request too long"})).await;
        }
        let answer = match serde_json::from_str::<Request>(&line) {
            Err(e) => {
                json!({"ok": false, "error": format!("bad request: {e}; send one JSON object per line, e.g. {{\"cmd\":\"status\"}}")})
            }
            Ok(Request::Status) => json!({"ok": true, "status": (shared.status)()}),
            Ok(Request::Leases) => json!({"ok": true, "leases": leases(shared).await}),
            Ok(Request::Vms) => json!({"ok": true, "vms": shared.vms.states()}),
            Ok(Request::Start { vms }) => match shared.vms.start(&vms).await {
                Ok(v) => json!({"ok": true, "vms": v}),
                Err(e) => json!({"ok": false, "error": e}),
            },
            Ok(Request::Stop { vms, grace_secs }) => {
                let grace = grace_secs.map_or(STOP_GRACE, std::time::Duration::from_secs);
                match shared.vms.stop(&vms, grace).await {
                    Ok(v) => json!({"ok": true, "vms": v}),
                    Err(e) => json!({"ok": false, "error": e}),
                }
            }
            Ok(Request::Snapshot { op, tag, vms }) => match shared.vms.snapshot(op, &tag, &vms).await {
                Ok(done) => json!({"ok": true, "vms": done}),
                Err(e) => json!({"ok": false, "error": e}),
            },
            Ok(Request::Reload) => {
                let (tx, rx) = oneshot::channel();
                match shared.reloads.send(tx).ok().map(|()| rx) {
                    Some(rx) => match rx.await {
                        Ok(Ok((source, later))) => json!({"ok": true, "reloaded": source, "warnings": later}),
                        Ok(Err(e)) => json!({"ok": false, "error": e}),
                        Err(_) => json!({"ok": false, "error": "the agent is stopping"}),
                    },
                    None => json!({"ok": false, "error": "the agent is stopping"}),
                }
            }
        };
        send(&mut write, &answer).await?;
    }
    Ok(())
}

/// The active leases, asked of the DHCP server when the question comes (not kept up to date on
/// every change, which would cost an allocation per lease per ACK).
async fn leases(shared: &Shared) -> Vec<Value> {
    let Some(tx) = &shared.leases else { return Vec::new() };
    let (reply, rx) = oneshot::channel();
    if tx.send(reply).is_err() {
        return Vec::new();
    }
    rx.await
        .unwrap_or_default()
        .into_iter()
        .map(|l| json!({"mac": l.mac.to_string(), "ip": l.ip, "hostname": l.hostname, "expires": l.expires}))
        .collect()
}

async fn send(w: &mut tokio::net::unix::OwnedWriteHalf, v: &Value) -> io::Result<()> {
    let mut line = serde_json::to_vec(v).map_err(io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await
}

/// One request from a command-line client (`{"cmd": ...}` and its arguments); the agent's
/// answer.
pub fn request(state_dir: &Path, req: &Value) -> anyhow::Result<Value> {
    use std::io::{BufRead, Write};
    let path = state_dir.join(SOCKET);
    let mut s = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => {
            anyhow::bail!("kubenet serve is not running (no {}): start it with `sudo kubenet serve`", path.display())
        }
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!("cannot reach kubenet serve at {}", path.display())));
        }
    };
    // Read an answer even if the write failed: the agent may have answered (a refusal) and
    // closed first.
    let written = writeln!(s, "{req}");
    let mut line = String::new();
    let read = std::io::BufReader::new(s).read_line(&mut line);
    if line.is_empty() {
        written?;
        read?;
        anyhow::bail!("kubenet serve closed the connection without an answer");
    }
    let v: Value = serde_json::from_str(&line)
        .map_err(|e| anyhow::anyhow!("kubenet serve answered something that is not JSON ({e}): {line:?}"))?;
    if v["ok"] != true {
        anyhow::bail!("kubenet serve: {}", v["error"].as_str().unwrap_or("request failed"));
    }
    Ok(v)
}
