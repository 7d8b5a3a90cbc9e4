//! `kubenet service install|uninstall|status`: `serve` as a boot-time service for the invoking
//! user's lab, as dnsmasq runs under `brew services` and socket_vmnet under launchd. Linux gets a
//! systemd unit (`Type=notify`: `serve` says READY once its ports are bound), macOS a launchd
//! daemon (RunAtLoad, KeepAlive, logs to a file). The unit, the property list and the manager
//! commands are data, built and tested anywhere; `run` writes the file and runs the commands.
//!
//! `serve` never daemonizes itself: the manager keeps it, and `KillMode=process` (launchd does
//! the same by default for a daemon's children that left its process group) lets the VMs,
//! which QEMU daemonizes, outlive a restart of the agent, as they outlive `serve` in a terminal.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Serialize;

/// The service's name: `kubenet.service`, `dev.kubenet.serve`.
pub const UNIT: &str = "kubenet.service";
pub const LABEL: &str = "dev.kubenet.serve";

/// What the service runs, and for whom.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    /// The kubenet binary, absolute.
    pub exe: PathBuf,
    /// The lab definition, absolute; None: the built-in lab.
    pub config: Option<PathBuf>,
    /// The lab's state directory, absolute.
    pub state_dir: PathBuf,
    /// The user whose lab it is (who ran sudo): the control socket and the VMs are theirs.
    pub user: String,
    pub uid: u32,
    pub gid: u32,
}

/// The service managers kubenet installs into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Manager {
    Systemd,
    Launchd,
}

impl Manager {
    /// The host's: launchd on macOS, systemd elsewhere.
    pub fn current() -> Manager {
        match kubenet_cluster::Os::HOST {
            Some(kubenet_cluster::Os::MacOs) => Manager::Launchd,
            _ => Manager::Systemd,
        }
    }

    /// Where the service's file goes.
    pub fn path(self) -> PathBuf {
        match self {
            Manager::Systemd => Path::new("/etc/systemd/system").join(UNIT),
            Manager::Launchd => Path::new("/Library/LaunchDaemons").join(format!("{LABEL}.plist")),
        }
    }

    /// The file's text for `spec`.
    pub fn render(self, spec: &Spec) -> String {
        match self {
            Manager::Systemd => systemd_unit(spec),
            Manager::Launchd => launchd_plist(spec),
        }
    }

    /// What makes the manager take up the written file and start the service.
    pub fn install_commands(self) -> Vec<Vec<String>> {
        let path = self.path().display().to_string();
        let c = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        match self {
            Manager::Systemd => vec![c(&["systemctl", "daemon-reload"]), c(&["systemctl", "enable", "--now", UNIT])],
            // bootout first: a service already loaded keeps its old file otherwise.
            Manager::Launchd => {
                vec![
                    c(&["launchctl", "bootout", &format!("system/{LABEL}")]),
                    c(&["launchctl", "bootstrap", "system", &path]),
                ]
            }
        }
    }

    /// What stops the service and forgets it (the file is removed between the two lists).
    pub fn uninstall_commands(self) -> (Vec<Vec<String>>, Vec<Vec<String>>) {
        let c = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        match self {
            Manager::Systemd => {
                (vec![c(&["systemctl", "disable", "--now", UNIT])], vec![c(&["systemctl", "daemon-reload"])])
            }
            Manager::Launchd => (vec![c(&["launchctl", "bootout", &format!("system/{LABEL}")])], vec![]),
        }
    }

    /// What shows the service's state and its last log lines.
    pub fn status_commands(self) -> Vec<Vec<String>> {
        let c = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        match self {
            Manager::Systemd => vec![
                c(&["systemctl", "status", "--no-pager", "--lines=0", UNIT]),
                c(&["journalctl", "--no-pager", "-n", "20", "-u", UNIT]),
            ],
            Manager::Launchd => {
                vec![c(&["launchctl", "print", &format!("system/{LABEL}")]), c(&["tail", "-n", "20", LAUNCHD_LOG])]
            }
        }
    }
}

/// Where the launchd daemon's output goes (launchd has no journal).
pub const LAUNCHD_LOG: &str = "/var/log/kubenet.log";

