//! The control socket's protocol as types both ends use: JSON appears only on the wire, so a
//! renamed field is a compile error here, not a silent `null` in a client. One JSON object per
//! line each way:
//!
//! ```text
//! {"v":2,"cmd":"status"}                      -> {"v":2,"ok":{"status":{"version":..,"pid":..,"vms":7,..}}}
//! {"v":2,"cmd":"start","vms":["worker0"]}     -> {"v":2,"ok":{"started":[{"name":"worker0","result":"started","pid":..}]}}
//! {"v":2,"cmd":"reload"}                      -> {"v":2,"error":"reload refused, ..."}
//! ```
//!
//! Every message carries the protocol version `v`. An agent and a client of different versions
//! say so ("version mismatch: restart kubenet serve") instead of failing on a field they do not
//! know. Version 1 was the untyped protocol before it, with no `v`.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use kubenet_vm::live::LiveOp;
use kubenet_vm::process::Stopped;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// This build's protocol version.
pub const VERSION: u32 = 2;

/// What a client asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    Status,
    Leases,
    Reload,
    Vms,
    /// Start these VMs (none: all).
    Start {
        #[serde(default)]
        vms: Vec<String>,
    },
    /// Stop these VMs (none: all), each with `grace_secs` to power off first.
    Stop {
        #[serde(default)]
        vms: Vec<String>,
        #[serde(default)]
        grace_secs: Option<u64>,
    },
    /// A live snapshot operation on these running VMs.
    Snapshot {
        op: LiveOp,
        tag: String,
        #[serde(default)]
        vms: Vec<String>,
    },
}

/// What the agent answers, one variant per request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Answer {
    Status(StatusReport),
    Leases(Vec<LeaseRow>),
    Reloaded {
        source: String,
        warnings: Vec<String>,
    },
    Vms(Vec<VmState>),
    Started(Vec<StartResult>),
    Stopped(Vec<StopResult>),
    /// The VMs a live snapshot operation was done on.
    Snapshot(Vec<String>),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: String,
    pub pid: u32,
    pub config: String,
    pub state_dir: PathBuf,
    pub vms: usize,
    pub leases: usize,
    pub dns: DnsCounters,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsCounters {
    pub queries: u64,
    pub local: u64,
    pub forwarded: u64,
    pub cache_hits: u64,
    pub servfail: u64,
    pub refused: u64,
}

