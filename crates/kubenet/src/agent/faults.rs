//! The lab's network faults (`kubenet net`): partitions between VMs, and delay, loss and a rate
//! on the traffic to one VM. The agent acts only on what the lab made: its own taps and bridge,
//! in a table of its own, never on another interface.
//!
//! - [`Faults`] is what is in force, changed by [`NetOp`]s and checked against the lab. Pure.
//! - [`linux`] and [`macos`] turn it into [`Step`]s, commands as data, golden-tested here:
//!   - Linux: an nftables table of kubenet's (family bridge) drops the frames each cut-off VM
//!     sends through its tap to the other's MAC, in both directions; the host, which is the
//!     bridge and not a port of it, keeps its path to every VM. netem, as the root qdisc of
//!     the VM's tap, delays, drops and paces what goes to the VM.
//!   - macOS (vmnet's bridge): a pf anchor of kubenet's under `com.apple/`, which macOS's own
//!     pf.conf already loads, blocks the pairs by address, and dummynet pipes (dnctl) shape
//!     the traffic to each VM. It cannot run here, so it is data and tests only.
//! - [`Switch`] holds the faults and carries the steps out: on every change, when a reload
//!   brings a new lab (faults of VMs it no longer has are dropped), and at the agent's start and
//!   stop (none left behind, a crashed agent's included).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use kubenet_cluster::{Lab, Vm};

use crate::proto::{FaultRow, NetOp};

/// The most VM pairs that may be cut off at once: a lab of 140 VMs each cut off from every
/// other. Each pair is two rules and a few bytes; the cap keeps a request from making root hold
/// and load a ruleset without end.
pub const MAX_PAIRS: usize = 10_000;

/// How traffic to one VM is shaped; all zero is no shaping.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Shape {
    pub delay_us: u64,
    pub jitter_us: u64,
    pub loss_ppm: u32,
    pub rate_bps: u64,
}

impl Shape {
    fn is_none(&self) -> bool {
        *self == Shape::default()
    }
}

/// The faults in force, by VM name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// Pairs cut off from each other, each as (first, second) in name order.
    cut: BTreeSet<(String, String)>,
    shape: BTreeMap<String, Shape>,
}

fn pair(a: &str, b: &str) -> (String, String) {
    if a <= b { (a.to_owned(), b.to_owned()) } else { (b.to_owned(), a.to_owned()) }
}

impl Faults {
    /// `op` applied, its names checked against `lab`: an unknown VM, or a VM partitioned from
    /// itself, is an error and changes nothing. The figures were checked when the request was
    /// decoded ([`NetOp::validate`]).
    pub fn apply(&mut self, lab: &Lab, op: &NetOp) -> Result<(), String> {
        let vm = |name: &String| -> Result<&Vm, String> {
            lab.vm_by_name(name).ok_or_else(|| {
                let all: Vec<&str> = lab.vms.iter().map(|v| v.name.as_str()).collect();
                format!("no VM named `{name}` in this lab (its VMs: {})", all.join(", "))
            })
        };
        for name in op.names() {
            vm(name)?;
        }
        match op {
            NetOp::Partition { vm: name, from } => {
                let me = &vm(name)?.name;
                if from.iter().any(|f| vm(f).is_ok_and(|v| &v.name == me)) {
                    return Err(format!("{me} cannot be partitioned from itself: name the VMs it should not reach"));
                }
                let others: Vec<&str> = if from.is_empty() {
                    lab.vms.iter().filter(|v| &v.name != me).map(|v| v.name.as_str()).collect()
                } else {
                    from.iter().map(|f| vm(f).map(|v| v.name.as_str())).collect::<Result<_, _>>()?
                };
                if others.is_empty() {
                    return Err(format!("{me} is the lab's only VM: there is nothing to partition it from"));
                }
                let mut cut = self.cut.clone();
                for other in others {
                    cut.insert(pair(me, other));
                    if cut.len() > MAX_PAIRS {
                        return Err(format!(
                            "more than {MAX_PAIRS} pairs of VMs would be cut off: heal some first (`kubenet net heal`)"
                        ));
                    }
                }
                self.cut = cut;
            }
            NetOp::Delay { vm: name, delay_us, jitter_us } => {
                self.edit(&vm(name)?.name, |s| (s.delay_us, s.jitter_us) = (*delay_us, *jitter_us))
            }
            NetOp::Loss { vm: name, ppm } => self.edit(&vm(name)?.name, |s| s.loss_ppm = *ppm),
            NetOp::Rate { vm: name, bps } => self.edit(&vm(name)?.name, |s| s.rate_bps = *bps),
            NetOp::Heal { vms } if vms.is_empty() => *self = Faults::default(),
            NetOp::Heal { vms } => {
                for name in vms {
                    let name = &vm(name)?.name;
                    self.cut.retain(|(a, b)| a != name && b != name);
                    self.shape.remove(name);
                }
            }
            NetOp::Show => {}
        }
        Ok(())
    }

