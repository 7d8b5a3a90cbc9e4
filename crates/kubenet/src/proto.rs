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
//!
//! Whoever holds the socket is untrusted input to root: [`decode_request`] checks every number
//! and name against [`Request::validate`]'s limits before the agent acts on it, so that nothing
//! later (a `Duration` added to an `Instant`, a loop over names) can overflow or grow without
//! bound. Pure: no I/O in this module.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use kubenet_vm::live::LiveOp;
use kubenet_vm::process::Stopped;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// This build's protocol version.
pub const VERSION: u32 = 2;

/// The longest `stop` grace time a request may ask for: an hour is more than any guest needs to
/// power off, and far from `Instant + Duration` overflowing.
pub const MAX_GRACE_SECS: u64 = 3600;
/// The most VM names one request may list: more than a lab holds in practice, few enough that
/// matching them against the lab stays cheap.
pub const MAX_VM_NAMES: usize = 1024;

/// A request that decoded but asks for something out of range; each names the field and its
/// range.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("grace_secs {0} is out of range: it must be 0 to {MAX_GRACE_SECS} (seconds)")]
    GraceSecs(u64),
    #[error("vms lists {0} names: at most {MAX_VM_NAMES}")]
    TooManyVms(usize),
    /// The name itself only when short: a long one is named by its length.
    #[error(
        "vms[{index}] is not a VM name ({}): a VM name is 1-63 letters, digits and hyphens",
        if name.len() <= 63 { format!("`{name}`") } else { format!("{} bytes", name.len()) }
    )]
    VmName { index: usize, name: String },
    /// The tag's own error from [`kubenet_vm::snapshot::check_name`] (1-64 bytes).
    #[error("tag: {0}")]
    Tag(String),
    /// A network fault's figure out of its range ([`NetOp::validate`]).
    #[error("{0}")]
    Net(String),
}

/// The longest delay (and jitter) `kubenet net delay` may add: a minute is far past any
/// network a distributed system is expected to survive, and far from overflowing anything.
pub const MAX_DELAY_US: u64 = 60_000_000;
/// Loss in parts per million: 1,000,000 is all of it.
pub const MAX_LOSS_PPM: u32 = 1_000_000;
/// The slowest and fastest rate a VM may be held to, in bits per second (tc's floor is a few
/// bytes a second; below 8 kbit/s SSH itself times out, which is a partition, not a rate).
pub const MIN_RATE_BPS: u64 = 8_000;
pub const MAX_RATE_BPS: u64 = 100_000_000_000;

/// A change to the lab's network faults (`kubenet net`), or a look at them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum NetOp {
    /// Cut `vm` off from `from` (none: every other VM of the lab), both ways. The host keeps its
    /// path to every VM.
    Partition {
        vm: String,
        #[serde(default)]
        from: Vec<String>,
    },
    /// Traffic to `vm` waits `delay_us`, give or take `jitter_us` (0: no delay).
    Delay {
        vm: String,
        delay_us: u64,
        #[serde(default)]
        jitter_us: u64,
    },
    /// That share of the traffic to `vm` is dropped (0: none).
    Loss {
        vm: String,
        ppm: u32,
    },
    /// Traffic to `vm` at most `bps` bits per second (0: no limit).
    Rate {
        vm: String,
        bps: u64,
    },
    /// Every fault of these VMs (none: of the whole lab) undone.
    Heal {
        #[serde(default)]
        vms: Vec<String>,
    },
    Show,
}

impl NetOp {
    /// The names the operation holds (for [`Request::validate`]'s name check).
    pub fn names(&self) -> Vec<&String> {
        match self {
            NetOp::Partition { vm, from } => std::iter::once(vm).chain(from).collect(),
            NetOp::Delay { vm, .. } | NetOp::Loss { vm, .. } | NetOp::Rate { vm, .. } => vec![vm],
            NetOp::Heal { vms } => vms.iter().collect(),
            NetOp::Show => Vec::new(),
        }
    }

    /// Its figures against this module's ranges.
    pub fn validate(&self) -> Result<(), String> {
        match *self {
            NetOp::Delay { delay_us, jitter_us, .. } => {
                if delay_us > MAX_DELAY_US {
                    return Err(format!("delay_us {delay_us} is out of range: at most {MAX_DELAY_US} (60 s)"));
                }
                if jitter_us > delay_us {
                    return Err(format!(
                        "jitter_us {jitter_us} is out of range: at most the delay ({delay_us}), or a packet would leave before it was sent"
                    ));
                }
            }
            NetOp::Loss { ppm, .. } if ppm > MAX_LOSS_PPM => {
                return Err(format!("ppm {ppm} is out of range: at most {MAX_LOSS_PPM} (100%)"));
            }
            NetOp::Rate { bps, .. } if bps != 0 && !(MIN_RATE_BPS..=MAX_RATE_BPS).contains(&bps) => {
                return Err(format!(
                    "bps {bps} is out of range: 0 (no limit) or {MIN_RATE_BPS} (8 kbit/s) to {MAX_RATE_BPS} (100 Gbit/s)"
                ));
            }
            _ => {}
        }
        Ok(())
    }
}

