//! `kubenet service install|uninstall|status`: `serve` as a boot-time service for the invoking
//! user's lab, as dnsmasq runs under `brew services` and socket_vmnet under launchd. Linux gets a
//! systemd unit (`Type=notify`: `serve` says READY once its ports are bound), macOS a launchd
//! daemon (RunAtLoad, KeepAlive, logs to a file). The unit, the property list and the manager
//! commands are data, built and tested anywhere; `run` writes the file and runs the commands.
//!
//! The service runs as root at every boot, so it runs nothing the lab's owner can replace
//! (issue 26, item 5): a kubenet binary whose path the owner (or anyone but root) could write,
//! anywhere along its chain of directories, is copied to [`LIBEXEC_BIN`] and the copy is run;
//! the lab definition it starts with is a root-owned copy, [`SERVICE_CONFIG`]. [`kubenet_vm::trust`]
//! judges a chain from stat results alone; [`plan`] turns what was found into what is run and
//! what is copied; `doctor` asks [`installed_problems`] about an installed service.
//!
//! `serve` never daemonizes itself: the manager keeps it, and `KillMode=process` (launchd does
//! the same by default for a daemon's children that left its process group) lets the VMs,
//! which QEMU daemonizes, outlive a restart of the agent, as they outlive `serve` in a terminal.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use kubenet_vm::trust::{Unsafe, chain, chain_verdict};
use serde::Serialize;

/// The service's name: `kubenet.service`, `dev.kubenet.serve`.
pub const UNIT: &str = "kubenet.service";
pub const LABEL: &str = "dev.kubenet.serve";

/// Where `service install` puts kubenet when the binary it ran from is not root's alone.
pub const LIBEXEC_BIN: &str = "/usr/local/libexec/kubenet/kubenet";
/// The root-owned copy of the lab definition the service starts with.
pub const SERVICE_CONFIG: &str = "/etc/kubenet/service.toml";

/// What the service runs, and for whom.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    /// The kubenet binary, absolute.
    pub exe: PathBuf,
    /// The lab definition, absolute; None: the built-in lab.
    pub config: Option<PathBuf>,
    /// The owner's own lab definition, when `config` is the root-owned copy of it.
    pub owner_config: Option<PathBuf>,
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
        // Started from root's copy; reloaded from the owner's file, which can change only what
        // a reload may (crate::agent::reload::served).
        if let Some(own) = self.owner_config.as_ref().filter(|own| self.config.as_ref() != Some(*own)) {
            v.extend(["--reload-from".into(), own.display().to_string()]);
        }
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
{copied}[Unit]
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
        copied = match &spec.owner_config {
            Some(owner) => format!(
                "# The lab definition it starts with is a root-owned copy of {} made at install time:\n\
                 # install again to take up changes to the network; reloads read the owner's file for the rest.\n",
                owner.display()
            ),
            None => String::new(),
        },
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
    let (uid, gid) = crate::agent::control::owner();
    let user = match std::env::var("SUDO_USER") {
        Ok(u) if !u.is_empty() => u,
        _ => nix::unistd::User::from_uid(uid.into())
            .ok()
            .flatten()
            .map(|u| u.name)
            .with_context(|| format!("no user name for uid {uid}"))?,
    };
    let state_dir = std::path::absolute(state_dir).context("cannot tell the state directory's path")?;
    let spec = Spec { exe, config, owner_config: None, state_dir, user, uid, gid };
    spec.check_words()?;
    Ok(spec)
}

impl Spec {
    /// Every path and name the unit or plist carries is one line of printable text: a newline
    /// in a folder's name would otherwise write lines of its own into a unit that root runs at
    /// every boot (an `ExecStartPre=`), whatever the quoting.
    fn check_words(&self) -> anyhow::Result<()> {
        let paths = [Some(&self.exe), self.config.as_ref(), self.owner_config.as_ref(), Some(&self.state_dir)];
        let words = paths.into_iter().flatten().map(|p| p.to_string_lossy().into_owned()).chain([self.user.clone()]);
        for w in words {
            if w.chars().any(char::is_control) {
                bail!("{w:?} has a control character (a newline?): the service cannot name it; rename it first");
            }
        }
        Ok(())
    }
}

/// One file `service install` copies into root's keeping before the service may run it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Copy {
    pub from: PathBuf,
    pub to: PathBuf,
    pub mode: u32,
    /// Why, for the user.
    pub why: String,
}

/// What `service install` does: the service as it will run, and the copies that takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Install {
    pub spec: Spec,
    pub copies: Vec<Copy>,
}

