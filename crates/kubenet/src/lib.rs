//! kubenet's command line as a library, so that its logic is unit-tested without a binary or
//! root (`cargo test -p kubenet --lib`); `src/main.rs` only calls [`main`]. It parses the command
//! line, loads the lab, and maps results to exit codes (0 ok, 1 failure, 2 usage or config
//! error). The subcommands live in their own modules.

mod agent;
mod cli;
mod client;
mod commands;
// Public for fuzz/ only: the agent's `decode_request` is what the control_request target feeds.
pub mod proto;

use agent::{control, serve};
use commands::{console, cp, doctor, lifecycle, net, service, snapshot, ssh, table, tmux};

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser};
use kubenet_cluster::{ConfigError, Lab};

use cli::{Cli, Command, ConfigAction};

/// An error and the exit code it earns.
enum Failure {
    /// A config problem: exit 2, like a usage error.
    Config(ConfigError),
    /// Words the lab does not know (a VM name): exit 2.
    Usage(anyhow::Error),
    /// Standard output was closed by its reader (`kubenet config | head`): not a failure, as in
    /// ripgrep.
    StdoutClosed,
    Other(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        // A write to standard output that found it closed, however deep in a command: see Out.
        let closed = e.chain().any(|c| {
            c.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .is_some_and(|inner| inner.is::<StdoutClosed>())
        });
        let usage = e.downcast_ref::<cli::Usage>().is_some()
            || matches!(
                e.downcast_ref::<kubenet_vm::image::ImageError>(),
                Some(kubenet_vm::image::ImageError::Select(_))
            );
        if closed {
            Failure::StdoutClosed
        } else if usage {
            Failure::Usage(e)
        } else {
            Failure::Other(e)
        }
    }
}

/// The marker inside the io::Error that [`Out`] returns when standard output's reader went away.
#[derive(Debug)]
struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("standard output closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// Standard output for the commands: a broken pipe comes back marked, so `kubenet status | head`
/// ends quietly, while a broken pipe elsewhere (a socket, a child's stdin) stays an error.
struct Out<W>(W);

impl<W: Write> Write for Out<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf).map_err(mark_closed)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush().map_err(mark_closed)
    }
}

fn mark_closed(e: std::io::Error) -> std::io::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe { std::io::Error::other(StdoutClosed) } else { e }
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Failure::Config(e)
    }
}