impl From<kubenet_dns::server::Totals> for DnsCounters {
    fn from(t: kubenet_dns::server::Totals) -> Self {
        let kubenet_dns::server::Totals { queries, local, forwarded, cache_hits, servfail, refused, malformed: _ } = t;
        DnsCounters { queries, local, forwarded, cache_hits, servfail, refused }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRow {
    pub mac: String,
    pub ip: Ipv4Addr,
    pub hostname: Option<String>,
    /// Unix seconds; None: infinite.
    pub expires: Option<u64>,
}

/// What a VM is doing, from its folder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    pub name: String,
    #[serde(flatten)]
    pub run: RunState,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum RunState {
    /// QEMU runs as `pid`, since `since` (Unix seconds, its pidfile's time).
    Running {
        pid: u32,
        since: Option<u64>,
    },
    Stopped,
}

impl RunState {
    pub fn pid(&self) -> Option<u32> {
        match self {
            RunState::Running { pid, .. } => Some(*pid),
            RunState::Stopped => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartResult {
    pub name: String,
    #[serde(flatten)]
    pub outcome: StartOutcome,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "lowercase")]
pub enum StartOutcome {
    Started {
        pid: u32,
    },
    /// It was running already.
    Running {
        pid: u32,
    },
    Failed {
        error: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopResult {
    pub name: String,
    pub result: Stopped,
}

/// One answer line: the version, and the answer or why there is none.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub v: u32,
    #[serde(flatten)]
    pub body: Body,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Body {
    Ok(Answer),
    Error(String),
}

/// A request as a line for the socket (no newline).
pub fn encode_request(req: &Request) -> String {
    let mut v = serde_json::to_value(req).expect("a request serializes");
    v["v"] = VERSION.into();
    v.to_string()
}

/// A request line as the agent reads it: another version, or a line that is not a request,
/// comes back as the error to answer with.
pub fn decode_request(line: &str) -> Result<Request, String> {
    let example = r#"send one JSON object per line, e.g. {"v":2,"cmd":"status"}"#;
    let mut v: Value = serde_json::from_str(line).map_err(|e| format!("bad request: {e}; {example}"))?;
    let version = v.as_object_mut().and_then(|o| o.remove("v")).and_then(|v| v.as_u64());
    if version != Some(u64::from(VERSION)) {
        let theirs = version.map_or_else(|| "1 (no version)".to_owned(), |v| v.to_string());
        return Err(format!(
            "version mismatch: this kubenet serve speaks control protocol {VERSION}, the client {theirs}: use the kubenet that started serve, or restart kubenet serve with this one"
        ));
    }
    serde_json::from_value(v).map_err(|e| format!("bad request: {e}; {example}"))
}

/// An answer line as the client reads it.
pub fn decode_response(line: &str) -> Result<Body, String> {
    let v: Value = serde_json::from_str(line)
        .map_err(|e| format!("kubenet serve answered something that is not JSON ({e}): {line:?}"))?;
    let version = v.get("v").and_then(Value::as_u64);
    if version != Some(u64::from(VERSION)) {
        let theirs = version.map_or_else(|| "1 (no version)".to_owned(), |v| v.to_string());
        return Err(format!(
            "version mismatch: kubenet serve speaks control protocol {theirs}, this kubenet {VERSION}: restart kubenet serve with this kubenet (`sudo kubenet service install` again if it runs as a service)"
        ));
    }
    serde_json::from_value::<Response>(v)
        .map(|r| r.body)
        .map_err(|e| format!("kubenet serve answered what this kubenet cannot read ({e}): {line:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_carry_the_version_and_read_back() {
        let req = Request::Stop { vms: vec!["worker0".into()], grace_secs: Some(5) };
        let line = encode_request(&req);
        assert_eq!(line, r#"{"cmd":"stop","grace_secs":5,"v":2,"vms":["worker0"]}"#);
        assert_eq!(decode_request(&line), Ok(req));
        let snap = Request::Snapshot { op: LiveOp::Save, tag: "s1".into(), vms: vec![] };
        assert_eq!(decode_request(&encode_request(&snap)), Ok(snap));
    }

    #[test]
    fn another_version_is_named_as_such_both_ways() {
        let old = decode_request(r#"{"cmd":"status"}"#).unwrap_err();
        assert!(
            old.starts_with(
                "version mismatch: this kubenet serve speaks control protocol 2, the client 1 (no version)"
            ),
            "{old}"
        );
        let newer = decode_response(r#"{"v":3,"ok":{"vms":[]}}"#).unwrap_err();
        assert!(
            newer.contains("kubenet serve speaks control protocol 3, this kubenet 2: restart kubenet serve"),
            "{newer}"
        );
        // An agent of the untyped protocol refuses the `v` field; its answer has no version.
        let untyped = decode_response(r#"{"ok":false,"error":"bad request: unknown field `v`"}"#).unwrap_err();
        assert!(
            untyped.starts_with("version mismatch: kubenet serve speaks control protocol 1 (no version)"),
            "{untyped}"
        );
        assert!(decode_request(r#"{"v":2,"cmd":"format-disk"}"#).unwrap_err().starts_with("bad request"));
        assert!(decode_request("not json").unwrap_err().starts_with("bad request"));
    }

    #[test]
    fn answers_have_the_documented_shape() {
        let r = Response {
            v: VERSION,
            body: Body::Ok(Answer::Started(vec![
                StartResult { name: "w0".into(), outcome: StartOutcome::Started { pid: 7 } },
                StartResult { name: "w1".into(), outcome: StartOutcome::Failed { error: "no".into() } },
            ])),
        };
        let line = serde_json::to_string(&r).unwrap();
        assert_eq!(
            line,
            r#"{"v":2,"ok":{"started":[{"name":"w0","result":"started","pid":7},{"name":"w1","result":"failed","error":"no"}]}}"#
        );
        assert_eq!(decode_response(&line), Ok(r.body));
        let state = VmState { name: "g".into(), run: RunState::Running { pid: 3, since: Some(9) } };
        assert_eq!(serde_json::to_string(&state).unwrap(), r#"{"name":"g","state":"running","pid":3,"since":9}"#);
        let err = Response { v: VERSION, body: Body::Error("nope".into()) };
        assert_eq!(serde_json::to_string(&err).unwrap(), r#"{"v":2,"error":"nope"}"#);
    }
}