    fn edit(&mut self, name: &str, change: impl FnOnce(&mut Shape)) {
        let shape = self.shape.entry(name.to_owned()).or_default();
        change(shape);
        if shape.is_none() {
            self.shape.remove(name);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.cut.is_empty() && self.shape.is_empty()
    }

    /// One row per VM with a fault, in lab order.
    pub fn rows(&self, lab: &Lab) -> Vec<FaultRow> {
        let order: BTreeMap<&str, usize> = lab.vms.iter().enumerate().map(|(i, v)| (v.name.as_str(), i)).collect();
        let mut peers: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (a, b) in &self.cut {
            peers.entry(a).or_default().push(b);
            peers.entry(b).or_default().push(a);
        }
        lab.vms
            .iter()
            .filter_map(|vm| {
                let mut from: Vec<&str> = peers.get(vm.name.as_str()).cloned().unwrap_or_default();
                from.retain(|n| order.contains_key(n));
                from.sort_by_key(|n| order[n]);
                let s = self.shape.get(&vm.name).copied().unwrap_or_default();
                (!from.is_empty() || !s.is_none()).then(|| FaultRow {
                    vm: vm.name.clone(),
                    partitioned_from: from.into_iter().map(str::to_owned).collect(),
                    delay_us: s.delay_us,
                    jitter_us: s.jitter_us,
                    loss_ppm: s.loss_ppm,
                    rate_bps: s.rate_bps,
                })
            })
            .collect()
    }

    /// Only the faults of VMs that are the same VM in `new` as in `old`: by name, id and MAC.
    /// A VM a reload removed, or gave another id (and so another tap) or MAC, loses its faults:
    /// its QEMU still runs on the tap and MAC it started with, which the new lab no longer names.
    pub fn kept_across(&self, old: &Lab, new: &Lab) -> Faults {
        let same = |n: &str| match (old.vm_by_name(n), new.vm_by_name(n)) {
            (Some(a), Some(b)) => a.name == b.name && a.id == b.id && a.mac == b.mac,
            _ => false,
        };
        let mut kept = self.clone();
        kept.cut.retain(|(a, b)| same(a) && same(b));
        kept.shape.retain(|n, _| same(n));
        kept
    }

    /// The cut-off pairs as VMs of `lab`, each pair once.
    fn pairs<'a>(&self, lab: &'a Lab) -> Vec<(&'a Vm, &'a Vm)> {
        self.cut.iter().filter_map(|(a, b)| Some((lab.vm_by_name(a)?, lab.vm_by_name(b)?))).collect()
    }
}

/// A command the agent runs as root, as data: the program (looked up among root's own, see
/// [`kubenet_vm::trust::program`]), its arguments, what it reads on stdin, and whether a
/// failure is expected and harmless (taking away a qdisc that is not there).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub program: &'static str,
    pub args: Vec<String>,
    pub stdin: Option<String>,
    pub may_fail: bool,
}

impl Step {
    fn new(program: &'static str, args: &[&str]) -> Step {
        Step { program, args: args.iter().map(|a| a.to_string()).collect(), stdin: None, may_fail: false }
    }
}

/// kubenet's nftables table for a lab's bridge: the NAT rules' in family ip, the faults' in
/// family bridge. One name per bridge name: a letter or digit stands for itself and any other
/// byte for `_` and its hex code, so `lab-1` and `lab_1` (two bridges) never share a table.
pub fn table_name(bridge: &str) -> String {
    let mut t = String::from("kubenet_");
    for b in bridge.bytes() {
        if b.is_ascii_alphanumeric() {
            t.push(b as char);
        } else {
            t.push_str(&format!("_{b:02x}"));
        }
    }
    t
}

/// A name is put in a rule only if it is made of these: quoted in an nftables script or
/// written into a pf rule, a quote, brace or semicolon would make a rule of its own (the
/// bridge's name, for the NAT and the faults' rules, and the taps made from it).
pub fn safe_name(name: &str) -> Result<&str, String> {
    if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
        Ok(name)
    } else {
        Err(format!("`{name}` cannot be named in a rule: use letters, digits, '.', '_' and '-' in network.bridge"))
    }
}

/// A duration for tc and dnctl, in whole microseconds ("100000us").
fn us(v: u64) -> String {
    format!("{v}us")
}

/// Loss as a percentage with up to four decimals, as tc and dnctl read it ("5%", "0.0001%").
fn percent(ppm: u32) -> String {
    let (whole, part) = (ppm / 10_000, ppm % 10_000);
    if part == 0 { format!("{whole}%") } else { format!("{whole}.{}%", format!("{part:04}").trim_end_matches('0')) }
}

pub mod linux {
    //! The Linux steps: kubenet's nftables table and netem on the taps.

    use super::*;

