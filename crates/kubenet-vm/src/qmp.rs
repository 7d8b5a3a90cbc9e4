//! A minimal QMP client: connect, leave capabilities negotiation, run a command, skip the
//! asynchronous events in between. Enough for `system_powerdown`, `stop`/`cont` and the
//! snapshot jobs. The socket is I/O; what a line means is [`parse`], a pure function of its
//! bytes.
//!
//! The QMP socket sits in the VM's folder, which its owner controls, so the peer is not trusted:
//! a line is read at most [`MAX_LINE`] bytes at a time, and each answer (the greeting, or a
//! command's `return`/`error`) must come within the timeout, events or not. A peer that sends
//! an endless line, nothing, or only events, fails the command; it cannot hang or fill the
//! agent.

use std::io;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// The longest QMP line read. QEMU's longest answers here (`query-block` with a few drives,
/// `query-jobs`) are a few KiB.
pub const MAX_LINE: usize = 1 << 20;
/// How long QEMU gets to answer one command (or greet): a power-down, a pause. Snapshot jobs set
/// a longer one ([`Qmp::set_answer_timeout`]): QEMU can hold its monitor while it writes the
/// guest's memory.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// One message from QEMU (QEMU's docs/interop/qmp-spec.rst, "Server responses").
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    /// The greeting, `{"QMP": {...}}`, sent once on connect.
    Greeting,
    /// A command's success, `{"return": ...}`.
    Return(Value),
    /// A command's failure, `{"error": {"class": ..., "desc": ...}}`: the description.
    Error(String),
    /// An asynchronous event (`{"event": ...}`) or anything else that answers no command.
    Other,
}

/// Why a QMP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP sent a line that is not JSON: {0}")]
    NotJson(#[from] serde_json::Error),
    #[error("QMP sent a line longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("QEMU closed the QMP connection")]
    Closed,
    #[error("QMP: {0}")]
    Io(#[from] io::Error),
    #[error("no QMP answer within {0:?}")]
    Timeout(Duration),
    #[error("not a QMP greeting: {0}")]
    NotGreeting(String),
}

impl From<QmpError> for io::Error {
    fn from(e: QmpError) -> io::Error {
        let kind = match e {
            QmpError::NotJson(_) | QmpError::TooLong | QmpError::NotGreeting(_) => io::ErrorKind::InvalidData,
            QmpError::Closed => io::ErrorKind::UnexpectedEof,
            QmpError::Timeout(_) => io::ErrorKind::TimedOut,
            QmpError::Io(e) => return e,
        };
        io::Error::new(kind, e)
    }
}

/// What one QMP line (without its newline) says.
pub fn parse(line: &[u8]) -> Result<Message, QmpError> {
    let v: Value = serde_json::from_slice(line)?;
    let Value::Object(mut o) = v else { return Ok(Message::Other) };
    if let Some(r) = o.remove("return") {
        return Ok(Message::Return(r));
    }
    if let Some(e) = o.get("error") {
        let why = e.get("desc").and_then(Value::as_str).map_or_else(|| e.to_string(), str::to_owned);
        return Ok(Message::Error(why));
    }
    Ok(if o.contains_key("QMP") { Message::Greeting } else { Message::Other })
}

pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    line: Vec<u8>,
    timeout: Duration,
}

impl Qmp {
    /// Connects to QEMU's QMP socket and enters command mode.
    pub async fn connect(path: &Path) -> io::Result<Qmp> {
        Qmp::connect_with_timeout(path, ANSWER_TIMEOUT).await
    }

    /// [`Qmp::connect`] for the root agent, to the QMP socket of QEMU process `pid`: the socket
    /// lies in the owner's folder, where a link could lead root's connection to another
    /// program's socket, so the peer must be that very process (SO_PEERCRED, LOCAL_PEERPID on
    /// macOS). Nothing is sent to any other.
    pub async fn connect_to(path: &Path, pid: u32) -> io::Result<Qmp> {
        Qmp::open(path, Some(pid), ANSWER_TIMEOUT).await
    }

    /// As [`Qmp::connect`], with `timeout` for each answer instead of [`ANSWER_TIMEOUT`].
    pub async fn connect_with_timeout(path: &Path, timeout: Duration) -> io::Result<Qmp> {
        Qmp::open(path, None, timeout).await
    }

