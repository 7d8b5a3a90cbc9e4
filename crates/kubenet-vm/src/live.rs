//! Live snapshots of running VMs over QMP (QEMU 6.0 and later): one consistent point across
//! the lab. Every VM is paused first, then each saves its disk and memory into its qcow2 disk
//! (`snapshot-save`, a background job, all VMs at once), then all resume, whatever happened. A
//! load pauses the VMs, loads (`snapshot-load`) and resumes them. I/O; the job arguments are
//! data ([`job_arguments`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::qmp::Qmp;

/// How long QEMU may take to answer during a snapshot: a save or load runs in QEMU's main
/// loop, so its monitor can be silent while gigabytes of guest memory are written or read.
/// Still a bound: a QMP peer that never answers cannot hold the agent's request for ever.
const JOB_ANSWER_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// What to do with a tag in running VMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LiveOp {
    Save,
    Load,
    Delete,
}

impl LiveOp {
    fn command(self) -> &'static str {
        match self {
            LiveOp::Save => "snapshot-save",
            LiveOp::Load => "snapshot-load",
            LiveOp::Delete => "snapshot-delete",
        }
    }
}

/// The arguments of the snapshot job `op` for tag `tag` on the disk node `node`: the memory
/// goes into (comes from) the same qcow2 disk, and only that disk takes part (the seed is
/// read-only raw, the UEFI variables raw).
pub fn job_arguments(op: LiveOp, job: &str, tag: &str, node: &str) -> Value {
    let mut args = json!({ "job-id": job, "tag": tag, "devices": [node] });
    if op != LiveOp::Delete {
        args["vmstate"] = json!(node);
    }
    args
}

/// The node name of the VM's writable qcow2 disk, from `query-block`'s answer.
pub fn disk_node(query_block: &Value) -> Option<String> {
    query_block.as_array()?.iter().find_map(|dev| {
        let ins = dev.get("inserted")?;
        (ins["drv"] == "qcow2" && ins["ro"] == false).then(|| ins["node-name"].as_str().map(str::to_owned))?
    })
}

/// Why a live snapshot operation failed on one VM, named.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error("{name}: QMP at {}: {source}", socket.display())]
    Connect { name: String, socket: PathBuf, source: std::io::Error },
    #[error("{name}: {source}")]
    Qmp { name: String, source: std::io::Error },
    #[error("{0}: QEMU shows no writable qcow2 disk")]
    NoDisk(String),
    #[error("{name}: {command} {tag}: {why}")]
    Job { name: String, command: &'static str, tag: String, why: String },
    #[error("{name}: the {command} job vanished")]
    Vanished { name: String, command: &'static str },
}

/// A failed [`run`]: the first error, and the VMs the operation was done on before it, so that
/// the caller can undo them.
#[derive(Debug)]
pub struct Partial {
    pub error: LiveError,
    pub done: Vec<String>,
}

/// One running VM reached over QMP.
pub struct Live {
    pub name: String,
    qmp: Qmp,
    node: String,
}

/// A running VM to work on: its name, QMP socket and QEMU's pid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub name: String,
    pub qmp: PathBuf,
    pub pid: u32,
}

impl Live {
    /// Connects to the QMP socket of the VM's QEMU (`pid`) and finds its disk.
    pub async fn connect(name: &str, socket: &Path, pid: u32) -> Result<Live, LiveError> {
        let mut qmp = Qmp::connect_to(socket, pid).await.map_err(|source| LiveError::Connect {
            name: name.to_owned(),
            socket: socket.to_path_buf(),
            source,
        })?;
        qmp.set_answer_timeout(JOB_ANSWER_TIMEOUT);
        let blocks =
            qmp.execute("query-block").await.map_err(|source| LiveError::Qmp { name: name.to_owned(), source })?;
        let node = disk_node(&blocks).ok_or_else(|| LiveError::NoDisk(name.to_owned()))?;
        Ok(Live { name: name.to_owned(), qmp, node })
    }

    fn failed(&self) -> impl FnOnce(std::io::Error) -> LiveError + use<> {
        let name = self.name.clone();
        move |source| LiveError::Qmp { name, source }
    }