impl Spec {
    /// The command line the service runs: `kubenet [--config FILE] --dir STATE serve`.
    pub fn argv(&self) -> Vec<String> {
        let mut v = vec![self.exe.display().to_string()];
        if let Some(c) = &self.config {
            v.extend(["--config".into(), c.display().to_string()]);
        }
        v.extend(["--dir".into(), self.state_dir.display().to_string(), "serve".into()]);
        v
    }
}

/// One word of a systemd command line or path list: quoted when it has to be, with systemd's
/// specifier (`%`) and variable (`$`) characters escaped.
pub fn systemd_word(word: &str) -> String {
    let escaped = word.replace('%', "%%").replace('$', "$$");
    if !escaped.is_empty() && !escaped.chars().any(|c| c.is_whitespace() || matches!(c, '"' | '\'' | '\\' | ';')) {
        return escaped;
    }
    let mut q = String::from("\"");
    for c in escaped.chars() {
        if matches!(c, '"' | '\\') {
            q.push('\\');
        }
        q.push(c);
    }
    q.push('"');
    q
}

/// The systemd unit. Hardening: the system read-only but for the lab's state directory, home
/// directories read-only (the lab definition may live there), a private /tmp, and only the
/// capabilities `serve` uses: binding 53 and 67, the bridge, taps and NAT, handing files to the
/// user, QEMU dropping to the user, and stopping QEMUs that run as the user. Not restricted:
/// devices (/dev/kvm, /dev/net/tun), /proc/sys (IP forwarding for NAT), and W^X memory
/// (QEMU's TCG writes the code it runs).
fn systemd_unit(spec: &Spec) -> String {
    let exec: Vec<String> = spec.argv().iter().map(|w| systemd_word(w)).collect();
    format!(
        "\
# Installed by `kubenet service install`; `kubenet service uninstall` removes it.
[Unit]
Description=kubenet serve: DHCP, DNS and host network for {user}'s VM lab
Documentation=man:kubenet-serve(1)
Wants=network-online.target
After=network-online.target
# Before the host's own DNS: kubenet's lab has port 53 on its bridge address.
Before=nss-lookup.target

[Service]
Type=notify
ExecStart={exec}
Environment=SUDO_USER={user} SUDO_UID={uid} SUDO_GID={gid}
Restart=on-failure
RestartSec=2
# The VMs are QEMU daemons of their own: a restart of the agent leaves them running, as
# stopping `kubenet serve` in a terminal does.
KillMode=process
CapabilityBoundingSet=CAP_NET_BIND_SERVICE CAP_NET_ADMIN CAP_NET_RAW CAP_CHOWN CAP_FOWNER CAP_DAC_OVERRIDE CAP_SETUID CAP_SETGID CAP_KILL
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=read-only
ReadWritePaths={state}
PrivateTmp=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictSUIDSGID=yes
RestrictRealtime=yes
LockPersonality=yes
SystemCallArchitectures=native
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK AF_PACKET

[Install]
WantedBy=multi-user.target
",
        user = spec.user,
        uid = spec.uid,
        gid = spec.gid,
        exec = exec.join(" "),
        state = systemd_word(&spec.state_dir.display().to_string()),
    )
}

/// launchd's job description, as `launchd.plist(5)` names its keys.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct LaunchDaemon {
    label: &'static str,
    program_arguments: Vec<String>,
    environment_variables: std::collections::BTreeMap<&'static str, String>,
    run_at_load: bool,
    keep_alive: bool,
    standard_out_path: &'static str,
    standard_error_path: &'static str,
}

fn launchd_plist(spec: &Spec) -> String {
    let job = LaunchDaemon {
        label: LABEL,
        program_arguments: spec.argv(),
        environment_variables: [
            ("SUDO_USER", spec.user.clone()),
            ("SUDO_UID", spec.uid.to_string()),
            ("SUDO_GID", spec.gid.to_string()),
        ]
        .into(),
        run_at_load: true,
        keep_alive: true,
        standard_out_path: LAUNCHD_LOG,
        standard_error_path: LAUNCHD_LOG,
    };
    let mut out = Vec::new();
    plist::to_writer_xml(&mut out, &job).expect("a launchd job serializes");
    out.push(b'\n');
    String::from_utf8(out).expect("plist XML is UTF-8")
}

