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
//!
//! The holder of the socket is not trusted with root's memory or time: a request line is read
//! at most [`MAX_LINE`] bytes at a time, a client gets [`READ_TIMEOUT`] to send each line, and
//! at most [`MAX_CONNECTIONS`] are served at once. Each connection is a task of its own: a
//! panic in one is logged and ends only that connection, never DNS or DHCP. I/O; the protocol
//! is [`proto`]'s.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use kubenet_vm::owner::Owner;

use crate::proto::{self, Answer, Body, Request, Response};

/// The socket's file name in the state directory.
pub const SOCKET: &str = "kubenet.sock";
/// A request line longer than this is refused, and no more of it is read: the longest real
/// request (a few names or a snapshot tag) is under 1 KiB.
pub const MAX_LINE: usize = 64 * 1024;
/// How long a client may take to send each request line, or to take each answer off the socket.
/// One that connects and sends nothing, or half a line, or asks without reading, is dropped
/// after this.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a refused peer gets to send its line before the refusal.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections served at once; one more is told to try again and closed. A person runs one
/// command at a time; scripts rarely more than a few.
pub const MAX_CONNECTIONS: usize = 32;

/// How long `stop` waits for a guest to power off before SIGTERM, unless the request says.
const STOP_GRACE: Duration = Duration::from_secs(60);

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
    pub vms: crate::agent::vms::Supervisor,
    /// The lab's network faults.
    pub net: Arc<crate::agent::faults::Switch>,
}

/// The user behind sudo (SUDO_UID/SUDO_GID), else the one running.
pub fn owner() -> (u32, u32) {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse().ok());
    let (uid, gid) = (nix::unistd::getuid().as_raw(), nix::unistd::getgid().as_raw());
    (env("SUDO_UID").unwrap_or(uid), env("SUDO_GID").unwrap_or(gid))
}

/// Binds the socket: a stale file from a crashed agent is replaced, a live agent is an error.
/// All of it happens with `owner`'s rights ([`Owner::run_as`]), in the owner's state directory:
/// the socket is made as the owner's file, and nothing there is followed or changed as root.
pub fn bind(state_dir: &Path, owner: &Owner) -> anyhow::Result<(UnixListener, Removal)> {
    let listener = owner.run_as(|| bind_as_owner(state_dir))??;
    listener.set_nonblocking(true)?;
    Ok((UnixListener::from_std(listener)?, Removal { path: state_dir.join(SOCKET), owner: owner.clone() }))
}

fn bind_as_owner(state_dir: &Path) -> anyhow::Result<std::os::unix::net::UnixListener> {
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
    let listener = std::os::unix::net::UnixListener::bind(&path)
        .with_context(|| format!("cannot create the control socket {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Removes the socket file when the agent stops, as its owner.
pub struct Removal {
    path: PathBuf,
    owner: Owner,
}

impl Drop for Removal {
    fn drop(&mut self) {
        let _ = self.owner.run_as(|| std::fs::remove_file(&self.path));
    }
}

/// Serves the socket until `shutdown`: each connection in a task of its own, at most
/// [`MAX_CONNECTIONS`] at once.
pub async fn serve(listener: UnixListener, shared: Arc<Shared>, shutdown: CancellationToken) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => {
                // As before the set: a request under way is not cut off, the runtime ends it.
                connections.detach_all();
                return Ok(());
            }
            // Reaps ended connections, so that the set stays as small as the open ones, and
            // logs a panic: tokio caught it, and it ended only that connection.
            Some(ended) = connections.join_next() => {
                if let Err(e) = ended {
                    log_task_failure(e);
                }
                continue;
            }
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => { tracing::debug!("control accept: {e}"); continue; }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!("control socket: {MAX_CONNECTIONS} connections open, refused one more");
            refuse_busy(&stream);
            continue;
        };
        let shared = shared.clone();
        connections.spawn(async move {
            if let Err(e) = connection(stream, &shared).await {
                tracing::debug!("control connection: {e}");
            }
            drop(slot);
        });
    }
}

/// A connection task that did not return: logged, and nothing else ends with it.
fn log_task_failure(e: tokio::task::JoinError) {
    if !e.is_panic() {
        return;
    }
    let payload = e.into_panic();
    tracing::error!("control connection panicked, closed it and serving on: {}", panic_message(payload.as_ref()));
}