/// The service for `found` (this binary, the owner's lab definition) given the verdict on the
/// binary's chain: a binary only root can change is run where it is, any other is copied to
/// [`LIBEXEC_BIN`]; the lab definition is always copied to [`SERVICE_CONFIG`], so that the
/// network the root service starts with is fixed at install time.
pub fn plan(found: Spec, exe_chain: Result<(), Unsafe>) -> Install {
    let mut spec = found.clone();
    let mut copies = Vec::new();
    if let Err(why) = exe_chain {
        spec.exe = LIBEXEC_BIN.into();
        copies.push(Copy {
            from: found.exe.clone(),
            to: LIBEXEC_BIN.into(),
            mode: 0o755,
            why: format!(
                "{why}: the service runs a root-owned copy, {LIBEXEC_BIN} (install the service again after upgrading kubenet)"
            ),
        });
    }
    if let Some(owner) = &found.config {
        spec.config = Some(SERVICE_CONFIG.into());
        spec.owner_config = Some(owner.clone());
        copies.push(Copy {
            from: owner.clone(),
            to: SERVICE_CONFIG.into(),
            mode: 0o644,
            why: format!(
                "the service starts from a root-owned copy of {}, {SERVICE_CONFIG} (install again to change its network)",
                owner.display()
            ),
        });
    }
    Install { spec, copies }
}

/// The words of a systemd command line as [`systemd_word`] writes them.
pub fn systemd_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let Some(&first) = chars.peek() else { break };
        let mut w = String::new();
        if first == '"' {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => w.extend(chars.next()),
                    '"' => break,
                    c => w.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                w.push(c);
            }
        }
        words.push(w.replace("%%", "%").replace("$$", "$"));
    }
    words
}

/// The command line of an installed service's file.
pub fn installed_argv(m: Manager, text: &str) -> Option<Vec<String>> {
    match m {
        Manager::Systemd => text.lines().find_map(|l| l.strip_prefix("ExecStart=")).map(systemd_words),
        Manager::Launchd => {
            let v: plist::Value = plist::from_bytes(text.as_bytes()).ok()?;
            let args = v.as_dictionary()?.get("ProgramArguments")?.as_array()?;
            args.iter().map(|a| a.as_string().map(str::to_owned)).collect()
        }
    }
}

/// What the service an argv runs trusts: its binary and the `--config` it reads.
pub fn trusted_paths(argv: &[String]) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = argv.first().map(PathBuf::from).into_iter().collect();
    out.extend(argv.windows(2).filter(|w| w[0] == "--config").map(|w| PathBuf::from(&w[1])));
    out
}

/// The installed service's binary and lab definition, each that someone other than root could
/// replace, and why. None: no service is installed.
pub fn installed_problems() -> Option<Vec<String>> {
    let m = Manager::current();
    let text = std::fs::read_to_string(m.path()).ok()?;
    let Some(argv) = installed_argv(m, &text) else {
        return Some(vec![format!("{} has no command line kubenet can read", m.path().display())]);
    };
    Some(
        trusted_paths(&argv)
            .iter()
            .filter_map(|p| chain(p).and_then(|c| chain_verdict(&c)).err())
            .map(|e| e.to_string())
            .collect(),
    )
}

/// Writes one copy: the directories above it made (root's, as root makes them; its own 0755), the file written whole
/// under a temporary name and renamed, then its chain checked as the service will rely on it.
fn copy(c: &Copy, from: &mut dyn std::io::Read) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let dir = c.to.parent().context("a copy's destination has a folder")?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    // kubenet's own folder (…/libexec/kubenet, /etc/kubenet): 0755 whatever the umask.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    kubenet_cluster::state::write_atomic_with(&c.to, c.mode, |w| std::io::copy(from, w).map(|_| ()))
        .with_context(|| format!("cannot write {}", c.to.display()))?;
    std::fs::set_permissions(&c.to, std::fs::Permissions::from_mode(c.mode))?;
    chain(&c.to)
        .and_then(|ch| chain_verdict(&ch))
        .with_context(|| format!("{} is not root's alone after copying: the service would not be safe", c.to.display()))
}

/// The most a lab definition may hold.
const MAX_CONFIG: u64 = 1 << 20;

