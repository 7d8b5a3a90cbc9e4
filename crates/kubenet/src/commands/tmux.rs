//! `kubenet tmux [SESSION]`: the tutorial's tmux layout. A `qemu` window with one pane per VM
//! on its serial console, then one `ssh-...` window per role (ssh-gateway, ssh-controls,
//! ssh-workers for the reference lab) with a pane per VM logged in and the panes synchronized,
//! so what is typed goes to every VM of the role. The layout is a list of tmux commands built as
//! data ([`plan`]), so it is tested without a terminal; [`run`] feeds them to tmux.

use std::ffi::OsString;
use std::io::Write;
use std::process::Command;

use anyhow::{Context, bail};
use kubenet_cluster::Lab;
use kubenet_vm::qemu::shell_line;

/// One window of the layout: its name, the shell command of each pane, whether typing goes to
/// every pane.
#[derive(Debug, PartialEq, Eq)]
pub struct Window {
    pub name: String,
    pub panes: Vec<String>,
    pub synchronized: bool,
}

/// The windows for `lab`. `kubenet` is how a pane runs kubenet (the binary and the options
/// naming this lab), so panes work whatever directory or environment tmux gives them.
pub fn windows(lab: &Lab, kubenet: &[OsString]) -> Vec<Window> {
    let run = |args: &[&str]| {
        let mut argv = kubenet.to_vec();
        argv.extend(args.iter().map(OsString::from));
        shell_line(&argv)
    };
    let mut out = vec![Window {
        name: "qemu".into(),
        panes: lab.vms.iter().map(|vm| run(&["console", &vm.name])).collect(),
        synchronized: false,
    }];
    let mut roles: Vec<&str> = Vec::new();
    for vm in &lab.vms {
        if !roles.contains(&vm.role.as_str()) {
            roles.push(&vm.role);
        }
    }
    for role in roles {
        let vms: Vec<&str> = lab.vms.iter().filter(|v| v.role == role).map(|v| v.name.as_str()).collect();
        // ssh-gateway for one VM, ssh-controls / ssh-workers for several, as the tutorial named them.
        let name = if vms.len() == 1 { format!("ssh-{role}") } else { format!("ssh-{role}s") };
        let panes = vms.iter().map(|name| run(&["ssh", name])).collect();
        out.push(Window { name, panes, synchronized: vms.len() > 1 });
    }
    out
}

/// The tmux commands (arguments after `tmux`) that build `windows` as a detached `session`.
/// Every window is tiled after each split, so seven panes fit a detached 80x24 session; panes
/// stay open when their command ends (a VM not running yet), showing why, until closed.
pub fn plan(session: &str, windows: &[Window]) -> Vec<Vec<String>> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let mut cmds = Vec::new();
    for (i, w) in windows.iter().enumerate() {
        let target = format!("{session}:{}", w.name);
        for (p, pane) in w.panes.iter().enumerate() {
            match (i, p) {
                (0, 0) => {
                    cmds.push(s(&["new-session", "-d", "-s", session, "-n", &w.name, "-x", "200", "-y", "50", pane]))
                }
                (_, 0) => cmds.push(s(&["new-window", "-d", "-t", &format!("{session}:"), "-n", &w.name, pane])),
                _ => {
                    // Not -d: the new pane becomes the active one and the next split follows it,
                    // so panes stay in lab order.
                    cmds.push(s(&["split-window", "-t", &target, pane]));
                    cmds.push(s(&["select-layout", "-t", &target, "tiled"]));
                }
            }
            if p == 0 {
                cmds.push(s(&["set-option", "-w", "-t", &target, "remain-on-exit", "on"]));
            }
        }
        if w.synchronized {
            cmds.push(s(&["set-option", "-w", "-t", &target, "synchronize-panes", "on"]));
        }
        if w.panes.len() > 1 {
            cmds.push(s(&["select-pane", "-t", &format!("{target}.{{top-left}}")]));
        }
    }
    if let Some(first) = windows.first() {
        cmds.push(s(&["select-window", "-t", &format!("{session}:{}", first.name)]));
    }
    cmds
}

fn tmux(args: &[String]) -> anyhow::Result<std::process::Output> {
    Command::new("tmux").args(args).output().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            anyhow::anyhow!("tmux is not installed (apt install tmux / brew install tmux)")
        }
        _ => anyhow::Error::new(e).context("cannot run tmux"),
    })
}

