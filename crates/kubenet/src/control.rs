//! The control socket of `kubenet serve`: `STATE/kubenet.sock`, mode 0600, owned by the user who
//! ran sudo, so that every other command runs as that user. Only root and that user get
//! answers (checked again per connection with SO_PEERCRED).
//!
//! Protocol: [`proto`], JSON lines of typed requests and answers with a version. `start` and
//! `stop` take VM names (none: every VM); the command line QEMU runs is always built from the
//! lab definition, never from the request. A VM that fails has an error in its entry; the
//! request itself fails only for an unknown name. `snapshot` (op `save`, `load` or `delete`)
//! works on running VMs over QMP, all paused, then all resumed; a save that fails on one VM is
//! deleted again from the others, and the request fails.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::proto::{self, Answer, Body, Request, Response};

/// The socket's file name in the state directory.
pub const SOCKET: &str = "kubenet.sock";
/// A request line longer than this is refused.
const MAX_LINE: usize = 64 * 1024;

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
    pub status: Box<dyn Fn() -> proto::StatusReport + Send + Sync>,
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
        let refusal = format!("permission denied: only root and uid {} may use this socket", shared.owner);
        return send(&mut write, Body::Error(refusal)).await;
    }
    let mut lines = BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await? {
        if line.len() > MAX_LINE {
            return send(&mut write, Body::Error("request too long".into())).await;
        }
        let body = match proto::decode_request(&line) {
            Err(e) => Body::Error(e),
            Ok(req) => match answer(shared, req).await {
                Ok(a) => Body::Ok(a),
                Err(e) => Body::Error(e),
            },
        };
        send(&mut write, body).await?;
    }
    Ok(())
}

/// The agent's answer to one request.
async fn answer(shared: &Shared, req: Request) -> Result<Answer, String> {
    Ok(match req {
        Request::Status => Answer::Status((shared.status)()),
        Request::Leases => Answer::Leases(leases(shared).await),
        Request::Vms => Answer::Vms(shared.vms.states()),
        Request::Start { vms } => Answer::Started(shared.vms.start(&vms).await?),
        Request::Stop { vms, grace_secs } => {
            let grace = grace_secs.map_or(STOP_GRACE, std::time::Duration::from_secs);
            Answer::Stopped(shared.vms.stop(&vms, grace).await?)
        }
        Request::Snapshot { op, tag, vms } => Answer::Snapshot(shared.vms.snapshot(op, &tag, &vms).await?),
        Request::Reload => {
            let (tx, rx) = oneshot::channel();
            let stopping = || "the agent is stopping".to_owned();
            shared.reloads.send(tx).map_err(|_| stopping())?;
            let (source, warnings) = rx.await.map_err(|_| stopping())??;
            Answer::Reloaded { source, warnings }
        }
    })
}

/// The active leases, asked of the DHCP server when the question comes (not kept up to date on
/// every change, which would cost an allocation per lease per ACK).
async fn leases(shared: &Shared) -> Vec<proto::LeaseRow> {
    let Some(tx) = &shared.leases else { return Vec::new() };
    let (reply, rx) = oneshot::channel();
    if tx.send(reply).is_err() {
        return Vec::new();
    }
    rx.await
        .unwrap_or_default()
        .into_iter()
        .map(|l| proto::LeaseRow { mac: l.mac.to_string(), ip: l.ip, hostname: l.hostname, expires: l.expires })
        .collect()
}

async fn send(w: &mut tokio::net::unix::OwnedWriteHalf, body: Body) -> io::Result<()> {
    let mut line = serde_json::to_vec(&Response { v: proto::VERSION, body }).map_err(io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await
}

/// One request from a command-line client; the agent's answer.
pub fn request(state_dir: &Path, req: &Request) -> anyhow::Result<Answer> {
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
    let written = writeln!(s, "{}", proto::encode_request(req));
    let mut line = String::new();
    let read = std::io::BufReader::new(s).read_line(&mut line);
    if line.is_empty() {
        written?;
        read?;
        anyhow::bail!("kubenet serve closed the connection without an answer");
    }
    match proto::decode_response(&line).map_err(anyhow::Error::msg)? {
        Body::Ok(answer) => Ok(answer),
        Body::Error(e) => anyhow::bail!("kubenet serve: {e}"),
    }
}

/// The answer a request of that kind must get, or an error naming what came instead.
pub fn unexpected(answer: Answer) -> anyhow::Error {
    anyhow::anyhow!("kubenet serve answered with something else than asked: {answer:?}")
}

/// `serve`'s status, if it runs for this lab.
pub fn status(state_dir: &Path) -> anyhow::Result<proto::StatusReport> {
    match request(state_dir, &Request::Status)? {
        Answer::Status(s) => Ok(s),
        other => Err(unexpected(other)),
    }
}