/// The owner's lab definition, read by root only if the owner could read it anyway: the file
/// itself, not a link (O_NOFOLLOW), a regular file (not a FIFO or device: O_NONBLOCK keeps the
/// open from waiting), theirs or readable by everyone, and at most [`MAX_CONFIG`] bytes. A
/// link to /etc/shadow thus never becomes a world-readable copy.
fn read_owner_file(path: &Path, owner: u32) -> anyhow::Result<String> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("cannot open {} (a symbolic link is not followed)", path.display()))?;
    let m = f.metadata()?;
    if !m.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    if m.uid() != owner && m.mode() & 0o004 == 0 {
        bail!(
            "{} is neither yours nor readable by everyone: the service copies only what you can read",
            path.display()
        );
    }
    if m.len() > MAX_CONFIG {
        bail!("{} is larger than {MAX_CONFIG} bytes: not a lab definition", path.display());
    }
    let mut text = String::new();
    f.take(MAX_CONFIG).read_to_string(&mut text).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(text)
}

/// Carries out `copies`: the binary from the running process's own executable (the one root
/// already trusted by running it, not a path the owner could change meanwhile), the lab
/// definition from text read with [`read_owner_file`] and checked to load where the copy goes.
fn carry_out(copies: &[Copy], owner: u32, out: &mut impl Write) -> anyhow::Result<()> {
    for c in copies {
        if c.to == Path::new(LIBEXEC_BIN) {
            let own =
                if Path::new("/proc/self/exe").exists() { PathBuf::from("/proc/self/exe") } else { c.from.clone() };
            let mut f = std::fs::File::open(&own).with_context(|| format!("cannot read {}", c.from.display()))?;
            copy(c, &mut f)?;
        } else {
            let text = read_owner_file(&c.from, owner)?;
            // Relative paths in the lab (the login key) are taken from the file's folder: the
            // copy must still load, and name the same files, where it goes.
            let base = c.to.parent().unwrap_or(Path::new("/"));
            kubenet_cluster::parse(&text, kubenet_cluster::Source::File(c.from.clone()), base).with_context(|| {
                format!(
                    "the service's copy in {} would not load (make relative paths in the lab definition absolute)",
                    base.display()
                )
            })?;
            copy(c, &mut text.as_bytes())?;
        }
        writeln!(out, "copied {} to {}: {}", c.from.display(), c.to.display(), c.why)?;
    }
    Ok(())
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
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "{what} writes {} and needs root: `sudo kubenet service {what}` (or --print to see the file)",
            Manager::current().path().display()
        );
    }
    Ok(())
}