/// Builds the session (unless it exists) and attaches to it when on a terminal: `switch-client`
/// inside tmux, `attach` outside; otherwise prints how to.
pub fn run(lab: &Lab, session: &str, kubenet: &[OsString], out: &mut impl Write) -> anyhow::Result<()> {
    let exists = tmux(&["has-session".into(), "-t".into(), format!("={session}")])?.status.success();
    if exists {
        writeln!(
            out,
            "tmux session {session} exists; attaching to it as it is (`tmux kill-session -t {session}` to rebuild)"
        )?;
    } else {
        // A pane per VM twice over, each with nothing to show: say so instead.
        let running = lab
            .vms
            .iter()
            .filter(|vm| kubenet_vm::process::running(&kubenet_vm::VmFiles::new(lab, vm)).is_some())
            .count();
        if running == 0 {
            let what = if kubenet_vm::LabFiles::new(lab).ssh_config().exists() {
                "no VM of the lab is running"
            } else {
                "nothing of the lab is set up yet"
            };
            bail!(
                "{what}: the layout would be {} panes with nothing in them; start the lab with `kubenet up`, then `kubenet tmux`",
                lab.vms.len() * 2
            );
        }
        // One tmux invocation, commands separated by ";": the server runs them all before it
        // notices a pane's command ending, so remain-on-exit is set before any pane can close.
        let plan = plan(session, &windows(lab, kubenet));
        let argv: Vec<String> = plan.join(&[";".to_owned()][..]);
        let o = tmux(&argv)?;
        if !o.status.success() {
            bail!("tmux could not build the session: {}", String::from_utf8_lossy(&o.stderr).trim());
        }
        writeln!(out, "tmux session {session}: qemu (consoles), then ssh windows by role")?;
    }
    use std::io::IsTerminal;
    let inside = std::env::var_os("TMUX").is_some();
    if !std::io::stdin().is_terminal() || !std::io::stdout().is_terminal() {
        writeln!(out, "not on a terminal: attach with `tmux attach -t {session}`")?;
        return Ok(());
    }
    let verb = if inside { "switch-client" } else { "attach-session" };
    let status = Command::new("tmux").args([verb, "-t", session]).status().context("cannot run tmux")?;
    if !status.success() {
        bail!("tmux {verb} -t {session} failed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lab() -> Lab {
        kubenet_cluster::parse(
            kubenet_cluster::REFERENCE_CONFIG,
            kubenet_cluster::Source::Embedded,
            std::path::Path::new("/lab"),
        )
        .unwrap()
    }

    #[test]
    fn the_reference_lab_gets_the_tutorials_windows() {
        let kubenet = ["/usr/bin/kubenet", "--dir", "/my lab"].map(OsString::from);
        let w = windows(&lab(), &kubenet);
        let names: Vec<&str> = w.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, ["qemu", "ssh-gateway", "ssh-controls", "ssh-workers"]);
        assert_eq!(w[0].panes.len(), 7);
        assert_eq!(w[0].panes[4], "/usr/bin/kubenet --dir '/my lab' console worker0");
        assert_eq!(
            w[2].panes,
            ["control0", "control1", "control2"].map(|n| format!("/usr/bin/kubenet --dir '/my lab' ssh {n}"))
        );
        assert_eq!(w.iter().map(|w| w.synchronized).collect::<Vec<_>>(), [false, false, true, true]);
    }

    #[test]
    fn the_plan_makes_one_session_and_splits_each_window() {
        let w = vec![
            Window { name: "qemu".into(), panes: vec!["a".into(), "b".into()], synchronized: false },
            Window { name: "ssh-x".into(), panes: vec!["c".into()], synchronized: true },
        ];
        let plan = plan("lab", &w);
        let verbs: Vec<&str> = plan.iter().map(|c| c[0].as_str()).collect();
        assert_eq!(
            verbs,
            [
                "new-session",
                "set-option",
                "split-window",
                "select-layout",
                "select-pane",
                "new-window",
                "set-option",
                "set-option",
                "select-window"
            ]
        );
        assert_eq!(plan[0][..4], ["new-session", "-d", "-s", "lab"]);
        assert_eq!(plan[0].last().unwrap(), "a");
        assert_eq!(plan[2], ["split-window", "-t", "lab:qemu", "b"]);
        assert_eq!(plan[4], ["select-pane", "-t", "lab:qemu.{top-left}"]);
        assert_eq!(plan[7], ["set-option", "-w", "-t", "lab:ssh-x", "synchronize-panes", "on"]);
    }
}