    /// The whole table for `faults`, replacing any earlier one in one transaction (`nft -f`):
    /// for each cut-off pair, what either VM sends through its tap to the other's MAC is
    /// dropped. Frames to and from the host go through the bridge itself, not between its
    /// ports, so this chain never sees them. No pairs: the table goes.
    pub fn ruleset(lab: &Lab, faults: &Faults) -> Result<String, String> {
        let bridge = safe_name(&lab.network.bridge)?;
        let t = table_name(bridge);
        let mut rules = String::new();
        for (a, b) in faults.pairs(lab) {
            for (from, to) in [(a, b), (b, a)] {
                let tap = kubenet_vm::qemu::tap_name(lab, from);
                rules.push_str(&format!("    iifname \"{}\" ether daddr {} drop\n", safe_name(&tap)?, to.mac));
            }
        }
        Ok(if rules.is_empty() {
            format!("table bridge {t}\ndelete table bridge {t}\n")
        } else {
            format!(
                "table bridge {t}\ndelete table bridge {t}\ntable bridge {t} {{\n  chain forward {{\n    type filter hook forward priority filter; policy accept;\n{rules}  }}\n}}\n"
            )
        })
    }

    /// netem's words for a shape: `delay D [J] loss P% rate R`.
    pub fn netem(s: &Shape) -> Vec<String> {
        let mut w = Vec::new();
        if s.delay_us > 0 {
            w.extend(["delay".to_owned(), us(s.delay_us)]);
            if s.jitter_us > 0 {
                w.push(us(s.jitter_us));
            }
        }
        if s.loss_ppm > 0 {
            w.extend(["loss".to_owned(), percent(s.loss_ppm)]);
        }
        if s.rate_bps > 0 {
            w.extend(["rate".to_owned(), format!("{}bit", s.rate_bps)]);
        }
        w
    }

    /// The steps from `was` to `now`: the table whole, then each tap whose shape changed (a
    /// VM no longer shaped loses its qdisc; the kernel's default comes back).
    pub fn steps(lab: &Lab, was: &Faults, now: &Faults) -> Result<Vec<Step>, String> {
        let mut steps = vec![Step { stdin: Some(ruleset(lab, now)?), ..Step::new("nft", &["-f", "-"]) }];
        for vm in &lab.vms {
            let (before, after) = (was.shape.get(&vm.name), now.shape.get(&vm.name));
            if before == after {
                continue;
            }
            let tap = kubenet_vm::qemu::tap_name(lab, vm);
            let tap = safe_name(&tap)?;
            steps.push(match after {
                Some(s) => {
                    let mut args = vec!["qdisc", "replace", "dev", tap, "root", "netem"];
                    let words = netem(s);
                    args.extend(words.iter().map(String::as_str));
                    Step::new("tc", &args)
                }
                // Gone already (the tap made anew) is as good as taken away.
                None => Step { may_fail: true, ..Step::new("tc", &["qdisc", "del", "dev", tap, "root"]) },
            });
        }
        Ok(steps)
    }

    /// What a fresh agent, or one stopping, runs so that no fault outlives it: no table, and
    /// no qdisc on any of the lab's taps (each may have none: that failure is expected).
    pub fn clear(lab: &Lab) -> Result<Vec<Step>, String> {
        let mut steps = vec![Step { stdin: Some(ruleset(lab, &Faults::default())?), ..Step::new("nft", &["-f", "-"]) }];
        for vm in &lab.vms {
            let tap = kubenet_vm::qemu::tap_name(lab, vm);
            steps.push(Step { may_fail: true, ..Step::new("tc", &["qdisc", "del", "dev", safe_name(&tap)?, "root"]) });
        }
        Ok(steps)
    }
}

pub mod macos {
    //! The macOS steps: a pf anchor of kubenet's and dummynet pipes, on vmnet's bridge (its
    //! name, `bridge100` or the like, is the interface that holds the lab's host address).

    use super::*;

    /// The anchor, under `com.apple/` so that the stock /etc/pf.conf (`anchor "com.apple/*"`)
    /// evaluates it without kubenet editing that file; one per lab, by the lab's id (its state
    /// directory's hash), so two labs on one Mac never replace each other's rules.
    pub fn anchor(lab: &Lab) -> String {
        format!("com.apple/kubenet.{}", kubenet_vm::files::lab_id(&lab.state_dir))
    }

    /// The pipe of `vm`: kubenet's range, far above what other tools number, by the VM's id.
    /// dummynet numbers pipes up to 65535. (Two labs shaping on one Mac share the range: left
    /// for when a lab can say which it uses.)
    pub fn pipe(vm: &Vm) -> Result<u32, String> {
        let n = 46_000 + vm.id;
        if n > 65_535 {
            return Err(format!("{}: its id {} is past the pipes dummynet can number", vm.name, vm.id));
        }
        Ok(n)
    }

    /// The anchor's rules: each cut-off pair blocked both ways, then each shaped VM's inbound
    /// traffic through its pipe.
    pub fn rules(lab: &Lab, faults: &Faults, bridge: &str) -> Result<String, String> {
        let bridge = safe_name(bridge)?;
        let mut out = String::new();
        for (a, b) in faults.pairs(lab) {
            for (from, to) in [(a, b), (b, a)] {
                out.push_str(&format!("block drop quick on {bridge} from {} to {}\n", from.ip, to.ip));
            }
        }
        for vm in &lab.vms {
            if faults.shape.contains_key(&vm.name) {
                out.push_str(&format!("dummynet out quick on {bridge} from any to {} pipe {}\n", vm.ip, pipe(vm)?));
            }
        }
        Ok(out)
    }