/// One VM's faults in force.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultRow {
    pub vm: String,
    /// The VMs it cannot reach (nor they it), in lab order.
    pub partitioned_from: Vec<String>,
    pub delay_us: u64,
    pub jitter_us: u64,
    pub loss_ppm: u32,
    pub rate_bps: u64,
}

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
    /// The lab's network faults.
    Net {
        op: NetOp,
    },
}

impl Request {
    /// Checks every number and name the request holds against this module's limits; the agent
    /// acts only on a request that passed.
    pub fn validate(&self) -> Result<(), Invalid> {
        let (vms, grace, tag): (Vec<&String>, _, _) = match self {
            Request::Status | Request::Leases | Request::Reload | Request::Vms => return Ok(()),
            Request::Start { vms } => (vms.iter().collect(), None, None),
            Request::Stop { vms, grace_secs } => (vms.iter().collect(), *grace_secs, None),
            Request::Snapshot { op: _, tag, vms } => (vms.iter().collect(), None, Some(tag)),
            Request::Net { op } => {
                op.validate().map_err(Invalid::Net)?;
                (op.names(), None, None)
            }
        };
        if let Some(g) = grace.filter(|g| *g > MAX_GRACE_SECS) {
            return Err(Invalid::GraceSecs(g));
        }
        if vms.len() > MAX_VM_NAMES {
            return Err(Invalid::TooManyVms(vms.len()));
        }
        if let Some((index, name)) = vms.iter().enumerate().find(|(_, n)| !kubenet_cluster::is_dns_label(n)) {
            return Err(Invalid::VmName { index, name: (*name).clone() });
        }
        if let Some(tag) = tag {
            // The error names a long tag in full; the line cap bounds it to 64 KiB.
            kubenet_vm::snapshot::check_name(tag).map_err(|e| Invalid::Tag(e.to_string()))?;
        }
        Ok(())
    }
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
    /// The faults in force after the operation, one row per VM that has any.
    Net(Vec<FaultRow>),
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
        let kubenet_dns::server::Totals {
            queries,
            local,
            forwarded,
            cache_hits,
            servfail,
            refused,
            malformed: _,
            outside: _,
        } = t;
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

impl From<&kubenet_dhcp::lease::Lease> for LeaseRow {
    fn from(l: &kubenet_dhcp::lease::Lease) -> Self {
        LeaseRow { mac: l.mac.to_string(), ip: l.ip, hostname: l.hostname.clone(), expires: l.expires }
    }
}

pub use kubenet_vm::process::{RunState, VmState};

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
/// comes back as the error to answer with, and so does a request out of range
/// ([`Request::validate`]).
pub fn decode_request(line: &[u8]) -> Result<Request, String> {
    let example = r#"send one JSON object per line, e.g. {"v":2,"cmd":"status"}"#;
    let mut v: Value = serde_json::from_slice(line).map_err(|e| format!("bad request: {e}; {example}"))?;
    let version = v.as_object_mut().and_then(|o| o.remove("v")).and_then(|v| v.as_u64());
    if version != Some(u64::from(VERSION)) {
        let theirs = version.map_or_else(|| "1 (no version)".to_owned(), |v| v.to_string());
        return Err(format!(
            "version mismatch: this kubenet serve speaks control protocol {VERSION}, the client {theirs}: use the kubenet that started serve, or restart kubenet serve with this one"
        ));
    }
    let req: Request = serde_json::from_value(v).map_err(|e| format!("bad request: {e}; {example}"))?;
    req.validate().map_err(|e| format!("bad request: {e}"))?;
    Ok(req)
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
        assert_eq!(decode_request(line.as_bytes()), Ok(req));
        let snap = Request::Snapshot { op: LiveOp::Save, tag: "s1".into(), vms: vec![] };
        assert_eq!(decode_request(encode_request(&snap).as_bytes()), Ok(snap));
    }

