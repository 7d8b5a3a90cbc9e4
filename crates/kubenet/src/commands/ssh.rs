//! `kubenet ssh` on one VM or many, and `kubenet ssh-config`. Everything goes through the
//! user's own OpenSSH with the lab's ssh_config (strict host keys, the lab key), as the user.
//!
//! One VM and no `--timeout`: this process becomes `ssh`, an interactive login or a command
//! with its terminal, exactly as `ssh` itself. Several VMs (or a glob or a role): the command runs
//! on each, in parallel or `--serial`, each line of its output prefixed with the VM's name
//! ([`Label`]), stdout to stdout and stderr to stderr, and a summary of the failures at the end
//! ([`summary`]). The labels and the summary are pure and tested here; the runs are I/O.

use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use kubenet_cluster::{Lab, Vm};
use kubenet_vm::{LabFiles, VmFiles};
use tokio::io::AsyncBufReadExt;

/// What `kubenet ssh` was asked.
pub struct Request<'a> {
    pub targets: &'a [String],
    pub command: &'a [String],
    pub serial: bool,
    pub timeout: Option<Duration>,
}

/// `kubenet ssh TARGET... [-- CMD]`.
pub fn ssh(lab: &Lab, req: &Request) -> anyhow::Result<()> {
    let vms = lab.targets(req.targets).map_err(crate::cli::unknown_vm)?;
    let one_by_name = vms.len() == 1 && req.targets.len() == 1 && lab.vm_by_name(&req.targets[0]).is_some();
    if one_by_name && req.timeout.is_none() {
        super::lifecycle::require_running(lab, vms[0])?;
        return exec(vms[0], &lab_ssh_config(lab)?, req.command);
    }
    let config = lab_ssh_config(lab)?;
    if req.command.is_empty() {
        bail!(crate::cli::Usage(format!(
            "{} VMs named: give the command to run on each after `--` (e.g. `kubenet ssh {} -- uptime`); \
             `kubenet tmux` gives a login on each",
            vms.len(),
            req.targets.join(" ")
        )));
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let outcomes = rt.block_on(run_all(lab, &vms, &config, req));
    let names: Vec<&str> = vms.iter().map(|vm| vm.name.as_str()).collect();
    match summary(&names, &outcomes) {
        None => Ok(()),
        Some(text) => Err(anyhow::anyhow!(text)),
    }
}

/// The lab's ssh_config, which `setup` writes.
pub(crate) fn lab_ssh_config(lab: &Lab) -> anyhow::Result<std::path::PathBuf> {
    let config = LabFiles::new(lab).ssh_config();
    if !config.exists() {
        bail!("{} does not exist: run `kubenet setup` (or `kubenet up`) first", config.display());
    }
    Ok(config)
}

/// One VM, interactively: this process becomes ssh.
fn exec(vm: &Vm, config: &Path, command: &[String]) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new("ssh").arg("-F").arg(config).arg(&vm.name).args(command).exec();
    Err(anyhow::Error::new(err).context("cannot run ssh"))
}

/// How the command ended on one VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// The remote command's exit status; 255 is ssh's own (no connection, a host key refused).
    Exit(i32),
    /// ssh ended by a signal.
    Killed,
    NotRunning,
    TimedOut(Duration),
    CannotRun(String),
    /// `--serial` stopped at an earlier failure.
    NotRun,
}

impl Outcome {
    pub(crate) fn failed(&self) -> bool {
        *self != Outcome::Ok
    }

    fn describe(&self, name: &str) -> String {
        match self {
            Outcome::Ok => "ok".into(),
            Outcome::Exit(255) => "exit 255 (ssh could not connect, or the command exited 255)".into(),
            Outcome::Exit(code) => format!("exit {code}"),
            Outcome::Killed => "ssh was killed".into(),
            Outcome::NotRunning => format!("not running (start it with `kubenet up {name}`)"),
            Outcome::TimedOut(t) => format!("timed out after {}", super::lifecycle::short(t.as_secs())),
            Outcome::CannotRun(why) => format!("cannot run ssh: {why}"),
            Outcome::NotRun => "not run (--serial stopped at the failure before)".into(),
        }
    }
}

/// The summary of a run on several VMs: None when every one succeeded, else the line that
/// names each that did not, with how it ended.
pub fn summary(names: &[&str], outcomes: &[Outcome]) -> Option<String> {
    let failed: Vec<String> = names
        .iter()
        .zip(outcomes)
        .filter(|(_, o)| o.failed())
        .map(|(name, o)| format!("{name}: {}", o.describe(name)))
        .collect();
    if failed.is_empty() {
        return None;
    }
    Some(format!("{} of {} VMs failed; {}", failed.len(), names.len(), failed.join("; ")))
}