    /// dnctl's words for a shape: `delay MS plr P bw R` (dummynet has no jitter: refused).
    pub fn pipe_config(s: &Shape) -> Result<Vec<String>, String> {
        if s.jitter_us > 0 {
            return Err("jitter is not available on macOS: dummynet delays every packet alike".into());
        }
        let mut w = Vec::new();
        // dnctl takes milliseconds.
        w.extend(["delay".to_owned(), s.delay_us.div_ceil(1000).to_string()]);
        // plr: a probability, 0 to 1.
        w.extend(["plr".to_owned(), format!("{}", f64::from(s.loss_ppm) / 1e6)]);
        if s.rate_bps > 0 {
            w.extend(["bw".to_owned(), format!("{}bit/s", s.rate_bps)]);
        }
        Ok(w)
    }

    /// The steps to `now`: each shaped VM's pipe configured, the anchor loaded whole, pf
    /// enabled (it is off on a stock Mac; `-E` takes a reference that kubenet does not give back
    /// with `-X`, so pf stays on after `serve` stops, with an empty anchor), and the pipes of VMs
    /// no longer shaped deleted.
    pub fn steps(lab: &Lab, was: &Faults, now: &Faults, bridge: &str) -> Result<Vec<Step>, String> {
        let mut steps = Vec::new();
        for vm in &lab.vms {
            if let Some(s) = now.shape.get(&vm.name) {
                let mut args = vec!["pipe".to_owned(), pipe(vm)?.to_string(), "config".to_owned()];
                args.extend(pipe_config(s)?);
                steps.push(Step { args, ..Step::new("dnctl", &[]) });
            }
        }
        let anchor = anchor(lab);
        steps.push(Step { stdin: Some(rules(lab, now, bridge)?), ..Step::new("pfctl", &["-a", &anchor, "-f", "-"]) });
        steps.push(Step { may_fail: true, ..Step::new("pfctl", &["-E"]) });
        for vm in &lab.vms {
            if was.shape.contains_key(&vm.name) && !now.shape.contains_key(&vm.name) {
                let id = pipe(vm)?.to_string();
                steps.push(Step { may_fail: true, ..Step::new("dnctl", &["pipe", "delete", &id]) });
            }
        }
        Ok(steps)
    }

    /// No rules in the anchor, and none of kubenet's pipes.
    pub fn clear(lab: &Lab) -> Vec<Step> {
        let mut steps = vec![Step::new("pfctl", &["-a", &anchor(lab), "-F", "all"])];
        steps[0].may_fail = true;
        for vm in &lab.vms {
            if let Ok(id) = pipe(vm) {
                steps.push(Step { may_fail: true, ..Step::new("dnctl", &["pipe", "delete", &id.to_string()]) });
            }
        }
        steps
    }
}

/// How long one step may take: nft and tc answer in milliseconds; a hung one is ended, so that
/// no request (and no lock a request holds) waits on it for ever.
const STEP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs `steps` in order, each program by the absolute path [`kubenet_vm::trust::program`]
/// vouches for, each within [`STEP_TIMEOUT`]; the first unexpected failure ends it with the
/// program's own words.
pub fn run(steps: &[Step]) -> Result<(), String> {
    for step in steps {
        let said = run_one(step)?;
        if let Err(said) = said
            && !step.may_fail
        {
            return Err(format!("{} {}: {said}", step.program, step.args.join(" ")).trim_end().to_owned());
        }
    }
    Ok(())
}

/// One step: Ok(Ok) when it succeeded, Ok(Err(its stderr)) when it failed, Err when it could not
/// run or took too long.
fn run_one(step: &Step) -> Result<Result<(), String>, String> {
    use std::io::{Read, Write};
    let program = kubenet_vm::trust::program(step.program).map_err(|e| format!("cannot run {}: {e}", step.program))?;
    let mut child = std::process::Command::new(program)
        .args(&step.args)
        .stdin(if step.stdin.is_some() { std::process::Stdio::piped() } else { std::process::Stdio::null() })
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", step.program))?;
    // The script (up to a MiB or so at MAX_PAIRS, far more than a pipe holds) goes in, and
    // stderr comes out, on threads of their own: the deadline below holds whatever the program
    // does with either. A program ended at the deadline ends both.
    let input = step.stdin.clone().zip(child.stdin.take());
    let writer = std::thread::spawn(move || {
        if let Some((text, mut stdin)) = input {
            let _ = stdin.write_all(text.as_bytes());
        }
    });
    let stderr = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut said = String::new();
        if let Some(mut stderr) = stderr {
            let _ = stderr.by_ref().take(64 << 10).read_to_string(&mut said);
            let _ = std::io::copy(&mut stderr, &mut std::io::sink());
        }
        said
    });
    let deadline = std::time::Instant::now() + STEP_TIMEOUT;
    let status = loop {
        match child.try_wait().map_err(|e| format!("{}: {e}", step.program))? {
            Some(status) => break status,
            None if std::time::Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{} took longer than {STEP_TIMEOUT:?}: ended it", step.program));
            }
            None => std::thread::sleep(std::time::Duration::from_millis(5)),
        }
    };
    let _ = writer.join();
    let said = reader.join().unwrap_or_default();
    Ok(if status.success() { Ok(()) } else { Err(said.trim().to_owned()) })
}