    pub async fn pause(&mut self) -> Result<(), LiveError> {
        let fail = self.failed();
        self.qmp.execute("stop").await.map(drop).map_err(fail)
    }

    pub async fn resume(&mut self) -> Result<(), LiveError> {
        let fail = self.failed();
        self.qmp.execute("cont").await.map(drop).map_err(fail)
    }

    /// Runs the job `op` on `tag` to its end; the job's own error if it failed.
    pub async fn job(&mut self, op: LiveOp, tag: &str) -> Result<(), LiveError> {
        let (job, command) = (format!("kubenet-{}", op.command()), op.command());
        // A job of ours left by an agent that died mid-way would block the id.
        let _ = self.qmp.execute_with("job-dismiss", json!({ "id": job })).await;
        let fail = self.failed();
        self.qmp.execute_with(command, job_arguments(op, &job, tag, &self.node)).await.map_err(fail)?;
        loop {
            let fail = self.failed();
            let jobs = self.qmp.execute("query-jobs").await.map_err(fail)?;
            let ours = jobs.as_array().and_then(|a| a.iter().find(|j| j["id"] == job.as_str())).cloned();
            let name = self.name.clone();
            match ours {
                Some(j) if j["status"] == "concluded" => {
                    let _ = self.qmp.execute_with("job-dismiss", json!({ "id": job })).await;
                    return match j.get("error").and_then(Value::as_str) {
                        Some(why) => Err(LiveError::Job { name, command, tag: tag.to_owned(), why: why.to_owned() }),
                        None => Ok(()),
                    };
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                None => return Err(LiveError::Vanished { name, command }),
            }
        }
    }
}

/// `op` on `tag` in every VM of `vms`, all paused first and all resumed at the end. Returns
/// the names done; on an error, the names done before it as well ([`Partial`]).
pub async fn run(op: LiveOp, tag: &str, vms: &[Target]) -> Result<Vec<String>, Partial> {
    let mut live = Vec::new();
    for Target { name, qmp, pid } in vms {
        live.push(Live::connect(name, qmp, *pid).await.map_err(|error| Partial { error, done: Vec::new() })?);
    }
    let mut paused = Vec::new();
    let mut first_error = None;
    for (i, l) in live.iter_mut().enumerate() {
        match l.pause().await {
            Ok(()) => paused.push(i),
            Err(e) => {
                first_error = Some(e);
                break;
            }
        }
    }
    let mut done = Vec::new();
    if first_error.is_none() {
        let results = futures_util::future::join_all(
            live.iter_mut().map(|l| async move { (l.name.clone(), l.job(op, tag).await) }),
        )
        .await;
        for (name, r) in results {
            match r {
                Ok(()) => done.push(name),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
    }
    for i in paused {
        if let Err(e) = live[i].resume().await {
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        None => Ok(done),
        Some(error) => Err(Partial { error, done }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_arguments_name_the_disk_for_both_state_and_data() {
        assert_eq!(
            job_arguments(LiveOp::Save, "j", "s1", "#block123"),
            json!({"job-id": "j", "tag": "s1", "vmstate": "#block123", "devices": ["#block123"]})
        );
        assert_eq!(job_arguments(LiveOp::Load, "j", "s1", "n")["vmstate"], "n");
        assert_eq!(
            job_arguments(LiveOp::Delete, "j", "s1", "n"),
            json!({"job-id": "j", "tag": "s1", "devices": ["n"]})
        );
    }

    #[test]
    fn the_disk_is_the_writable_qcow2() {
        let blocks = json!([
            {"device": "pflash0", "inserted": {"drv": "raw", "ro": true, "node-name": "#block0"}},
            {"device": "virtio1", "inserted": {"drv": "raw", "ro": true, "node-name": "#block3"}},
            {"device": "virtio0", "inserted": {"drv": "qcow2", "ro": false, "node-name": "#block2"}},
            {"device": "ide1-cd0"}
        ]);
        assert_eq!(disk_node(&blocks).as_deref(), Some("#block2"));
        assert_eq!(disk_node(&json!([{"device": "x", "inserted": {"drv": "qcow2", "ro": true}}])), None);
    }
}