/// The whole of `kubenet`: what `src/main.rs` runs.
pub fn main() -> ExitCode {
    // A shell asking for completions (COMPLETE=bash kubenet -- ...): answer and exit.
    clap_complete::CompleteEnv::with_factory(Cli::command).complete();
    let cli = Cli::parse();
    init_tracing(cli.verbose, cli.quiet);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(e)) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
        Err(Failure::StdoutClosed) => ExitCode::SUCCESS,
        Err(Failure::Usage(e)) => {
            eprintln!("kubenet: {e:#}");
            ExitCode::from(2)
        }
        Err(Failure::Other(e)) => {
            eprintln!("kubenet: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_tracing(verbose: u8, quiet: u8) {
    let level = match (verbose, quiet) {
        (0, 0) => "info",
        (1, _) => "debug",
        (v, _) if v >= 2 => "trace",
        (_, 1) => "warn",
        _ => "error",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

/// The lab the lookup order picks, with `--dir` applied.
fn load_lab(cli: &Cli, file: Option<&Path>) -> Result<Lab, Failure> {
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let choice = kubenet_cluster::choose_in(file.or(cli.config.as_deref()), &cwd);
    tracing::debug!(?choice, "config");
    let mut lab = kubenet_cluster::load(&choice, &cwd)?;
    if let Some(dir) = &cli.dir {
        lab.state_dir = cwd.join(dir);
    }
    Ok(lab)
}

/// The lab definition the lookup order picks, as an absolute path; None: the built-in lab.
fn chosen_config(cli: &Cli) -> anyhow::Result<Option<std::path::PathBuf>> {
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    Ok(match kubenet_cluster::choose_in(cli.config.as_deref(), &cwd) {
        kubenet_cluster::Choice::File(path) => Some(cwd.join(path)),
        kubenet_cluster::Choice::Embedded => None,
    })
}

/// How another process (a tmux pane) runs this kubenet on the same lab: this binary, the config
/// file that was chosen (made absolute) and the state directory.
fn pane_command(cli: &Cli, lab: &Lab) -> anyhow::Result<Vec<std::ffi::OsString>> {
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let mut argv = vec![std::env::current_exe().context("cannot tell where kubenet is")?.into_os_string()];
    if let Some(path) = chosen_config(cli)? {
        argv.extend(["--config".into(), path.into_os_string()]);
    }
    argv.extend(["--dir".into(), cwd.join(&lab.state_dir).into_os_string()]);
    Ok(argv)
}

/// The registration script for `shell` of clap_complete's dynamic completion: the shell calls
/// `COMPLETE=<shell> kubenet -- <words>` for candidates.
fn completion_script(shell: clap_complete::Shell, buf: &mut Vec<u8>) -> std::io::Result<()> {
    use clap_complete::env::{Bash, Elvish, EnvCompleter, Fish, Powershell, Zsh};
    let completer: &dyn EnvCompleter = match shell {
        clap_complete::Shell::Bash => &Bash,
        clap_complete::Shell::Elvish => &Elvish,
        clap_complete::Shell::Fish => &Fish,
        clap_complete::Shell::PowerShell => &Powershell,
        clap_complete::Shell::Zsh => &Zsh,
        other => return Err(std::io::Error::other(format!("no completions for {other}"))),
    };
    completer.write_registration("COMPLETE", "kubenet", "kubenet", "kubenet", buf)
}

/// A failed write to standard output: a closed pipe (marked by [`Out`]) is the reader's choice,
/// anything else an error.
fn output(e: std::io::Error) -> Failure {
    anyhow::Error::new(e).context("writing to standard output").into()
}

fn run(cli: Cli) -> Result<(), Failure> {
    // Not locked for the whole run: `console` writes the VM's output from a thread of its own.
    let mut stdout = Out(std::io::stdout());
    match &cli.command {
        Command::Config(args) => config(&cli, args, &mut stdout)?,
        Command::Doctor { json } => {
            if !doctor::run(&load_lab(&cli, None)?, *json, &mut stdout)? {
                return Err(Failure::Other(anyhow::anyhow!("doctor found problems: each FAIL above says what to do")));
            }
        }
        Command::Service(action) => service_command(&cli, action, &mut stdout)?,
        Command::Init { dir } => init(dir, &mut stdout)?,
        Command::Serve(args) => serve_command(&cli, args)?,
        Command::Reload => reload(&cli, &mut stdout)?,
        Command::Image(cli::ImageAction::Pull { names }) => {
            lifecycle::image_pull(&load_lab(&cli, None)?, names, &mut stdout)?;
        }
        Command::Setup(args) => {
            lifecycle::setup(&load_lab(&cli, None)?, args, &mut stdout)?;
        }
        Command::Up(args) => lifecycle::up(&load_lab(&cli, None)?, args, &mut stdout)?,
        Command::Down(args) => lifecycle::down(&load_lab(&cli, None)?, args, &mut stdout)?,
        Command::Status { json } => lifecycle::status(&load_lab(&cli, None)?, *json, &mut stdout)?,
        Command::Ssh(a) => ssh::ssh(
            &load_lab(&cli, None)?,
            &ssh::Request { targets: &a.targets, command: &a.command, serial: a.serial, timeout: a.timeout },
        )?,
        Command::Cp(a) => cp::cp(
            &load_lab(&cli, None)?,
            &cp::Request { sources: &a.sources, dest: &a.dest, recursive: a.recursive, timeout: a.timeout },
        )?,
        Command::Net(action) => net::net(&load_lab(&cli, None)?, action, &mut stdout)?,
        Command::SshConfig { install } => ssh::ssh_config(&load_lab(&cli, None)?, *install, &mut stdout)?,
        Command::Console { name } => console::attach(&load_lab(&cli, None)?, name)?,
        Command::Reset { names } => lifecycle::reset(&load_lab(&cli, None)?, names, &mut stdout)?,
        Command::Snapshot(action) => snapshot::run(&load_lab(&cli, None)?, action, &mut stdout)?,
        Command::Destroy { yes } => lifecycle::destroy(&load_lab(&cli, None)?, *yes, &mut stdout)?,
        Command::Tmux { session } => {
            let lab = load_lab(&cli, None)?;
            tmux::run(&lab, session, &pane_command(&cli, &lab)?, &mut stdout)?;
        }
        Command::Man { dir } => man(dir, &mut stdout)?,
        Command::Completions { shell } => {
            // The dynamic script: it asks `kubenet` (from PATH) for candidates as you type, so
            // VM and snapshot names come from the lab of the moment. Written to memory first,
            // then to standard output like every other command's.
            let mut script = Vec::new();
            completion_script(*shell, &mut script).map_err(output)?;
            stdout.write_all(&script).and_then(|()| stdout.flush()).map_err(output)?;
        }
    }
    Ok(())
}

/// `kubenet config [check FILE]`.
fn config(cli: &Cli, args: &cli::ConfigArgs, stdout: &mut Out<std::io::Stdout>) -> Result<(), Failure> {
    match &args.action {
        None => {
            let lab = load_lab(cli, None)?;
            if args.json {
                serde_json::to_writer_pretty(&mut *stdout, &lab).map_err(|e| output(e.into()))?;
                writeln!(stdout).ok();
            } else {
                write!(stdout, "{}", table::render(&lab, kubenet_cluster::Arch::HOST)).map_err(output)?;
            }
        }
        Some(ConfigAction::Check { file }) => {
            let lab = load_lab(cli, file.as_deref())?;
            writeln!(stdout, "{}: ok, {} VMs on {}", lab.source, lab.vms.len(), lab.network.subnet).ok();
        }
    }
    Ok(())
}

/// `kubenet service install|uninstall|status`.
fn service_command(cli: &Cli, action: &cli::ServiceAction, stdout: &mut Out<std::io::Stdout>) -> Result<(), Failure> {
    match action {
        cli::ServiceAction::Install { print, manager } => {
            let lab = load_lab(cli, None)?;
            let spec = service::spec(chosen_config(cli)?, &lab.state_dir)?;
            let manager = match manager {
                Some(cli::ServiceManager::Systemd) => service::Manager::Systemd,
                Some(cli::ServiceManager::Launchd) => service::Manager::Launchd,
                None => service::Manager::current(),
            };
            service::install(&spec, *print, manager, stdout)?;
        }
        cli::ServiceAction::Uninstall => service::uninstall(stdout)?,
        cli::ServiceAction::Status => service::status()?,
    }
    Ok(())
}

/// `kubenet init DIR`: the reference lab's definition, never over an existing one.
fn init(dir: &Path, stdout: &mut Out<std::io::Stdout>) -> Result<(), Failure> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(kubenet_cluster::CONFIG_FILE_NAME);
    // create_new: an existing lab definition is never overwritten.
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            anyhow::anyhow!(
                "{} already exists; kubenet init never overwrites a lab definition (remove it first to start over)",
                path.display()
            )
        } else {
            anyhow::Error::new(e).context(format!("cannot create {}", path.display()))
        }
    })?;
    f.write_all(kubenet_cluster::REFERENCE_CONFIG.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    // The command that uses this file: from its folder kubenet finds it by itself.
    let show = if dir.as_os_str().is_empty() || dir == Path::new(".") {
        "kubenet config".to_owned()
    } else {
        kubenet_vm::qemu::shell_line(&[
            "kubenet".into(),
            "--config".into(),
            path.clone().into_os_string(),
            "config".into(),
        ])
    };
    writeln!(stdout, "wrote {}: edit it, then `{show}` shows the lab", path.display()).map_err(output)?;
    Ok(())
}

