//! A minimal QMP client: connect, leave capabilities negotiation, run a command, skip the
//! asynchronous events in between. Enough for `system_powerdown`, `stop`/`cont` and the
//! snapshot jobs; I/O.

use std::io;
use std::path::Path;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

pub struct Qmp {
    lines: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    writer: OwnedWriteHalf,
}

impl Qmp {
    /// Connects to QEMU's QMP socket and enters command mode.
    pub async fn connect(path: &Path) -> io::Result<Qmp> {
        let (r, w) = UnixStream::connect(path).await?.into_split();
        let mut qmp = Qmp { lines: BufReader::new(r).lines(), writer: w };
        let greeting = qmp.next().await?;
        if greeting.get("QMP").is_none() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("not a QMP greeting: {greeting}")));
        }
        qmp.execute("qmp_capabilities").await?;
        Ok(qmp)
    }

    async fn next(&mut self) -> io::Result<Value> {
        let line = self.lines.next_line().await?.ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        serde_json::from_str(&line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
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
        loop {
            let v = self.next().await?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                let why = e.get("desc").and_then(Value::as_str).map_or_else(|| e.to_string(), str::to_owned);
                return Err(io::Error::other(format!("QMP {command}: {why}")));
            }
            // An event ({"event": ...}): not our answer.
        }
    }
}
