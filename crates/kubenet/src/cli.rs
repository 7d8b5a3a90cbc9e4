//! The command line, as clap derive structs, and the usage error a command raises for words
//! clap could not check (VM names). No behaviour here.

use std::path::PathBuf;

/// A command named something the lab does not have (an unknown VM): exit 2, like clap's own
/// usage errors, not 1.
#[derive(Debug)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// For `lab.select(...).map_err(unknown_vm)`.
pub fn unknown_vm(message: String) -> anyhow::Error {
    anyhow::Error::new(Usage(message))
}

use clap::{Args, Parser, Subcommand};
use clap_complete::engine::{ArgValueCompleter, CompletionCandidate};

/// The lab a completion is for: the one the lookup order finds from here (`$KUBENET_CONFIG`,
/// ./kubenet.toml, the built-in lab). A `--config` on the line being completed is not seen.
fn lab_here() -> Option<kubenet_cluster::Lab> {
    let cwd = std::env::current_dir().ok()?;
    kubenet_cluster::load(&kubenet_cluster::choose_in(None, &cwd), &cwd).ok()
}

/// The lab's VM names that start with what is typed, each with its role and address.
pub fn vm_names(current: &std::ffi::OsStr) -> Vec<CompletionCandidate> {
    let typed = current.to_string_lossy();
    let Some(lab) = lab_here() else { return Vec::new() };
    lab.vms
        .iter()
        .filter(|vm| vm.name.starts_with(typed.as_ref()))
        .map(|vm| CompletionCandidate::new(&vm.name).help(Some(format!("{} {}", vm.role, vm.ip).into())))
        .collect()
}

/// The lab's snapshot names that start with what is typed.
pub fn snapshot_names(current: &std::ffi::OsStr) -> Vec<CompletionCandidate> {
    let typed = current.to_string_lossy();
    let Some(lab) = lab_here() else { return Vec::new() };
    let Ok(all) = kubenet_vm::snapshot::Store::new(&lab).list() else { return Vec::new() };
    all.iter()
        .filter(|m| m.name.starts_with(typed.as_ref()))
        .map(|m| {
            CompletionCandidate::new(&m.name)
                .help(Some(format!("{} VMs{}", m.vms.len(), if m.live { ", live" } else { "" }).into()))
        })
        .collect()
}

#[derive(Debug, Parser)]
#[command(name = "kubenet", version, about = "A reproducible N-VM lab for Kubernetes-the-hard-way clusters")]
#[command(propagate_version = true)]
pub struct Cli {
    /// The lab definition. Default: $KUBENET_CONFIG, then ./kubenet.toml, then the built-in
    /// reference lab.
    #[arg(long, short = 'c', global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// The lab's state directory (VM folders, leases, SSH files), instead of the config's
    /// `state_dir`.
    #[arg(long, global = true, value_name = "DIR")]
    pub dir: Option<PathBuf>,