/// What a panic said: its message when it is text (as `panic!` makes it).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Tells a client over the connection cap why it is closed, without waiting for it: the
/// socket's buffer is empty, so the short answer fits, and a client that does not read it
/// costs nothing.
fn refuse_busy(stream: &UnixStream) {
    let body = Body::Error(format!("busy: {MAX_CONNECTIONS} control connections are open; try again"));
    if let Ok(mut line) = serde_json::to_vec(&Response { v: proto::VERSION, body }) {
        line.push(b'\n');
        let _ = stream.try_write(&line);
    }
}

/// One line read from a client, at most [`MAX_LINE`] bytes of it kept.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// A whole line (without its newline) is in the buffer; also the last one before the end if
    /// it had no newline.
    Request,
    /// More than [`MAX_LINE`] bytes came without a newline; nothing past that was read.
    TooLong,
    /// The client closed the connection.
    Closed,
}

/// Reads one line into `buf`, never more than [`MAX_LINE`] + 1 bytes, so that a line without
/// an end costs the agent 64 KiB, not what the client chooses.
async fn read_line<R: AsyncBufRead + Unpin>(reader: &mut R, buf: &mut Vec<u8>) -> io::Result<Line> {
    buf.clear();
    let n = (&mut *reader).take(MAX_LINE as u64 + 1).read_until(b'\n', buf).await?;
    if n == 0 {
        return Ok(Line::Closed);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        return Ok(Line::Request);
    }
    Ok(if buf.len() > MAX_LINE { Line::TooLong } else { Line::Request })
}

async fn connection(stream: UnixStream, shared: &Shared) -> io::Result<()> {
    let uid = stream.peer_cred()?.uid();
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut buf = Vec::new();
    if uid != 0 && uid != shared.owner {
        tracing::warn!(uid, "control socket: refused a request from uid {uid}");
        // Take the request line first, so that the refusal is not lost to a client still
        // writing when the connection closes.
        let _ = tokio::time::timeout(REFUSAL_TIMEOUT, read_line(&mut read, &mut buf)).await;
        let refusal = format!("permission denied: only root and uid {} may use this socket", shared.owner);
        return send(&mut write, Body::Error(refusal)).await;
    }
    loop {
        let Ok(line) = tokio::time::timeout(READ_TIMEOUT, read_line(&mut read, &mut buf)).await else {
            tracing::debug!("control connection: no request line within {READ_TIMEOUT:?}, closed it");
            return Ok(());
        };
        let body = match line? {
            Line::Closed => return Ok(()),
            Line::TooLong => {
                let too_long = format!("request too long: a request line is at most {MAX_LINE} bytes");
                return send(&mut write, Body::Error(too_long)).await;
            }
            Line::Request => match proto::decode_request(&buf) {
                Err(e) => Body::Error(e),
                Ok(req) => match answer(shared, req).await {
                    Ok(a) => Body::Ok(a),
                    Err(e) => Body::Error(e),
                },
            },
        };
        send(&mut write, body).await?;
    }
}