/// The service's spec for the lab the command line chose: this binary, that lab definition
/// and state directory, and the user behind sudo.
pub fn spec(config: Option<PathBuf>, state_dir: &Path) -> anyhow::Result<Spec> {
    let exe = std::env::current_exe().context("cannot tell where kubenet is")?;
    let exe = exe.canonicalize().unwrap_or(exe);
    let (uid, gid) = crate::control::owner();
    let user = match std::env::var("SUDO_USER") {
        Ok(u) if !u.is_empty() => u,
        _ => nix::unistd::User::from_uid(uid.into())
            .ok()
            .flatten()
            .map(|u| u.name)
            .with_context(|| format!("no user name for uid {uid}"))?,
    };
    let state_dir = std::path::absolute(state_dir).context("cannot tell the state directory's path")?;
    Ok(Spec { exe, config, state_dir, user, uid, gid })
}

fn run_all(commands: &[Vec<String>], tolerate_failure: bool) -> anyhow::Result<()> {
    for c in commands {
        let status =
            std::process::Command::new(&c[0]).args(&c[1..]).status().with_context(|| format!("cannot run {}", c[0]))?;
        if !status.success() && !tolerate_failure {
            bail!("`{}` failed ({status})", c.join(" "));
        }
    }
    Ok(())
}

fn require_root(what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "{what} writes {} and needs root: `sudo kubenet service {what}` (or --print to see the file)",
            Manager::current().path().display()
        );
    }
    Ok(())
}

/// `kubenet service install [--print [--manager M]]`.
pub fn install(spec: &Spec, print: bool, m: Manager, out: &mut impl Write) -> anyhow::Result<()> {
    let text = m.render(spec);
    if print {
        write!(out, "{text}")?;
        return Ok(());
    }
    if m != Manager::current() {
        bail!("this system's service manager is not {m:?}: --manager only goes with --print");
    }
    require_root("install")?;
    if spec.uid == 0 {
        bail!(
            "run it with sudo from your own account, so that the lab's files and VMs stay yours (SUDO_UID is not set)"
        );
    }
    let path = m.path();
    kubenet_cluster::state::write_atomic(&path, text.as_bytes(), 0o644)
        .with_context(|| format!("cannot write {}", path.display()))?;
    writeln!(out, "wrote {}", path.display())?;
    // launchctl bootout of a service not loaded yet fails: that is fine.
    let commands = m.install_commands();
    let (first, rest) = commands.split_at(1);
    run_all(first, m == Manager::Launchd)?;
    run_all(rest, false)?;
    writeln!(out, "kubenet serve runs as a service now and at every boot: `kubenet service status` shows it")?;
    Ok(())
}

/// `kubenet service uninstall`.
pub fn uninstall(out: &mut impl Write) -> anyhow::Result<()> {
    require_root("uninstall")?;
    let m = Manager::current();
    let path = m.path();
    if !path.exists() {
        writeln!(out, "no service installed ({} does not exist)", path.display())?;
        return Ok(());
    }
    let (stop, after) = m.uninstall_commands();
    run_all(&stop, true)?;
    std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
    run_all(&after, true)?;
    writeln!(out, "stopped and removed {}; running VMs were left running", path.display())?;
    Ok(())
}

