//! `kubenet cp SRC... DEST`: files between this host and one VM or many, with scp's `VM:path`
//! syntax, where the VM part may be a glob or a role (`'control*:'`, `@worker:/var/log/syslog`).
//!
//! The copy is OpenSSH's `scp` (SFTP protocol since OpenSSH 9), one per VM, run in parallel
//! with the lab's ssh_config, as `kubenet ssh` is: strict host keys and the lab key, nothing
//! for kubenet to keep in step with the user's SSH setup, and a program every user has. `-p`
//! keeps modes, `-r` copies directories. From several VMs (or a glob or a role), each VM's files
//! go into a folder of its own under DEST (`logs/worker0/syslog`), so none overwrites another.
//! [`plan`] turns the operands into one scp argv per VM and is pure; [`cp`] runs them.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::bail;
use kubenet_cluster::{Lab, Vm};
use kubenet_vm::VmFiles;

use super::ssh::{Label, Outcome, colour_on, lab_ssh_config, run_labelled, summary};

/// One operand: a path on this host, or a path on the VMs a target names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Operand {
    Local(PathBuf),
    Remote { target: String, path: String },
}

/// scp's rule: `X:path` is remote when X is not empty and holds no `/` (so `./a:b` and
/// `/tmp/a:b` are local files).
pub fn operand(s: &str) -> Operand {
    match s.split_once(':') {
        Some((target, path)) if !target.is_empty() && !target.contains('/') => {
            Operand::Remote { target: target.to_owned(), path: path.to_owned() }
        }
        _ => Operand::Local(PathBuf::from(s)),
    }
}

/// One scp run: its VM, and its operands after the options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Copy<'a> {
    pub vm: &'a Vm,
    pub operands: Vec<OsString>,
    /// The per-VM folder to create first (copies from several VMs).
    pub make_dir: Option<PathBuf>,
}

/// The copies `kubenet cp SOURCES DEST` makes, one per VM, in lab order.
pub fn plan<'a>(lab: &'a Lab, sources: &[String], dest: &str) -> anyhow::Result<Vec<Copy<'a>>> {
    let sources: Vec<Operand> = sources.iter().map(|s| operand(s)).collect();
    let select = |target: &str| lab.targets(&[target.to_owned()]).map_err(crate::cli::unknown_vm);
    let remote = |vm: &Vm, path: &str| OsString::from(format!("{}:{path}", vm.name));
    match operand(dest) {
        Operand::Remote { target, path } => {
            if let Some(Operand::Remote { .. }) = sources.iter().find(|s| matches!(s, Operand::Remote { .. })) {
                bail!(crate::cli::Usage(
                    "copy between this host and VMs: a VM-to-VM copy goes through this host in two steps".into()
                ));
            }
            let locals: Vec<OsString> = sources
                .iter()
                .map(|s| match s {
                    Operand::Local(p) => p.clone().into_os_string(),
                    Operand::Remote { .. } => unreachable!("refused above"),
                })
                .collect();
            Ok(select(&target)?
                .into_iter()
                .map(|vm| {
                    let mut operands = locals.clone();
                    operands.push(remote(vm, &path));
                    Copy { vm, operands, make_dir: None }
                })
                .collect())
        }
        Operand::Local(dest) => {
            let mut wanted: Vec<(&Vm, String)> = Vec::new();
            let mut by_pattern = false;
            for source in &sources {
                let Operand::Remote { target, path } = source else {
                    bail!(crate::cli::Usage(format!(
                        "`{}` and `{}` are both on this host: name a VM as `VM:path` on one side",
                        match source {
                            Operand::Local(p) => p.display().to_string(),
                            Operand::Remote { .. } => unreachable!(),
                        },
                        dest.display()
                    )));
                };
                by_pattern |= lab.vm_by_name(target).is_none();
                for vm in select(target)? {
                    wanted.push((vm, path.clone()));
                }
            }
            let vms: Vec<&Vm> = lab.vms.iter().filter(|vm| wanted.iter().any(|(w, _)| w.name == vm.name)).collect();
            let apart = by_pattern || vms.len() > 1;
            Ok(vms
                .into_iter()
                .map(|vm| {
                    let mut operands: Vec<OsString> =
                        wanted.iter().filter(|(w, _)| w.name == vm.name).map(|(_, p)| remote(vm, p)).collect();
                    let into = if apart { dest.join(&vm.name) } else { dest.clone() };
                    // A trailing slash: scp wants the folder to be one.
                    let mut into = into.into_os_string();
                    if apart {
                        into.push("/");
                    }
                    operands.push(into);
                    Copy { vm, operands, make_dir: apart.then(|| dest.join(&vm.name)) }
                })
                .collect())
        }
    }
}

