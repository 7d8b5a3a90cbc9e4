//! The command-line side of the control socket: one typed request to the running agent
//! ([`crate::proto`]) and its answer. The agent's side is `agent::control`.

use std::io;
use std::path::Path;

use crate::agent::control::SOCKET;
use crate::proto::{self, Answer, Body, Request};

/// The longest answer a client reads: a lease table of tens of thousands of rows fits; an
/// endless line from something that is not kubenet serve does not fill memory.
const MAX_ANSWER: u64 = 64 << 20;

/// One request from a command-line client; the agent's answer.
pub fn request(state_dir: &Path, req: &Request) -> anyhow::Result<Answer> {
    request_within(state_dir, req, None)
}

/// Whether a `serve` answers for this lab, asked the way the agent itself may ask before it
/// starts (as its owner: see `agent::serve`): an answer within 5 s and 64 KiB, or none.
pub fn probe(state_dir: &Path) -> Option<proto::StatusReport> {
    match request_within(state_dir, &Request::Status, Some(std::time::Duration::from_secs(5))) {
        Ok(Answer::Status(s)) => Some(s),
        _ => None,
    }
}

/// [`request`], giving up on an answer after `timeout` (None: wait, as a `stop` with a long
/// grace time must).
pub fn request_within(state_dir: &Path, req: &Request, timeout: Option<std::time::Duration>) -> anyhow::Result<Answer> {
    use std::io::{BufRead, Read, Write};
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
    s.set_read_timeout(timeout)?;
    s.set_write_timeout(timeout)?;
    let written = writeln!(s, "{}", proto::encode_request(req));
    let mut line = String::new();
    let cap = if timeout.is_some() { 64 << 10 } else { MAX_ANSWER };
    let read = std::io::BufReader::new(s.take(cap)).read_line(&mut line);
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