    async fn open(path: &Path, pid: Option<u32>, timeout: Duration) -> io::Result<Qmp> {
        let stream = UnixStream::connect(path).await?;
        if let Some(want) = pid {
            let peer = stream.peer_cred()?.pid();
            if peer.is_some_and(|p| i64::from(p) != i64::from(want)) {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("{} is not the QMP socket of QEMU pid {want} (its peer is pid {peer:?})", path.display()),
                ));
            }
        }
        let (r, w) = stream.into_split();
        let mut qmp = Qmp { reader: BufReader::new(r), writer: w, line: Vec::new(), timeout };
        let greeting = tokio::time::timeout(timeout, qmp.next()).await.map_err(|_| QmpError::Timeout(timeout))??;
        if greeting != Message::Greeting {
            return Err(QmpError::NotGreeting(format!("{greeting:?}")).into());
        }
        qmp.execute("qmp_capabilities").await?;
        Ok(qmp)
    }

    /// Gives each answer from now on `timeout` instead.
    pub fn set_answer_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The next message, its line read at most [`MAX_LINE`] bytes far.
    async fn next(&mut self) -> Result<Message, QmpError> {
        self.line.clear();
        let limit = MAX_LINE as u64 + 1;
        let n = (&mut self.reader).take(limit).read_until(b'\n', &mut self.line).await?;
        if n == 0 {
            return Err(QmpError::Closed);
        }
        if self.line.last() == Some(&b'\n') {
            self.line.pop();
        } else if self.line.len() > MAX_LINE {
            return Err(QmpError::TooLong);
        }
        parse(&self.line)
    }

    /// Runs `command` and returns its `return` value; a QMP error becomes an io::Error.
    pub async fn execute(&mut self, command: &str) -> io::Result<Value> {
        self.execute_with(command, json!({})).await
    }

    /// Runs `command` with `arguments` (an object).
    pub async fn execute_with(&mut self, command: &str, arguments: Value) -> io::Result<Value> {
        let mut line = json!({ "execute": command, "arguments": arguments }).to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes()).await?;
        let timeout = self.timeout;
        // One deadline for the answer, however many events come before it.
        let answer = tokio::time::timeout(timeout, async {
            loop {
                match self.next().await? {
                    Message::Return(r) => return Ok(r),
                    Message::Error(why) => return Err(io::Error::other(format!("QMP {command}: {why}"))),
                    Message::Greeting | Message::Other => {}
                }
            }
        });
        answer.await.map_err(|_| QmpError::Timeout(timeout))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::UnixListener;

    #[test]
    fn lines_parse_into_greetings_answers_and_events() {
        let greeting = br#"{"QMP": {"version": {"qemu": {"major": 9}}, "capabilities": []}}"#;
        assert_eq!(parse(greeting).unwrap(), Message::Greeting);
        assert_eq!(parse(br#"{"return": {"a": 1}}"#).unwrap(), Message::Return(json!({"a": 1})));
        assert_eq!(parse(br#"{"return": {}, "id": 4}"#).unwrap(), Message::Return(json!({})));
        let err = br#"{"error": {"class": "GenericError", "desc": "no such job"}}"#;
        assert_eq!(parse(err).unwrap(), Message::Error("no such job".into()));
        assert_eq!(parse(br#"{"error": 5}"#).unwrap(), Message::Error("5".into()));
        assert_eq!(parse(br#"{"event": "STOP", "timestamp": {}}"#).unwrap(), Message::Other);
        assert_eq!(parse(b"[1, 2]").unwrap(), Message::Other);
        assert!(matches!(parse(b"{\"return\": "), Err(QmpError::NotJson(_))));
        assert!(matches!(parse(b"\xff\xfe"), Err(QmpError::NotJson(_))));
    }

    /// A fake QEMU on a socket in a temporary folder: greets (unless told not to), answers the
    /// capabilities, then writes `after` and keeps the connection open until the test ends.
    async fn fake_qemu(greet: bool, after: Vec<u8>) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            if greet {
                s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n").await.unwrap();
                let mut line = Vec::new();
                let mut r = BufReader::new(&mut s);
                r.read_until(b'\n', &mut line).await.unwrap();
                s.write_all(b"{\"return\": {}}\n").await.unwrap();
            }
            // The peer may close first; what is unwritten then does not matter.
            let _ = s.write_all(&after).await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        (dir, path)
    }

    const SHORT: Duration = Duration::from_millis(300);

    #[tokio::test]
    async fn an_answer_after_events_is_returned() {
        let after = b"{\"event\": \"RESUME\"}\n{\"return\": [{\"id\": \"j\"}]}\n".to_vec();
        let (_dir, path) = fake_qemu(true, after).await;
        let mut qmp = Qmp::connect_with_timeout(&path, SHORT).await.unwrap();
        assert_eq!(qmp.execute("query-jobs").await.unwrap(), json!([{"id": "j"}]));
    }

    #[tokio::test]
    async fn an_endless_line_fails_at_the_cap() {
        // 4 MiB without a newline: the reader stops one byte past 1 MiB.
        let (_dir, path) = fake_qemu(true, vec![b' '; 4 * MAX_LINE]).await;
        let mut qmp = Qmp::connect_with_timeout(&path, Duration::from_secs(10)).await.unwrap();
        let e = qmp.execute("query-block").await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        assert!(e.to_string().contains("longer than 1048576 bytes"), "{e}");
        assert!(qmp.line.len() <= MAX_LINE + 1);
    }

    #[tokio::test]
    async fn a_silent_peer_or_one_sending_only_events_times_out() {
        let (_dir, path) = fake_qemu(false, Vec::new()).await;
        let e = Qmp::connect_with_timeout(&path, SHORT).await.err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");

        // A stream of events and never an answer: one deadline for the answer holds all the same.
        let events = b"{\"event\": \"X\"}\n".repeat(10_000);
        let (_dir, path) = fake_qemu(true, events).await;
        let mut qmp = Qmp::connect_with_timeout(&path, SHORT).await.unwrap();
        let started = std::time::Instant::now();
        let e = qmp.execute("stop").await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