/// The scp options of every copy: the lab's config, no prompt, modes kept.
fn scp_args(config: &Path, recursive: bool, quiet: bool) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["-F".into(), config.into(), "-B".into(), "-p".into()];
    args.extend(["-o".into(), "ConnectTimeout=10".into()]);
    if recursive {
        args.push("-r".into());
    }
    if quiet {
        args.push("-q".into());
    }
    args
}

/// What `kubenet cp` was asked.
pub struct Request<'a> {
    pub sources: &'a [String],
    pub dest: &'a str,
    pub recursive: bool,
    pub timeout: Option<Duration>,
}

/// `kubenet cp`.
pub fn cp(lab: &Lab, req: &Request) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let copies = plan(lab, req.sources, req.dest)?;
    let config = lab_ssh_config(lab)?;
    for copy in &copies {
        if let Some(dir) = &copy.make_dir {
            std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
        }
    }
    // One VM on a terminal: scp's own progress meter, bytes and rate, on the terminal.
    if let [copy] = copies.as_slice()
        && std::io::stdout().is_terminal()
        && req.timeout.is_none()
    {
        super::lifecycle::require_running(lab, copy.vm)?;
        let status = std::process::Command::new("scp")
            .args(scp_args(&config, req.recursive, false))
            .arg("--")
            .args(&copy.operands)
            .status()
            .map_err(|e| anyhow::anyhow!("cannot run scp: {e}"))?;
        if !status.success() {
            bail!("scp for {} failed ({status})", copy.vm.name);
        }
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let outcomes = rt.block_on(run_all(lab, &copies, &config, req));
    let names: Vec<&str> = copies.iter().map(|c| c.vm.name.as_str()).collect();
    match summary(&names, &outcomes) {
        None => Ok(()),
        Some(text) => Err(anyhow::anyhow!(text)),
    }
}