/// `kubenet serve`: the agent, with a reload that reads the lab definition as this run did.
fn serve_command(cli: &Cli, args: &cli::ServeArgs) -> Result<(), Failure> {
    // The lab definition lives in the owner's folder: it is read with the owner's rights, so
    // that a link there to a file only root may read gets the owner's "permission denied".
    let (uid, gid) = control::owner();
    // Root runs this binary again at every `sudo kubenet serve`: one its user can replace is
    // one any program running as that user can replace (service install copies it for that).
    if nix::unistd::geteuid().is_root()
        && uid != 0
        && let Err(e) = std::env::current_exe()
            .map_err(|e| e.to_string())
            .and_then(|exe| kubenet_vm::trust::root_only(&exe).map(drop).map_err(|e| e.to_string()))
    {
        tracing::warn!(
            "this kubenet runs as root but can be replaced by others than root ({e}): install it where only root can change it, e.g. `sudo install -m 755 $(command -v kubenet) /usr/local/bin/`"
        );
    }
    let owner = kubenet_vm::owner::Owner::for_agent(uid, gid).map_err(|e| e.to_string());
    let reader = owner.clone().unwrap_or_else(|_| kubenet_vm::owner::Owner::bare(uid, gid));
    let load = |file: Option<&Path>| {
        reader.run_as(|| load_lab(cli, file)).map_err(|e| Failure::Other(e.into())).and_then(|r| r)
    };
    let lab = load(None)?;
    // SIGHUP reads the lab definition again the same way, or from --reload-from.
    let reload = || {
        load(args.reload_from.as_deref()).map_err(|e| match e {
            Failure::Config(c) => anyhow::Error::new(c),
            Failure::Usage(o) | Failure::Other(o) => o,
            Failure::StdoutClosed => anyhow::anyhow!("standard output closed"),
        })
    };
    serve::run(lab, reader.clone(), owner, args, &reload)?;
    Ok(())
}

/// `kubenet reload`: asks the running agent, and shows what waits for a restart.
fn reload(cli: &Cli, stdout: &mut Out<std::io::Stdout>) -> Result<(), Failure> {
    let lab = load_lab(cli, None)?;
    let answer = client::request(&lab.state_dir, &crate::proto::Request::Reload)?;
    let crate::proto::Answer::Reloaded { source, warnings } = answer else {
        return Err(client::unexpected(answer).into());
    };
    writeln!(stdout, "reloaded {source}").map_err(output)?;
    for w in warnings {
        writeln!(stdout, "warning: {w}").map_err(output)?;
    }
    Ok(())
}

/// `kubenet man DIR`: a page per command.
fn man(dir: &Path, stdout: &mut Out<std::io::Stdout>) -> Result<(), Failure> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    clap_mangen::generate_to(Cli::command(), dir)
        .with_context(|| format!("cannot write the man pages to {}", dir.display()))?;
    let n = std::fs::read_dir(dir)
        .map(|d| d.filter_map(Result::ok).filter(|e| e.path().extension().is_some_and(|x| x == "1")).count())
        .unwrap_or(0);
    writeln!(stdout, "wrote {n} man pages to {}", dir.display()).map_err(output)?;
    Ok(())
}