/// Where the faults go.
#[derive(Clone, Debug)]
pub enum Backend {
    /// Linux, on the bridge and taps `serve` made, which carry `mark` (hostnet's) as their alias.
    /// (Built on macOS too, for the same code to meet the compiler there.)
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    Linux { mark: String },
    /// macOS, on vmnet's bridge. (Built on Linux too, for its steps' tests.)
    #[cfg_attr(not(target_vendor = "apple"), allow(dead_code))]
    MacOs,
    /// No switch of kubenet's to act on, and why (`serve --no-bridge`).
    Unavailable(String),
}

/// Whether `tap` is one kubenet made for this lab: a tun/tap device, a port of the lab's
/// bridge, marked with the lab's mark (hostnet's alias). Read from /sys/class/net (the kernel's,
/// not a path the owner can redirect); `tap` went through [`safe_name`], so it holds no `/`.
/// A tap the name only computes to (a VM a reload added, not started yet; another lab's tap of
/// the same name; any interface of the host's) is refused.
fn lab_tap(tap: &str, bridge: &str, mark: &str) -> Result<(), String> {
    let dir = std::path::Path::new("/sys/class/net").join(safe_name(tap)?);
    let alias = std::fs::read_to_string(dir.join("ifalias")).unwrap_or_default();
    let is_tap = dir.join("tun_flags").exists();
    let master = std::fs::read_link(dir.join("master")).ok();
    let on_bridge = master.as_ref().and_then(|m| m.file_name()).is_some_and(|m| m == bridge);
    if is_tap && on_bridge && alias.trim_end_matches('\n') == mark {
        Ok(())
    } else {
        Err(format!(
            "{tap} is not a tap kubenet made for this lab (its VM was never started since serve started?): start the VM first"
        ))
    }
}

/// Whether `port` is a port of `bridge` now (/sys/class/net/PORT/master), whatever its kind.
fn port_of(port: &str, bridge: &str) -> Result<(), String> {
    let master = std::fs::read_link(std::path::Path::new("/sys/class/net").join(safe_name(port)?).join("master")).ok();
    if master.as_ref().and_then(|m| m.file_name()).is_some_and(|m| m == bridge) {
        Ok(())
    } else {
        Err(format!(
            "{port} is not a port of the lab's bridge {bridge} (its VM was never started since serve started?): start the VM first"
        ))
    }
}

/// The faults in force and the lab they are of; [`Switch::change`] carries them out.
pub struct Switch {
    backend: Backend,
    lab: Arc<Mutex<Lab>>,
    faults: Mutex<Faults>,
}