    #[test]
    fn another_version_is_named_as_such_both_ways() {
        let old = decode_request(br#"{"cmd":"status"}"#).unwrap_err();
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
        assert!(decode_request(br#"{"v":2,"cmd":"format-disk"}"#).unwrap_err().starts_with("bad request"));
        assert!(decode_request(b"not json").unwrap_err().starts_with("bad request"));
    }

    #[test]
    fn numbers_and_names_out_of_range_are_refused_naming_the_field() {
        let stop = |g: u64| format!(r#"{{"v":2,"cmd":"stop","grace_secs":{g}}}"#);
        assert_eq!(
            decode_request(stop(u64::MAX).as_bytes()).unwrap_err(),
            "bad request: grace_secs 18446744073709551615 is out of range: it must be 0 to 3600 (seconds)"
        );
        assert_eq!(
            decode_request(stop(MAX_GRACE_SECS).as_bytes()),
            Ok(Request::Stop { vms: vec![], grace_secs: Some(MAX_GRACE_SECS) })
        );
        assert!(decode_request(stop(MAX_GRACE_SECS + 1).as_bytes()).unwrap_err().contains("grace_secs 3601"));
        // Above u64 or negative: serde refuses it before validation sees it.
        assert!(decode_request(br#"{"v":2,"cmd":"stop","grace_secs":18446744073709551616}"#).is_err());
        assert!(decode_request(br#"{"v":2,"cmd":"stop","grace_secs":-1}"#).is_err());

        let many = |n: usize| Request::Start { vms: vec!["worker0".to_owned(); n] };
        assert_eq!(many(MAX_VM_NAMES).validate(), Ok(()));
        assert_eq!(many(MAX_VM_NAMES + 1).validate(), Err(Invalid::TooManyVms(1025)));
        assert_eq!(
            decode_request(encode_request(&many(MAX_VM_NAMES + 1)).as_bytes()).unwrap_err(),
            "bad request: vms lists 1025 names: at most 1024"
        );
        let long = Request::Stop { vms: vec!["w0".into(), "x".repeat(70_000)], grace_secs: None };
        assert_eq!(
            decode_request(encode_request(&long).as_bytes()).unwrap_err(),
            "bad request: vms[1] is not a VM name (70000 bytes): a VM name is 1-63 letters, digits and hyphens"
        );
        let odd = Request::Start { vms: vec!["../etc".into()] };
        assert!(odd.validate().unwrap_err().to_string().starts_with("vms[0] is not a VM name (`../etc`)"));
        assert!(Request::Start { vms: vec![String::new()] }.validate().is_err());

        let snap = |tag: &str| Request::Snapshot { op: LiveOp::Save, tag: tag.into(), vms: vec![] };
        assert_eq!(snap("before-upgrade.1").validate(), Ok(()));
        for bad in ["", "-x", ".hidden", "a/b", &"t".repeat(65)] {
            let e = snap(bad).validate().unwrap_err();
            assert!(matches!(e, Invalid::Tag(_)) && e.to_string().starts_with("tag: "), "{bad:?}: {e}");
        }
        // Requests without numbers or names pass as they are.
        assert_eq!(Request::Status.validate(), Ok(()));

        let net = |op: &str| decode_request(format!(r#"{{"v":2,"cmd":"net","op":{op}}}"#).as_bytes());
        assert_eq!(
            net(r#"{"op":"delay","vm":"worker1","delay_us":100000,"jitter_us":10000}"#),
            Ok(Request::Net { op: NetOp::Delay { vm: "worker1".into(), delay_us: 100_000, jitter_us: 10_000 } })
        );
        assert_eq!(
            net(r#"{"op":"delay","vm":"w1","delay_us":60000001}"#).unwrap_err(),
            "bad request: delay_us 60000001 is out of range: at most 60000000 (60 s)"
        );
        assert!(net(r#"{"op":"delay","vm":"w1","delay_us":5,"jitter_us":6}"#).unwrap_err().contains("jitter_us 6"));
        assert!(net(r#"{"op":"delay","vm":"w1","delay_us":-5}"#).is_err());
        assert!(net(r#"{"op":"loss","vm":"w1","ppm":1000001}"#).unwrap_err().contains("ppm 1000001 is out of range"));
        assert_eq!(net(r#"{"op":"loss","vm":"w1","ppm":1000000}"#).map(|_| ()), Ok(()));
        assert!(net(r#"{"op":"rate","vm":"w1","bps":7999}"#).unwrap_err().contains("bps 7999 is out of range"));
        assert_eq!(net(r#"{"op":"rate","vm":"w1","bps":0}"#).map(|_| ()), Ok(()));
        assert!(net(r#"{"op":"partition","vm":"w1","from":["a/b"]}"#).unwrap_err().contains("vms[1] is not a VM name"));
        assert!(net(r#"{"op":"partition","vm":"w1","via":"eth0"}"#).unwrap_err().contains("unknown field `via`"));
        assert_eq!(net(r#"{"op":"show"}"#), Ok(Request::Net { op: NetOp::Show }));
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