/// The prefix of a VM's lines: its name padded to the longest, then `| `, the name coloured
/// when the stream is a terminal.
#[derive(Clone, Debug)]
pub struct Label {
    plain: String,
    coloured: String,
}

impl Label {
    /// Colours cycle through six of the terminal's own (red is kept for nothing in particular:
    /// the palette is green, yellow, blue, magenta, cyan, red), one per VM in lab order.
    pub fn new(name: &str, width: usize, index: usize) -> Label {
        const COLOURS: [u8; 6] = [32, 33, 34, 35, 36, 31];
        let padded = format!("{name:<width$}");
        Label {
            plain: format!("{padded} | "),
            coloured: format!("\x1b[{}m{padded}\x1b[0m | ", COLOURS[index % COLOURS.len()]),
        }
    }

    /// A VM's label, its colour by its place in the lab (the same in every command).
    pub fn of(lab: &Lab, vm: &Vm, width: usize) -> Label {
        Label::new(&vm.name, width, lab.vms.iter().position(|v| v.name == vm.name).unwrap_or(0))
    }

    pub fn get(&self, colour: bool) -> &str {
        if colour { &self.coloured } else { &self.plain }
    }
}

/// `line` (as read, with or without its newline) behind its label, ending in one newline.
pub fn prefixed(label: &str, line: &[u8]) -> Vec<u8> {
    let body = line.strip_suffix(b"\n").unwrap_or(line);
    let body = body.strip_suffix(b"\r").unwrap_or(body);
    let mut out = Vec::with_capacity(label.len() + body.len() + 1);
    out.extend_from_slice(label.as_bytes());
    out.extend_from_slice(body);
    out.push(b'\n');
    out
}

/// Colour on a stream that is a terminal, unless NO_COLOR is set (https://no-color.org).
pub(crate) fn colour_on(is_terminal: bool) -> bool {
    is_terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

async fn run_all(lab: &Lab, vms: &[&Vm], config: &Path, req: &Request<'_>) -> Vec<Outcome> {
    use std::io::IsTerminal;
    let width = vms.iter().map(|vm| vm.name.len()).max().unwrap_or(0);
    let colours = (colour_on(std::io::stdout().is_terminal()), colour_on(std::io::stderr().is_terminal()));
    if req.serial {
        let mut outcomes = Vec::with_capacity(vms.len());
        for vm in vms {
            let outcome = if outcomes.iter().any(Outcome::failed) {
                Outcome::NotRun
            } else {
                run_one(lab, vm, config, req, Label::of(lab, vm, width), colours).await
            };
            outcomes.push(outcome);
        }
        outcomes
    } else {
        let runs = vms.iter().map(|vm| run_one(lab, vm, config, req, Label::of(lab, vm, width), colours));
        futures_util::future::join_all(runs).await
    }
}

/// The command on one VM, its output labelled line by line.
async fn run_one(lab: &Lab, vm: &Vm, config: &Path, req: &Request<'_>, label: Label, colours: (bool, bool)) -> Outcome {
    if kubenet_vm::process::running(&VmFiles::new(lab, vm)).is_none() {
        return Outcome::NotRunning;
    }
    let mut ssh = tokio::process::Command::new("ssh");
    ssh.arg("-F").arg(config).args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=10", &vm.name]).args(req.command);
    run_labelled(ssh, &label, colours, req.timeout).await
}

/// Runs `cmd` (ssh or scp for one VM) with no input, each line of its stdout and stderr
/// behind `label` on ours, within `timeout`.
pub(crate) async fn run_labelled(
    mut cmd: tokio::process::Command,
    label: &Label,
    (out_colour, err_colour): (bool, bool),
    timeout: Option<Duration>,
) -> Outcome {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => return Outcome::CannotRun(e.to_string()),
    };
    let stdout = child.stdout.take().map(|s| pump(s, label.get(out_colour).to_owned(), false));
    let stderr = child.stderr.take().map(|s| pump(s, label.get(err_colour).to_owned(), true));
    let wait = async {
        let pumps = async {
            if let Some(p) = stdout {
                p.await;
            }
        };
        let pumps_err = async {
            if let Some(p) = stderr {
                p.await;
            }
        };
        let (_, _, status) = tokio::join!(pumps, pumps_err, child.wait());
        status
    };
    let status = match timeout {
        None => wait.await,
        Some(limit) => match tokio::time::timeout(limit, wait).await {
            Ok(status) => status,
            // Dropping the wait drops the child: kill_on_drop ends ssh. (Without a terminal, the
            // remote command is not told and may run on; the VM counts as failed.)
            Err(_) => return Outcome::TimedOut(limit),
        },
    };
    match status {
        Ok(s) if s.success() => Outcome::Ok,
        Ok(s) => s.code().map_or(Outcome::Killed, Outcome::Exit),
        Err(e) => Outcome::CannotRun(e.to_string()),
    }
}