/// A lock that a panic elsewhere poisoned still guards what it guarded: the faults are plain
/// data, always whole between two statements.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Switch {
    /// A switch with no faults. A crashed agent's leftovers on this lab's table and taps are
    /// cleared first (logged, not fatal: there may be none).
    pub fn new(backend: Backend, lab: Arc<Mutex<Lab>>) -> Switch {
        let switch = Switch { backend, lab, faults: Mutex::new(Faults::default()) };
        if let Err(e) = switch.clear() {
            tracing::debug!("clearing earlier network faults: {e}");
        }
        switch
    }

    /// Applies `op` and answers with what is in force. A failure to carry it out puts the
    /// earlier faults back.
    pub fn change(&self, op: &NetOp) -> Result<Vec<FaultRow>, String> {
        // The faults first, then the lab: a reload swaps the lab while holding the faults
        // ([`Switch::reload`]), so a change never pairs faults with a lab they were not kept for.
        let mut faults = lock(&self.faults);
        let lab = lock(&self.lab).clone();
        let mut next = faults.clone();
        next.apply(&lab, op)?;
        if next != *faults {
            if let Err(e) = self.carry_out(&lab, &faults, &next) {
                let _ = self.carry_out(&lab, &next, &faults);
                return Err(e);
            }
            tracing::info!(?op, "network faults changed");
            *faults = next;
        }
        Ok(faults.rows(&lab))
    }

    /// A reload, `swap` (which replaces the lab), done while holding the faults; then the faults
    /// of VMs that are no longer the same VM ([`Faults::kept_across`]) are taken off their old
    /// taps. Nothing else changes, so a reload that leaves the VMs alone leaves every fault in
    /// force without a gap.
    pub fn reload<T, E>(&self, swap: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        let mut faults = lock(&self.faults);
        let old = lock(&self.lab).clone();
        let result = swap();
        if result.is_ok() && !faults.is_empty() {
            let new = lock(&self.lab).clone();
            let kept = faults.kept_across(&old, &new);
            if kept != *faults {
                match self.carry_out(&old, &faults, &kept) {
                    Ok(()) => {
                        tracing::info!(vms = kept.rows(&new).len(), "network faults of VMs the reload changed dropped")
                    }
                    Err(e) => tracing::warn!("dropping the network faults of VMs the reload changed: {e}"),
                }
                *faults = kept;
            }
        }
        result
    }

    /// Every fault gone from the host (the agent's start and stop).
    pub fn clear(&self) -> Result<(), String> {
        let mut faults = lock(&self.faults);
        let lab = lock(&self.lab).clone();
        let steps = match &self.backend {
            // Only taps that are this lab's lose their qdisc.
            Backend::Linux { mark } => linux::clear(&lab)?
                .into_iter()
                .filter(|s| s.program != "tc" || lab_tap(&s.args[3], &lab.network.bridge, mark).is_ok())
                .collect(),
            Backend::MacOs => macos::clear(&lab),
            Backend::Unavailable(_) => return Ok(()),
        };
        *faults = Faults::default();
        run(&steps)
    }

    fn carry_out(&self, lab: &Lab, was: &Faults, now: &Faults) -> Result<(), String> {
        let steps = match &self.backend {
            Backend::Linux { mark } => {
                let bridge = &lab.network.bridge;
                // A partition's rules name the taps of its pairs: each must be a port of the
                // lab's bridge, never a port of another bridge (another lab's tap of the same,
                // cut name) or an interface that is not there yet.
                for (a, b) in now.pairs(lab) {
                    for vm in [a, b] {
                        port_of(&kubenet_vm::qemu::tap_name(lab, vm), bridge)?;
                    }
                }
                let mut steps = Vec::new();
                for s in linux::steps(lab, was, now)? {
                    match (s.program, s.args.get(1).map(String::as_str)) {
                        // tc changes an interface: only one of this lab's own taps.
                        ("tc", Some("replace")) => lab_tap(&s.args[3], bridge, mark)?,
                        // Taking a qdisc away: only from this lab's taps; one that is gone
                        // (or no longer the lab's) has nothing of ours left to take.
                        ("tc", _) if lab_tap(&s.args[3], bridge, mark).is_err() => continue,
                        _ => {}
                    }
                    steps.push(s);
                }
                steps
            }
            Backend::MacOs => {
                let bridge = vmnet_bridge(lab).ok_or_else(|| {
                    format!(
                        "no vmnet bridge holds the lab's address {} yet: start a VM first",
                        lab.network.host_address
                    )
                })?;
                macos::steps(lab, was, now, &bridge)?
            }
            Backend::Unavailable(why) => return Err(why.clone()),
        };
        run(&steps).map_err(|e| match e.contains("qdisc kind is unknown") {
            true => format!("{e}: this kernel has no netem (CONFIG_NET_SCH_NETEM; `modprobe sch_netem`), which delay, loss and rate need"),
            false => e,
        })
    }
}