/// `kubenet service status`: the manager's view and the last log lines.
pub fn status() -> anyhow::Result<()> {
    let m = Manager::current();
    if !m.path().exists() {
        bail!("no service installed ({} does not exist): `sudo kubenet service install`", m.path().display());
    }
    run_all(&m.status_commands(), true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Spec {
        Spec {
            exe: "/usr/local/bin/kubenet".into(),
            config: Some("/home/ann/k8s lab/kubenet.toml".into()),
            state_dir: "/home/ann/k8s lab/.kubenet".into(),
            user: "ann".into(),
            uid: 1000,
            gid: 1000,
        }
    }

    #[test]
    fn systemd_words_are_quoted_and_escaped() {
        assert_eq!(systemd_word("/usr/bin/kubenet"), "/usr/bin/kubenet");
        assert_eq!(systemd_word("/home/ann/k8s lab"), "\"/home/ann/k8s lab\"");
        assert_eq!(systemd_word("50%$HOME"), "50%%$$HOME");
        assert_eq!(systemd_word("a\"b\\c d"), "\"a\\\"b\\\\c d\"");
        assert_eq!(systemd_word(""), "\"\"");
    }

    #[test]
    fn the_unit_runs_serve_for_the_user_with_notify_and_hardening() {
        let unit = systemd_unit(&spec());
        let line =
            |key: &str| unit.lines().find(|l| l.starts_with(&format!("{key}="))).unwrap_or_else(|| panic!("{key}"));
        assert_eq!(
            line("ExecStart"),
            "ExecStart=/usr/local/bin/kubenet --config \"/home/ann/k8s lab/kubenet.toml\" --dir \"/home/ann/k8s lab/.kubenet\" serve"
        );
        assert_eq!(line("Type"), "Type=notify");
        assert_eq!(line("Restart"), "Restart=on-failure");
        assert_eq!(line("KillMode"), "KillMode=process");
        assert_eq!(line("Environment"), "Environment=SUDO_USER=ann SUDO_UID=1000 SUDO_GID=1000");
        assert_eq!(line("ReadWritePaths"), "ReadWritePaths=\"/home/ann/k8s lab/.kubenet\"");
        assert_eq!(line("ProtectSystem"), "ProtectSystem=strict");
        let caps = line("CapabilityBoundingSet");
        for cap in ["CAP_NET_BIND_SERVICE", "CAP_NET_ADMIN", "CAP_SETUID", "CAP_KILL"] {
            assert!(caps.contains(cap), "{caps}");
        }
        assert!(!caps.contains("CAP_SYS_ADMIN"), "{caps}");
        assert!(!unit.contains("MemoryDenyWriteExecute"), "QEMU's TCG needs W+X memory");
    }

    #[test]
    fn the_plist_is_a_launchd_daemon_that_stays_up() {
        let text = launchd_plist(&spec());
        let v: plist::Value = plist::from_bytes(text.as_bytes()).unwrap();
        let d = v.as_dictionary().unwrap();
        assert_eq!(d["Label"].as_string(), Some(LABEL));
        let args: Vec<&str> =
            d["ProgramArguments"].as_array().unwrap().iter().map(|a| a.as_string().unwrap()).collect();
        assert_eq!(args, spec().argv());
        assert_eq!(args.last(), Some(&"serve"));
        assert_eq!(d["RunAtLoad"].as_boolean(), Some(true));
        assert_eq!(d["KeepAlive"].as_boolean(), Some(true));
        assert_eq!(d["StandardErrorPath"].as_string(), Some(LAUNCHD_LOG));
        let env = d["EnvironmentVariables"].as_dictionary().unwrap();
        assert_eq!(env["SUDO_UID"].as_string(), Some("1000"));
        assert_eq!(env["SUDO_USER"].as_string(), Some("ann"));
    }

    #[test]
    fn the_built_in_lab_needs_no_config_argument() {
        let s = Spec { config: None, ..spec() };
        assert_eq!(s.argv(), ["/usr/local/bin/kubenet", "--dir", "/home/ann/k8s lab/.kubenet", "serve"]);
    }

    #[test]
    fn manager_commands() {
        assert_eq!(Manager::Systemd.path(), Path::new("/etc/systemd/system/kubenet.service"));
        assert_eq!(Manager::Launchd.path(), Path::new("/Library/LaunchDaemons/dev.kubenet.serve.plist"));
        assert_eq!(Manager::Systemd.install_commands()[1], ["systemctl", "enable", "--now", "kubenet.service"]);
        assert_eq!(
            Manager::Launchd.install_commands()[1],
            ["launchctl", "bootstrap", "system", "/Library/LaunchDaemons/dev.kubenet.serve.plist"]
        );
        assert_eq!(Manager::Launchd.uninstall_commands().0[0], ["launchctl", "bootout", "system/dev.kubenet.serve"]);
    }
}