    /// More log output (-v debug, -vv trace). RUST_LOG overrides both flags.
    #[arg(long, short = 'v', global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Less log output (-q warnings only, -qq errors only).
    #[arg(long, short = 'q', global = true, action = clap::ArgAction::Count, conflicts_with = "verbose")]
    pub quiet: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the resolved lab: every VM with its id, MAC, address and size.
    Config(ConfigArgs),
    /// Run the lab's DHCP and DNS servers in the foreground until Ctrl-C or SIGTERM. Needs root
    /// for ports 67 and 53.
    Serve(ServeArgs),
    /// Ask the running `kubenet serve` to re-read the lab definition (as SIGHUP does) and say
    /// whether it took.
    Reload,
    /// The lab's base images.
    #[command(subcommand)]
    Image(ImageAction),
    /// Prepare VMs without starting them: SSH host key, disk overlay on the base image, cloud-init
    /// seed; and the lab's known_hosts and ssh_config. What exists is kept (the seed is rewritten).
    Setup(SetupArgs),
    /// Prepare what is missing, have `kubenet serve` start the VMs, and wait until each has its
    /// DHCP lease, answers SSH with the host key kubenet gave it, and cloud-init has finished.
    Up(UpArgs),
    /// Stop VMs gracefully (ACPI power-down, then SIGTERM after the grace time).
    Down(DownArgs),
    /// What runs: one row per VM (state, pid, MAC, IP, lease, SSH, uptime).
    Status {
        /// JSON instead of a table, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// SSH to a VM with the lab's ssh_config (strict host-key checking), or run a command on
    /// many: `kubenet ssh worker0`, `kubenet ssh 'control*' @worker -- sudo systemctl restart
    /// containerd`. With several VMs (names, globs, roles @control @worker @all) the command runs
    /// on each in parallel, every line prefixed with the VM's name; exit 1 if any failed.
    Ssh(SshArgs),
    /// Copy files between this host and VMs, scp's way (`VM:path`; the VM may be a glob or a
    /// role): `kubenet cp ca.pem 'control*:'`, `kubenet cp '@worker:/var/log/syslog' logs/`
    /// (into logs/worker0/syslog, ...). Modes are kept; in parallel, through the lab's
    /// ssh_config.
    Cp(CpArgs),
    /// Print the `Include` line that makes your own ssh, scp, rsync and editors reach the lab's
    /// VMs by name with strict host keys; --install adds it to ~/.ssh/config once (`destroy`
    /// takes it out).
    SshConfig {
        /// Add the line at the top of ~/.ssh/config (the file as it was kept as
        /// ~/.ssh/config.kubenet-backup).
        #[arg(long)]
        install: bool,
    },
    /// Attach to a VM's serial console; Ctrl-] detaches.
    Console {
        #[arg(add = ArgValueCompleter::new(vm_names))]
        name: String,
    },
    /// Give VMs a fresh disk and seed, so cloud-init runs again at their next start (they must
    /// be stopped). Their host keys stay.
    Reset {
        /// The VMs to reset (at least one).
        #[arg(required = true, add = ArgValueCompleter::new(vm_names))]
        names: Vec<String>,
    },
    /// Lab snapshots: the whole lab (or `--vm` VMs) at one step of the tutorial, and back to it
    /// in seconds.
    #[command(subcommand)]
    Snapshot(SnapshotAction),
    /// Break the lab's network on purpose, and heal it: partitions between VMs, and delay, loss
    /// and a rate on one VM's traffic. Done by `kubenet serve` on the lab's own bridge and taps;
    /// cleared when serve stops.
    #[command(subcommand)]
    Net(NetAction),
    /// Remove everything of the lab but the base images and the lab definition: every VM's
    /// folder, the leases, known_hosts, ssh_config and the lab key. VMs must be stopped.
    Destroy {
        /// Do not ask.
        #[arg(long)]
        yes: bool,
    },
    /// The tutorial's tmux layout: a `qemu` window with every VM's console, then one window per
    /// role with a synchronized, logged-in pane per VM. Attaches at the end (or says how).
    Tmux {
        /// The tmux session's name.
        #[arg(default_value = "kubenet")]
        session: String,
    },
    /// Check every prerequisite of the lab on this host (QEMU, firmware, accelerator, ports 53
    /// and 67, serve, base images, SSH key, state directory, host resolver, disk space, tmux):
    /// ok, warn or fail with the fix; exit 1 when anything fails.
    Doctor {
        /// JSON instead of text, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Run `kubenet serve` as a boot-time service for your lab: a systemd unit (Linux) or a
    /// launchd daemon (macOS).
    #[command(subcommand)]
    Service(ServiceAction),
    /// Write the reference lab definition to DIR/kubenet.toml to edit (never overwrites).
    Init {
        /// Where to write kubenet.toml; created if missing.
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
    /// Write a man page for every command to DIR: kubenet.1, kubenet-serve.1,
    /// kubenet-snapshot-save.1, ... (for packages: `man -l DIR/kubenet.1` reads one).
    Man {
        /// Where to write them; created if missing.
        dir: PathBuf,
    },
    /// Print a shell completion script that completes subcommands, options, the lab's VM names
    /// and snapshot names (asking `kubenet` itself as you type), e.g.
    /// `kubenet completions bash > ~/.local/share/bash-completion/completions/kubenet`.
    Completions { shell: clap_complete::Shell },
}

/// A duration: "90s", "5m", "1h30m", or seconds ("30").
fn duration(s: &str) -> Result<std::time::Duration, String> {
    match s.parse::<u64>() {
        Ok(secs) => Ok(std::time::Duration::from_secs(secs)),
        Err(_) => kubenet_cluster::parse_duration(s),
    }
    .and_then(|d| {
        if d.is_zero() || d > std::time::Duration::from_secs(7 * 86400) {
            Err(format!("`{s}`: give a time between 1s and 7 days"))
        } else {
            Ok(d)
        }
    })
}

#[derive(Debug, Subcommand)]
pub enum NetAction {
    /// Cut VM off from others (default: the rest of the lab), both ways; the host still reaches
    /// it, so `kubenet ssh` works while, say, etcd loses its quorum.
    Partition {
        #[arg(add = ArgValueCompleter::new(vm_names))]
        vm: String,
        /// The VMs it is cut off from.
        #[arg(long, num_args = 1.., value_name = "VM", add = ArgValueCompleter::new(vm_names))]
        from: Vec<String>,
    },
    /// Delay the traffic to VM ("100ms"; 0 removes it), optionally give or take --jitter.
    Delay {
        #[arg(add = ArgValueCompleter::new(vm_names))]
        vm: String,
        #[arg(value_parser = delay)]
        delay: std::time::Duration,
        /// A random part of the delay, up to it ("10ms").
        #[arg(long, value_parser = delay)]
        jitter: Option<std::time::Duration>,
    },
    /// Drop a share of the traffic to VM ("5%", "0.5%"; 0% removes it).
    Loss {
        #[arg(add = ArgValueCompleter::new(vm_names))]
        vm: String,
        #[arg(value_parser = loss)]
        loss: u32,
    },
    /// Hold the traffic to VM to a rate ("10mbit", "512kbit", "1gbit"; "0" removes it).
    Rate {
        #[arg(add = ArgValueCompleter::new(vm_names))]
        vm: String,
        #[arg(value_parser = rate)]
        rate: u64,
    },
    /// Undo every fault of these VMs (none named: of the whole lab).
    Heal {
        #[arg(add = ArgValueCompleter::new(vm_names))]
        vms: Vec<String>,
    },
    /// List the faults in force.
    Show {
        /// JSON instead of a table, for scripts.
        #[arg(long)]
        json: bool,
    },
}

/// A delay: "100ms", "1s", "250us"; at most 60 s.
fn delay(s: &str) -> Result<std::time::Duration, String> {
    let d = match s.trim() {
        "0" => std::time::Duration::ZERO,
        t => kubenet_cluster::parse_duration(t).map_err(|e| format!("`{s}`: {e} (write e.g. 100ms)"))?,
    };
    if d.as_micros() > u128::from(crate::proto::MAX_DELAY_US) {
        return Err(format!("`{s}` is more than the 60 s a delay may be"));
    }
    if !d.is_zero() && d.as_micros() == 0 {
        return Err(format!("`{s}` is less than the 1us a delay is counted in (0 removes the delay)"));
    }
    Ok(d)
}

/// A loss: "5%", "0.5%", "100%", to parts per million.
fn loss(s: &str) -> Result<u32, String> {
    let number = s.trim().strip_suffix('%').unwrap_or(s.trim());
    let bad = || format!("`{s}` is not a share of packets: write a percentage from 0% to 100%, e.g. 5% or 0.5%");
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() || frac.len() > 4 || !(whole.chars().chain(frac.chars())).all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    let ppm =
        whole.parse::<u64>().map_err(|_| bad())? * 10_000 + format!("{frac:0<4}").parse::<u64>().map_err(|_| bad())?;
    if ppm > u64::from(crate::proto::MAX_LOSS_PPM) {
        return Err(bad());
    }
    Ok(ppm as u32)
}

/// A rate in tc's words: "10mbit", "512kbit", "1gbit", "8000bit"; "kbps", "mbps" are bytes per
/// second, as in tc. To bits per second.
fn rate(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let at = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(at);
    let bad = || format!("`{s}` is not a rate: write e.g. 10mbit, 512kbit or 1gbit (0 removes the limit)");
    let n: u64 = number.parse().map_err(|_| bad())?;
    let scale: u64 = match unit {
        "" if n == 0 => 1,
        "bit" => 1,
        "kbit" => 1_000,
        "mbit" => 1_000_000,
        "gbit" => 1_000_000_000,
        "bps" => 8,
        "kbps" => 8_000,
        "mbps" => 8_000_000,
        "gbps" => 8_000_000_000,
        _ => return Err(bad()),
    };
    let bps = n.checked_mul(scale).ok_or_else(bad)?;
    if bps != 0 && !(crate::proto::MIN_RATE_BPS..=crate::proto::MAX_RATE_BPS).contains(&bps) {
        return Err(format!("`{s}` is out of range: from 8kbit to 100gbit"));
    }
    Ok(bps)
}

#[derive(Debug, Args)]
pub struct SshArgs {
    /// VMs: names, globs ('control*', quoted for the shell) or roles (@control, @worker, @all).
    #[arg(required = true, value_name = "VM", add = ArgValueCompleter::new(vm_names))]
    pub targets: Vec<String>,
    /// The command to run (after `--`). With one VM and none: a login shell.
    #[arg(last = true)]
    pub command: Vec<String>,
    /// One VM after another, in lab order, stopping at the first that fails (rolling restarts).
    #[arg(long)]
    pub serial: bool,
    /// The most each VM may take ("90s", "5m"); past it, its ssh is ended and it counts as failed.
    #[arg(long, value_parser = duration, value_name = "TIME")]
    pub timeout: Option<std::time::Duration>,
}

#[derive(Debug, Args)]
pub struct CpArgs {
    /// What to copy: local paths, or `VM:path` (VM a name, a glob or a role).
    #[arg(required = true, value_name = "SRC")]
    pub sources: Vec<String>,
    /// Where: a local path, or `VM:path` (`VM:` alone is the login's home).
    #[arg(value_name = "DEST")]
    pub dest: String,
    /// Copy directories and their contents.
    #[arg(short = 'r', long)]
    pub recursive: bool,
    /// The most each VM's copy may take ("90s", "5m").
    #[arg(long, value_parser = duration, value_name = "TIME")]
    pub timeout: Option<std::time::Duration>,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ConfigArgs {
    /// JSON instead of a table, for scripts.
    #[arg(long)]
    pub json: bool,

    #[command(subcommand)]
    pub action: Option<ConfigAction>,
}

#[derive(Debug, Subcommand)]
pub enum ConfigAction {
    /// Validate a lab definition; every problem is printed as FILE:LINE:COLUMN: KEY: MESSAGE.
    Check {
        /// The file to check. Default: the config the lookup order picks.
        file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ImageAction {
    /// Download the base images of the VMs (all when none are named) from their groups'
    /// `image_url`, verify each against its SHA-256 (`image_sha256`, else the publisher's
    /// SHA256SUMS beside it) and put it in place; an image already there and matching is kept.
    Pull {
        /// VMs whose images to fetch.
        #[arg(add = ArgValueCompleter::new(vm_names))]
        names: Vec<String>,
    },
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum ServiceManager {
    /// A systemd unit (Linux).
    Systemd,
    /// A launchd daemon (macOS).
    Launchd,
}

#[derive(Debug, Subcommand)]
pub enum ServiceAction {
    /// Install and start the service for this lab (the config and state directory this command
    /// picks), as the user who ran sudo: `sudo kubenet service install`.
    Install {
        /// Print the unit (or property list) and change nothing.
        #[arg(long)]
        print: bool,
        /// With --print: the file for this service manager rather than this system's.
        #[arg(long, value_enum, requires = "print")]
        manager: Option<ServiceManager>,
    },
    /// Stop the service and remove it; running VMs are left running.
    Uninstall,
    /// The service manager's view of it and its last log lines.
    Status,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotAction {
    /// Take snapshot NAME of every stopped VM's disk (an internal qcow2 snapshot), its UEFI
    /// variables and its lease, all or nothing; or of the running lab with --live.
    Save {
        /// Letters, digits, `.`, `_` and `-`.
        name: String,
        /// Of the running VMs, with their memory: `serve` pauses them all, saves, resumes (QEMU
        /// 6.0 or later). Restoring it starts stopped VMs and sets the guests' clocks.
        #[arg(long)]
        live: bool,
        /// Only these VMs.
        #[arg(long = "vm", value_name = "NAME", num_args = 1.., add = ArgValueCompleter::new(vm_names))]
        vms: Vec<String>,
    },
    /// Every snapshot: name, age, kind, and per VM the disk it pins and the memory it saved.
    List {
        /// JSON instead of a table, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Put the VMs back to snapshot NAME, all or nothing; refused, VM by VM, where the lab
    /// changed since (a VM added or removed, readdressed, or its disk reset).
    Restore {
        #[arg(add = ArgValueCompleter::new(snapshot_names))]
        name: String,
        /// Only these VMs of the snapshot.
        #[arg(long = "vm", value_name = "NAME", num_args = 1.., add = ArgValueCompleter::new(vm_names))]
        vms: Vec<String>,
    },
    /// Delete snapshot NAME from every disk (or only `--vm` ones).
    Delete {
        #[arg(add = ArgValueCompleter::new(snapshot_names))]
        name: String,
        /// Only these VMs of the snapshot.
        #[arg(long = "vm", value_name = "NAME", num_args = 1.., add = ArgValueCompleter::new(vm_names))]
        vms: Vec<String>,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Create no host network devices (on Linux: no bridge, taps or NAT); serve on the
    /// interfaces that exist. Tests and benchmarks run this way inside namespaces.
    #[arg(long)]
    pub no_bridge: bool,

    /// The address the DHCP socket binds. 0.0.0.0 serves every interface that has an address in
    /// the lab's subnet, including ones that appear later (macOS's bridge100).
    #[arg(long, default_value = "0.0.0.0", value_name = "IP")]
    pub dhcp_listen: std::net::Ipv4Addr,

    /// The DHCP server port; something other than 67 only for tests.
    #[arg(long, default_value_t = 67, value_name = "PORT")]
    pub dhcp_port: u16,

    /// Serve DNS only, no DHCP: the lab's names for the host, or beside another DHCP server.
    #[arg(long)]
    pub dns_only: bool,

    /// The address the DNS server binds (UDP and TCP).
    #[arg(long, default_value = "0.0.0.0", value_name = "IP")]
    pub dns_listen: std::net::IpAddr,

    /// The DNS server port.
    #[arg(long, default_value_t = 53, value_name = "PORT")]
    pub dns_port: u16,

    /// Make the host itself resolve the lab's domain through kubenet while it runs: macOS
    /// /etc/resolver/DOMAIN, Linux systemd-resolved's per-link DNS. Undone when it stops.
    #[arg(long)]
    pub host_resolver: bool,

    /// Where --host-resolver writes on macOS.
    #[arg(long, default_value = "/etc/resolver", value_name = "DIR", hide = true)]
    pub resolver_dir: std::path::PathBuf,

    /// Read reloads (SIGHUP, `kubenet reload`) from this lab definition instead of the one
    /// serve started with. The service starts from a root-owned copy and reloads from the
    /// owner's own file; a reload changes only what may change live either way.
    #[arg(long, value_name = "FILE")]
    pub reload_from: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub struct SetupArgs {
    /// The VMs to prepare; none: all.
    #[arg(add = ArgValueCompleter::new(vm_names))]
    pub names: Vec<String>,

    /// Also put the lab's host keys into ~/.ssh/known_hosts (under a lock), replacing older
    /// entries for the VMs' names and addresses.
    #[arg(long)]
    pub update_known_hosts: bool,

    /// Also add `Include <state dir>/ssh_config` at the top of ~/.ssh/config (once), so plain
    /// `ssh worker0` works; `kubenet destroy` takes it out again.
    #[arg(long)]
    pub ssh_include: bool,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub setup: SetupArgs,

    /// Print the QEMU command lines and do nothing else.
    #[arg(long)]
    pub dry_run: bool,

    /// How long to wait for every VM to be ready (lease, SSH, cloud-init finished), in seconds.
    #[arg(long, default_value_t = 600, value_name = "SECS")]
    pub timeout: u64,
}

#[derive(Debug, Args)]
pub struct DownArgs {
    /// The VMs to stop; none: all.
    #[arg(add = ArgValueCompleter::new(vm_names))]
    pub names: Vec<String>,

    /// Seconds a guest gets to power off before QEMU is stopped.
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    pub grace: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_figures_read_as_tc_writes_them_and_absurd_ones_are_refused() {
        assert_eq!(delay("100ms"), Ok(std::time::Duration::from_millis(100)));
        assert_eq!(delay("0"), Ok(std::time::Duration::ZERO));
        assert!(delay("61s").unwrap_err().contains("more than the 60 s"));
        assert!(delay("-5ms").is_err());
        assert!(delay("500ns").unwrap_err().contains("less than the 1us"));
        assert_eq!(loss("5%"), Ok(50_000));
        assert_eq!(loss("0.5%"), Ok(5_000));
        assert_eq!(loss("100%"), Ok(1_000_000));
        assert_eq!(loss("0.0001%"), Ok(1));
        for bad in ["101%", "-1%", "5.00001%", "%", "five", "1e3%"] {
            assert!(loss(bad).is_err(), "{bad}");
        }
        assert_eq!(rate("10mbit"), Ok(10_000_000));
        assert_eq!(rate("512Kbit"), Ok(512_000));
        assert_eq!(rate("1mbps"), Ok(8_000_000));
        assert_eq!(rate("0"), Ok(0));
        for bad in ["10", "7999bit", "101gbit", "-1mbit", "10 parsecs", "99999999999999999999gbit"] {
            assert!(rate(bad).is_err(), "{bad}");
        }
    }
}