/// The interface holding the lab's host address, if it is one of vmnet's bridges (bridge100,
/// ...): never an interface of the host's own that happens to hold the address.
fn vmnet_bridge(lab: &Lab) -> Option<String> {
    kubenet_udp::addresses()
        .into_iter()
        .find(|a| a.address == std::net::IpAddr::V4(lab.network.host_address))
        .map(|a| a.interface)
        .filter(|i| i.strip_prefix("bridge").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lab() -> Lab {
        kubenet_cluster::parse(kubenet_cluster::REFERENCE_CONFIG, kubenet_cluster::Source::Embedded, "/".as_ref())
            .unwrap()
    }

    fn op(s: &str) -> NetOp {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn faults_follow_their_operations_and_names_are_checked() {
        let lab = lab();
        let mut f = Faults::default();
        f.apply(&lab, &op(r#"{"op":"partition","vm":"control0","from":["control1","Control2"]}"#)).unwrap();
        f.apply(&lab, &op(r#"{"op":"delay","vm":"worker1","delay_us":100000,"jitter_us":10000}"#)).unwrap();
        f.apply(&lab, &op(r#"{"op":"loss","vm":"worker1","ppm":50000}"#)).unwrap();
        let rows = f.rows(&lab);
        let names: Vec<&str> = rows.iter().map(|r| r.vm.as_str()).collect();
        assert_eq!(names, ["control0", "control1", "control2", "worker1"]);
        assert_eq!(rows[0].partitioned_from, ["control1", "control2"]);
        assert_eq!(rows[1].partitioned_from, ["control0"]);
        assert_eq!(
            (rows[3].delay_us, rows[3].jitter_us, rows[3].loss_ppm, rows[3].rate_bps),
            (100_000, 10_000, 50_000, 0)
        );

        // Errors change nothing.
        let before = f.clone();
        let err = f.apply(&lab, &op(r#"{"op":"partition","vm":"control0","from":["worker9"]}"#)).unwrap_err();
        assert!(err.starts_with("no VM named `worker9` in this lab (its VMs: gateway, control0"), "{err}");
        let err = f.apply(&lab, &op(r#"{"op":"partition","vm":"worker0","from":["worker1","WORKER0"]}"#)).unwrap_err();
        assert_eq!(err, "worker0 cannot be partitioned from itself: name the VMs it should not reach");
        assert!(f.apply(&lab, &op(r#"{"op":"heal","vms":["nope"]}"#)).is_err());
        assert_eq!(f, before);

        // Heal one VM: its pairs and shape go, the rest stay; a zero figure undoes its part.
        f.apply(&lab, &op(r#"{"op":"heal","vms":["control1"]}"#)).unwrap();
        assert_eq!(f.rows(&lab)[0].partitioned_from, ["control2"]);
        f.apply(&lab, &op(r#"{"op":"delay","vm":"worker1","delay_us":0}"#)).unwrap();
        f.apply(&lab, &op(r#"{"op":"loss","vm":"worker1","ppm":0}"#)).unwrap();
        assert_eq!(f.rows(&lab).len(), 2, "worker1 has no shape left: {:?}", f.rows(&lab));
        // Partition from the rest of the lab, then heal everything.
        f.apply(&lab, &op(r#"{"op":"partition","vm":"worker2"}"#)).unwrap();
        assert_eq!(f.rows(&lab).iter().find(|r| r.vm == "worker2").unwrap().partitioned_from.len(), 6);
        f.apply(&lab, &op(r#"{"op":"heal"}"#)).unwrap();
        assert!(f.is_empty());
    }

    #[test]
    fn a_reload_keeps_the_faults_of_the_vms_it_leaves_as_they_were() {
        let lab = lab();
        let mut f = Faults::default();
        f.apply(&lab, &op(r#"{"op":"partition","vm":"control0","from":["worker2"]}"#)).unwrap();
        f.apply(&lab, &op(r#"{"op":"partition","vm":"control0","from":["control1"]}"#)).unwrap();
        f.apply(&lab, &op(r#"{"op":"rate","vm":"worker2","bps":1000000}"#)).unwrap();
        f.apply(&lab, &op(r#"{"op":"rate","vm":"worker0","bps":1000000}"#)).unwrap();
        f.apply(&lab, &op(r#"{"op":"loss","vm":"worker1","ppm":5}"#)).unwrap();
        // worker2 removed, worker1 given another MAC: their faults go, the rest stay.
        let mut new = lab.clone();
        new.vms.retain(|v| v.name != "worker2");
        new.vms.iter_mut().find(|v| v.name == "worker1").unwrap().mac = "52:52:52:00:01:05".parse().unwrap();
        let kept = f.kept_across(&lab, &new);
        let rows = kept.rows(&new);
        let names: Vec<&str> = rows.iter().map(|r| r.vm.as_str()).collect();
        assert_eq!(names, ["control0", "control1", "worker0"]);
        assert_eq!(rows[0].partitioned_from, ["control1"]);
        // A reload that changes no VM keeps everything.
        assert_eq!(f.kept_across(&lab, &lab.clone()), f);
    }

    #[test]
    fn partitions_are_bounded_and_table_names_never_shared() {
        let mut lab = lab();
        let template = lab.vms[0].clone();
        lab.vms = (0..200u32).map(|i| Vm { id: i, name: format!("vm{i}"), ..template.clone() }).collect();
        let mut f = Faults::default();
        let mut err = None;
        for i in 0..200 {
            if let Err(e) = f.apply(&lab, &op(&format!(r#"{{"op":"partition","vm":"vm{i}"}}"#))) {
                err = Some(e);
                break;
            }
        }
        assert!(err.unwrap().starts_with("more than 10000 pairs of VMs would be cut off"));
        assert!(f.cut.len() <= MAX_PAIRS);
        assert_eq!(table_name("kubenet0"), "kubenet_kubenet0");
        assert_ne!(table_name("lab-1"), table_name("lab_1"));
        assert_ne!(table_name("lab.1"), table_name("lab_1"));
        assert_eq!(table_name("lab-1"), "kubenet_lab_2d1");
    }

    #[test]
    fn linux_steps_drop_each_pair_both_ways_on_the_lab_taps_and_shape_with_netem() {
        let lab = lab();
        let mut f = Faults::default();
        f.apply(&lab, &op(r#"{"op":"partition","vm":"control0","from":["worker0"]}"#)).unwrap();
        f.apply(&lab, &op(r#"{"op":"delay","vm":"worker1","delay_us":100000,"jitter_us":10000}"#)).unwrap();
        f.apply(&lab, &op(r#"{"op":"loss","vm":"worker1","ppm":5}"#)).unwrap();
        f.apply(&lab, &op(r#"{"op":"rate","vm":"worker1","bps":10000000}"#)).unwrap();
        let steps = linux::steps(&lab, &Faults::default(), &f).unwrap();
        assert_eq!(
            steps[0].stdin.as_deref().unwrap(),
            "table bridge kubenet_kubenet0
delete table bridge kubenet_kubenet0
table bridge kubenet_kubenet0 {
  chain forward {
    type filter hook forward priority filter; policy accept;
    iifname \"kubenet0-1\" ether daddr 52:52:52:00:00:04 drop
    iifname \"kubenet0-4\" ether daddr 52:52:52:00:00:01 drop
  }
}
"
        );
        assert_eq!(steps[0].args, ["-f", "-"]);
        assert_eq!(steps.len(), 2);
        assert_eq!(
            steps[1].args.join(" "),
            "qdisc replace dev kubenet0-5 root netem delay 100000us 10000us loss 0.0005% rate 10000000bit"
        );
        // Healing worker1 takes its qdisc away and leaves the others' alone; no pairs, no table.
        let mut healed = f.clone();
        healed.apply(&lab, &op(r#"{"op":"heal"}"#)).unwrap();
        let steps = linux::steps(&lab, &f, &healed).unwrap();
        assert_eq!(
            steps[0].stdin.as_deref().unwrap(),
            "table bridge kubenet_kubenet0\ndelete table bridge kubenet_kubenet0\n"
        );
        assert_eq!(steps[1].args.join(" "), "qdisc del dev kubenet0-5 root");
        assert_eq!(steps.len(), 2);
        // Clearing touches every tap of the lab's and no other interface.
        let clear = linux::clear(&lab).unwrap();
        assert_eq!(clear.len(), 8);
        assert!(clear[1..].iter().all(|s| s.may_fail && s.args[3].starts_with("kubenet0-")), "{clear:?}");
        // A bridge name that could be a rule of its own is refused.
        let mut odd = lab.clone();
        odd.network.bridge = "br\" drop".into();
        assert!(linux::ruleset(&odd, &f).unwrap_err().contains("cannot be named in a rule"));
    }

    #[test]
    fn loss_is_written_as_tc_and_dnctl_read_it() {
        assert_eq!(percent(50_000), "5%");
        assert_eq!(percent(1_000_000), "100%");
        assert_eq!(percent(5_000), "0.5%");
        assert_eq!(percent(1), "0.0001%");
        assert_eq!(percent(123_450), "12.345%");
    }

    #[test]
    fn macos_steps_are_a_pf_anchor_and_dummynet_pipes() {
        let lab = lab();
        let mut f = Faults::default();
        f.apply(&lab, &op(r#"{"op":"partition","vm":"control0","from":["worker0"]}"#)).unwrap();
        f.apply(&lab, &op(r#"{"op":"delay","vm":"worker1","delay_us":100000}"#)).unwrap();
        f.apply(&lab, &op(r#"{"op":"loss","vm":"worker1","ppm":50000}"#)).unwrap();
        f.apply(&lab, &op(r#"{"op":"rate","vm":"worker1","bps":10000000}"#)).unwrap();
        let steps = macos::steps(&lab, &Faults::default(), &f, "bridge100").unwrap();
        let words: Vec<String> = steps.iter().map(|s| format!("{} {}", s.program, s.args.join(" "))).collect();
        assert_eq!(
            words,
            [
                "dnctl pipe 46005 config delay 100 plr 0.05 bw 10000000bit/s",
                "pfctl -a com.apple/kubenet.8a5edab282632443 -f -",
                "pfctl -E",
            ]
        );
        assert_eq!(
            steps[1].stdin.as_deref().unwrap(),
            "block drop quick on bridge100 from 192.168.1.11 to 192.168.1.14
block drop quick on bridge100 from 192.168.1.14 to 192.168.1.11
dummynet out quick on bridge100 from any to 192.168.1.15 pipe 46005
"
        );
        // Healed: the anchor emptied, the pipe deleted.
        let steps = macos::steps(&lab, &f, &Faults::default(), "bridge100").unwrap();
        assert_eq!(steps[0].stdin.as_deref(), Some(""));
        assert_eq!(steps.last().unwrap().args.join(" "), "pipe delete 46005");
        // Jitter has no dummynet form.
        f.apply(&lab, &op(r#"{"op":"delay","vm":"worker1","delay_us":100000,"jitter_us":5}"#)).unwrap();
        let err = macos::steps(&lab, &Faults::default(), &f, "bridge100").unwrap_err();
        assert!(err.starts_with("jitter is not available on macOS"), "{err}");
        assert!(macos::rules(&lab, &f, "bridge100; pass all").is_err());
        let clear = macos::clear(&lab);
        assert_eq!(clear[0].args.join(" "), "-a com.apple/kubenet.8a5edab282632443 -F all");
        // Another lab (another state directory) has an anchor of its own.
        let mut other = lab.clone();
        other.state_dir = "/home/b/lab".into();
        assert_ne!(macos::anchor(&other), macos::anchor(&lab));
        assert_eq!(clear.len(), 8);
    }
}