/// The agent's answer to one request.
async fn answer(shared: &Shared, req: Request) -> Result<Answer, String> {
    Ok(match req {
        Request::Status => Answer::Status((shared.status)()),
        Request::Leases => Answer::Leases(leases(shared).await),
        Request::Vms => Answer::Vms(shared.vms.states()),
        Request::Start { vms } => Answer::Started(shared.vms.start(&vms).await?),
        Request::Stop { vms, grace_secs } => {
            // decode_request held grace_secs to proto::MAX_GRACE_SECS.
            let grace = grace_secs.map_or(STOP_GRACE, Duration::from_secs);
            Answer::Stopped(shared.vms.stop(&vms, grace).await?)
        }
        Request::Snapshot { op, tag, vms } => Answer::Snapshot(shared.vms.snapshot(op, &tag, &vms).await?),
        // nft and tc are short commands, run off the runtime's thread.
        Request::Net { op } => {
            let net = shared.net.clone();
            let rows = tokio::task::spawn_blocking(move || net.change(&op)).await.map_err(|e| e.to_string())??;
            Answer::Net(rows)
        }
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
    rx.await.unwrap_or_default().iter().map(proto::LeaseRow::from).collect()
}

async fn send(w: &mut tokio::net::unix::OwnedWriteHalf, body: Body) -> io::Result<()> {
    let mut line = serde_json::to_vec(&Response { v: proto::VERSION, body }).map_err(io::Error::other)?;
    line.push(b'\n');
    // A client that asks and never reads would otherwise hold its connection for ever.
    tokio::time::timeout(READ_TIMEOUT, w.write_all(&line))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines(input: &[u8]) -> Vec<(Line, Vec<u8>)> {
        let mut reader = BufReader::new(input);
        let mut out = Vec::new();
        loop {
            let mut buf = Vec::new();
            let line = read_line(&mut reader, &mut buf).await.unwrap();
            let end = line != Line::Request;
            out.push((line, buf));
            if end {
                return out;
            }
        }
    }

    /// The agent's socket with a `status` that panics on its first call: that connection ends
    /// without an answer, and the next one is answered.
    #[tokio::test]
    async fn a_panicking_connection_ends_alone() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let lab =
            kubenet_cluster::parse(kubenet_cluster::REFERENCE_CONFIG, kubenet_cluster::Source::Embedded, dir.path())
                .unwrap();
        let report = proto::StatusReport {
            version: "test".into(),
            pid: 1,
            config: "kubenet.toml".into(),
            state_dir: dir.path().into(),
            vms: 7,
            leases: 0,
            dns: proto::DnsCounters::default(),
        };
        let panicked = AtomicBool::new(false);
        let me = owner();
        let lab = Arc::new(std::sync::Mutex::new(lab));
        let shared = Arc::new(Shared {
            owner: me.0,
            status: Box::new(move || {
                assert!(panicked.swap(true, Ordering::Relaxed), "a request that panics");
                report.clone()
            }),
            leases: None,
            reloads: mpsc::unbounded_channel().0,
            vms: crate::agent::vms::Supervisor::new(lab.clone(), Ok(Owner::bare(me.0, me.1)), false),
            net: Arc::new(crate::agent::faults::Switch::new(
                crate::agent::faults::Backend::Unavailable("no bridge in this test".into()),
                lab,
            )),
        });
        let path = dir.path().join(SOCKET);
        let listener = UnixListener::bind(&path).unwrap();
        let shutdown = CancellationToken::new();
        let served = tokio::spawn(serve(listener, shared, shutdown.clone()));
        let status = format!("{}\n", proto::encode_request(&Request::Status));
        let mut answers = Vec::new();
        for _ in 0..2 {
            let mut conn = UnixStream::connect(&path).await.unwrap();
            conn.write_all(status.as_bytes()).await.unwrap();
            let mut answer = String::new();
            tokio::time::timeout(READ_TIMEOUT, BufReader::new(conn).read_line(&mut answer)).await.unwrap().unwrap();
            answers.push(answer);
        }
        assert_eq!(answers[0], "", "the panicking request got an answer");
        let Ok(Body::Ok(Answer::Status(s))) = proto::decode_response(&answers[1]) else { panic!("{answers:?}") };
        assert_eq!(s.vms, 7);
        assert!(!served.is_finished());
        shutdown.cancel();
        served.await.unwrap().unwrap();
        assert_eq!(panic_message(&"text"), "text");
        assert_eq!(panic_message(&5_u8), "(no message)");
    }

    #[tokio::test]
    async fn a_line_is_read_up_to_the_cap_and_no_further() {
        let got = lines(b"{\"cmd\":1}\nlast").await;
        assert_eq!(
            got,
            [(Line::Request, b"{\"cmd\":1}".to_vec()), (Line::Request, b"last".to_vec()), (Line::Closed, Vec::new())]
        );

        let mut exact = vec![b'a'; MAX_LINE];
        exact.push(b'\n');
        assert_eq!(lines(&exact).await[0], (Line::Request, vec![b'a'; MAX_LINE]));

        // Four times the cap without a newline: refused with one byte past the cap read.
        let endless = vec![b'a'; 4 * MAX_LINE];
        let got = lines(&endless).await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, Line::TooLong);
        assert_eq!(got[0].1.len(), MAX_LINE + 1);
    }
}