/// Every copy at once; on a terminal, after a second, a bar of the VMs done.
async fn run_all(lab: &Lab, copies: &[Copy<'_>], config: &Path, req: &Request<'_>) -> Vec<Outcome> {
    use std::io::IsTerminal;
    let width = copies.iter().map(|c| c.vm.name.len()).max().unwrap_or(0);
    let colours = (colour_on(std::io::stdout().is_terminal()), colour_on(std::io::stderr().is_terminal()));
    let bar = indicatif::ProgressBar::hidden();
    bar.set_length(copies.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("copying {bar:30} {pos}/{len} VMs done, {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let show = async {
        if std::io::stderr().is_terminal() {
            tokio::time::sleep(Duration::from_secs(1)).await;
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            bar.enable_steady_tick(Duration::from_millis(200));
        }
        std::future::pending::<()>().await
    };
    let work = futures_util::future::join_all(copies.iter().map(|copy| {
        let label = Label::of(lab, copy.vm, width);
        let bar = &bar;
        async move {
            if kubenet_vm::process::running(&VmFiles::new(lab, copy.vm)).is_none() {
                return Outcome::NotRunning;
            }
            let mut scp = tokio::process::Command::new("scp");
            // `--`: a file named like an option (`-oProxyCommand=...`) stays a file.
            scp.args(scp_args(config, req.recursive, true)).arg("--").args(&copy.operands);
            let outcome = run_labelled(scp, &label, colours, req.timeout).await;
            bar.inc(1);
            outcome
        }
    }));
    let outcomes = tokio::select! {
        outcomes = work => outcomes,
        () = show => unreachable!("show never ends"),
    };
    bar.finish_and_clear();
    outcomes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lab() -> Lab {
        kubenet_cluster::load(&kubenet_cluster::Choice::Embedded, Path::new("/lab")).unwrap()
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn argv(copies: &[Copy]) -> Vec<(String, Vec<String>, Option<PathBuf>)> {
        copies
            .iter()
            .map(|c| {
                (
                    c.vm.name.clone(),
                    c.operands.iter().map(|o| o.to_string_lossy().into_owned()).collect(),
                    c.make_dir.clone(),
                )
            })
            .collect()
    }

    #[test]
    fn operands_are_remote_as_scp_reads_them() {
        assert_eq!(
            operand("worker0:/etc/hosts"),
            Operand::Remote { target: "worker0".into(), path: "/etc/hosts".into() }
        );
        assert_eq!(operand("control*:"), Operand::Remote { target: "control*".into(), path: "".into() });
        assert_eq!(operand("@worker:a:b"), Operand::Remote { target: "@worker".into(), path: "a:b".into() });
        assert_eq!(operand("./a:b"), Operand::Local("./a:b".into()));
        assert_eq!(operand("/tmp/x:y"), Operand::Local("/tmp/x:y".into()));
        assert_eq!(operand(":x"), Operand::Local(":x".into()));
        assert_eq!(operand("ca.pem"), Operand::Local("ca.pem".into()));
    }

    #[test]
    fn to_many_vms_one_copy_each() {
        let lab = lab();
        let copies = plan(&lab, &strings(&["ca.pem", "ca-key.pem"]), "control*:").unwrap();
        assert_eq!(
            argv(&copies),
            ["control0", "control1", "control2"].map(|n| (
                n.to_string(),
                strings(&["ca.pem", "ca-key.pem", &format!("{n}:")]),
                None
            ))
        );
    }

    #[test]
    fn from_many_vms_into_a_folder_each() {
        let lab = lab();
        let copies = plan(&lab, &strings(&["@worker:/var/log/syslog"]), "logs").unwrap();
        assert_eq!(
            argv(&copies),
            ["worker0", "worker1", "worker2"].map(|n| (
                n.to_string(),
                strings(&[&format!("{n}:/var/log/syslog"), &format!("logs/{n}/")]),
                Some(PathBuf::from(format!("logs/{n}")))
            ))
        );
        // One VM by name: as scp, into DEST itself.
        let copies = plan(&lab, &strings(&["worker0:/etc/kubernetes/kubelet.conf"]), ".").unwrap();
        assert_eq!(
            argv(&copies),
            [("worker0".to_string(), strings(&["worker0:/etc/kubernetes/kubelet.conf", "."]), None)]
        );
        // Two sources from two VMs: each VM's own files into its folder.
        let copies = plan(&lab, &strings(&["worker0:a", "gateway:b", "worker0:c"]), "out").unwrap();
        assert_eq!(
            argv(&copies),
            [
                ("gateway".to_string(), strings(&["gateway:b", "out/gateway/"]), Some(PathBuf::from("out/gateway"))),
                (
                    "worker0".to_string(),
                    strings(&["worker0:a", "worker0:c", "out/worker0/"]),
                    Some(PathBuf::from("out/worker0"))
                ),
            ]
        );
    }

    #[test]
    fn copies_it_cannot_make_are_usage_errors() {
        let lab = lab();
        let err = |s: &[&str], d| plan(&lab, &strings(s), d).unwrap_err().to_string();
        assert!(err(&["a"], "b").contains("both on this host"), "{}", err(&["a"], "b"));
        assert!(err(&["worker0:a"], "worker1:").starts_with("copy between this host and VMs"));
        assert!(err(&["a"], "db*:").starts_with("`db*` matches no VM"));
        assert!(err(&["worker9:a"], ".").starts_with("no VM named `worker9`"));
        assert!(plan(&lab, &strings(&["a"]), "db0:").unwrap_err().downcast_ref::<crate::cli::Usage>().is_some());
    }
}