/// The longest line kept whole: a longer one (a binary blob, a progress meter without
/// newlines) is cut into pieces of this size, each labelled, rather than held in memory.
const MAX_LINE: u64 = 64 << 10;

/// Copies a stream to stdout (or stderr) line by line, each line whole behind its label.
async fn pump(stream: impl tokio::io::AsyncRead + Unpin, label: String, to_stderr: bool) {
    use tokio::io::AsyncReadExt;
    let mut lines = tokio::io::BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut lines).take(MAX_LINE).read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = prefixed(&label, &line);
                // A closed stdout (`| head`) ends the output, not the run: the summary still counts.
                let _ = if to_stderr {
                    std::io::stderr().lock().write_all(&text)
                } else {
                    std::io::stdout().lock().write_all(&text)
                };
            }
        }
    }
}

/// `kubenet ssh-config [--install]`: the `Include` line that makes the user's own OpenSSH (and
/// scp, rsync, Ansible, editors) use the lab's ssh_config; with `install`, [`install_include`].
pub fn ssh_config(lab: &Lab, install: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let line = super::lifecycle::ssh_include_line(&LabFiles::new(lab))?;
    if !install {
        writeln!(out, "{line}")?;
        return Ok(());
    }
    let path = super::lifecycle::home()?.join(".ssh/config");
    match install_include(&path, &line)? {
        Installed::Already => writeln!(out, "{} already has `{line}`", path.display())?,
        Installed::Added { backup } => {
            writeln!(out, "added `{line}` to the top of {}: `ssh NAME` now reaches the lab's VMs", path.display())?;
            if let Some(backup) = backup {
                writeln!(out, "(the file as it was before kubenet first changed it: {})", backup.display())?;
            }
        }
    }
    Ok(())
}

pub enum Installed {
    Already,
    /// Added; the backup of the file as it was, if it had anything in it.
    Added {
        backup: Option<std::path::PathBuf>,
    },
}

/// Adds `line` at the top of the ssh config at `path` (where an `Include` applies to every
/// host), once. The file as it was before kubenet's first change is kept beside it as
/// `config.kubenet-backup` (an existing backup is never overwritten); if that cannot be
/// written, the config is left as it was.
pub fn install_include(path: &Path, line: &str) -> anyhow::Result<Installed> {
    let backup = path.with_file_name("config.kubenet-backup");
    let mut kept = None;
    let mut failed = None;
    let added = kubenet_vm::keys::edit_locked(path, |old| {
        let new = kubenet_vm::keys::add_include(old, line)?;
        if !old.is_empty() {
            if !backup.exists()
                && let Err(e) = kubenet_cluster::state::write_atomic(&backup, old.as_bytes(), 0o600)
            {
                failed = Some(e);
                return None;
            }
            kept = Some(backup.clone());
        }
        Some(new)
    })
    .with_context(|| format!("cannot edit {}", path.display()))?;
    if let Some(e) = failed {
        bail!("cannot keep a backup of {} as {}: {e}; the file is left as it was", path.display(), backup.display());
    }
    Ok(if added { Installed::Added { backup: kept } } else { Installed::Already })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_align_names_and_colour_only_when_asked() {
        let label = Label::new("worker0", 8, 4);
        assert_eq!(label.get(false), "worker0  | ");
        assert_eq!(label.get(true), "\x1b[36mworker0 \x1b[0m | ");
        assert_eq!(Label::new("gateway", 8, 6).get(true), "\x1b[32mgateway \x1b[0m | ");
        assert_eq!(prefixed("w0 | ", b"up 3 days\n"), b"w0 | up 3 days\n");
        assert_eq!(prefixed("w0 | ", b"no newline at the end"), b"w0 | no newline at the end\n");
        assert_eq!(prefixed("w0 | ", b"crlf\r\n"), b"w0 | crlf\n");
        assert_eq!(prefixed("w0 | ", b"\xff bytes\n"), b"w0 | \xff bytes\n");
    }

    #[test]
    fn the_summary_names_each_failure_and_how_it_ended() {
        let names = ["control0", "control1", "worker0", "worker1", "worker2"];
        assert_eq!(summary(&names[..2], &[Outcome::Ok, Outcome::Ok]), None);
        let outcomes = [
            Outcome::Ok,
            Outcome::Exit(3),
            Outcome::NotRunning,
            Outcome::TimedOut(Duration::from_secs(90)),
            Outcome::NotRun,
        ];
        assert_eq!(
            summary(&names, &outcomes).unwrap(),
            "4 of 5 VMs failed; control1: exit 3; worker0: not running (start it with `kubenet up worker0`); \
             worker1: timed out after 1m30s; worker2: not run (--serial stopped at the failure before)"
        );
    }
}