/// `kubenet service install [--print [--manager M]]`: `found` is this binary and the owner's
/// lab definition; the service runs what [`plan`] makes of them.
pub fn install(found: &Spec, print: bool, m: Manager, out: &mut impl Write) -> anyhow::Result<()> {
    let exe_chain = chain(&found.exe).and_then(|c| chain_verdict(&c));
    let Install { spec, copies } = plan(found.clone(), exe_chain);
    let spec = &spec;
    let text = m.render(spec);
    if print {
        for c in &copies {
            eprintln!("install would copy {} to {}: {}", c.from.display(), c.to.display(), c.why);
        }
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
    carry_out(&copies, spec.uid, out)?;
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
    // The copies install made are kubenet's own and serve nothing else.
    for copy in [LIBEXEC_BIN, SERVICE_CONFIG] {
        match std::fs::remove_file(copy) {
            Ok(()) => writeln!(out, "removed {copy}")?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => writeln!(out, "cannot remove {copy}: {e}")?,
        }
    }
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
            owner_config: None,
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

    #[test]
    fn a_newline_in_a_path_is_refused_not_written_into_the_unit() {
        assert!(spec().check_words().is_ok());
        let evil = Spec {
            config: Some("/home/ann/lab\n[Service]\nExecStartPre=/tmp/evil.sh\n#/kubenet.toml".into()),
            ..spec()
        };
        let e = evil.check_words().unwrap_err().to_string();
        assert!(e.contains("has a control character"), "{e}");
        let tab = Spec { user: "ann\tx".into(), ..spec() };
        assert!(tab.check_words().is_err());
    }

    #[test]
    fn the_plan_copies_what_others_could_replace_and_always_the_lab() {
        let found = Spec { exe: "/home/ann/.cargo/bin/kubenet".into(), ..spec() };
        let owned = Unsafe::Owner { path: "/home/ann/.cargo/bin".into(), uid: 1000 };
        let Install { spec: s, copies } = plan(found.clone(), Err(owned));
        assert_eq!(s.exe, Path::new(LIBEXEC_BIN));
        assert_eq!(s.config.as_deref(), Some(Path::new(SERVICE_CONFIG)));
        assert_eq!(s.owner_config, found.config);
        let to: Vec<(&Path, &Path, u32)> = copies.iter().map(|c| (c.from.as_path(), c.to.as_path(), c.mode)).collect();
        assert_eq!(
            to,
            [
                (Path::new("/home/ann/.cargo/bin/kubenet"), Path::new(LIBEXEC_BIN), 0o755),
                (Path::new("/home/ann/k8s lab/kubenet.toml"), Path::new(SERVICE_CONFIG), 0o644)
            ]
        );
        assert!(copies[0].why.starts_with("/home/ann/.cargo/bin belongs to uid 1000, not root: the service runs"));
        let unit = systemd_unit(&s);
        assert!(
            unit.contains(
                "\nExecStart=/usr/local/libexec/kubenet/kubenet --config /etc/kubenet/service.toml --dir \"/home/ann/k8s lab/.kubenet\" serve --reload-from \"/home/ann/k8s lab/kubenet.toml\"\n"
            ),
            "{unit}"
        );
        assert!(
            unit.contains("# The lab definition it starts with is a root-owned copy of /home/ann/k8s lab/kubenet.toml made at install time:\n"),
            "{unit}"
        );
        assert_eq!(launchd_plist(&s).matches("/usr/local/libexec/kubenet/kubenet").count(), 1);

        // A binary only root can change runs where it is; the built-in lab has nothing to copy.
        let found = Spec { exe: "/usr/bin/kubenet".into(), config: None, ..spec() };
        let i = plan(found.clone(), Ok(()));
        assert_eq!(i, Install { spec: found, copies: vec![] });
    }

    #[test]
    fn an_installed_command_line_reads_back() {
        let s = plan(spec(), Ok(())).spec;
        for m in [Manager::Systemd, Manager::Launchd] {
            let argv = installed_argv(m, &m.render(&s)).unwrap();
            assert_eq!(argv, s.argv(), "{m:?}");
            assert_eq!(trusted_paths(&argv), [PathBuf::from("/usr/local/bin/kubenet"), PathBuf::from(SERVICE_CONFIG)]);
        }
        for word in ["/usr/bin/kubenet", "/home/ann/k8s lab", "50%$HOME", "a\"b\\c d", ""] {
            assert_eq!(systemd_words(&format!(" {} x ", systemd_word(word))), [word, "x"], "{word}");
        }
        assert_eq!(installed_argv(Manager::Systemd, "[Service]\nType=notify\n"), None);
        assert_eq!(installed_argv(Manager::Launchd, "not a plist"), None);
    }

    #[test]
    fn the_owners_file_is_copied_only_if_they_could_read_it() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mine = d.join("lab.toml");
        std::fs::write(&mine, "x = 1\n").unwrap();
        let me = nix::unistd::geteuid().as_raw();
        assert_eq!(read_owner_file(&mine, me).unwrap(), "x = 1\n");
        // Someone else's and not world-readable: as if root followed the owner to a secret.
        std::fs::set_permissions(&mine, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = read_owner_file(&mine, me + 1).unwrap_err().to_string();
        assert!(err.contains("neither yours nor readable by everyone"), "{err}");
        std::fs::set_permissions(&mine, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read_owner_file(&mine, me + 1).is_ok(), "world-readable");
        let link = d.join("link.toml");
        std::os::unix::fs::symlink(&mine, &link).unwrap();
        assert!(read_owner_file(&link, me).unwrap_err().to_string().contains("symbolic link is not followed"));
        let fifo = d.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        assert!(read_owner_file(&fifo, me).unwrap_err().to_string().contains("not a regular file"));
        std::fs::write(&mine, vec![b'#'; (MAX_CONFIG + 1) as usize]).unwrap();
        assert!(read_owner_file(&mine, me).unwrap_err().to_string().contains("larger than"));
    }

    #[test]
    fn a_copy_is_whole_with_its_mode_and_checked_where_it_lands() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let to = dir.path().join("libexec/kubenet/kubenet");
        let c = Copy { from: "/x".into(), to: to.clone(), mode: 0o755, why: String::new() };
        let result = copy(&c, &mut &b"\x7fELF..."[..]);
        assert_eq!(std::fs::read(&to).unwrap(), b"\x7fELF...");
        assert_eq!(std::fs::metadata(&to).unwrap().permissions().mode() & 0o7777, 0o755);
        assert_eq!(std::fs::metadata(to.parent().unwrap()).unwrap().permissions().mode() & 0o777, 0o755);
        if nix::unistd::geteuid().is_root() {
            result.unwrap();
        } else {
            // Not root: the copy is this user's, and so not safe for a root service.
            assert!(format!("{:#}", result.unwrap_err()).contains("not root"));
        }
    }
}
