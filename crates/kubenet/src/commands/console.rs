//! `kubenet console NAME`: the VM's serial console on this terminal, through the socket QEMU
//! listens on. The terminal goes raw while attached; Ctrl-] detaches (as telnet and virsh).
//! Without a terminal it relays standard input until its end, which scripts and tests use.

use std::io::{IsTerminal, Read, Write};
use std::os::unix::net::UnixStream;

use anyhow::Context;
use kubenet_cluster::Lab;
use kubenet_vm::VmFiles;

/// Ctrl-].
const DETACH: u8 = 0x1d;

pub fn attach(lab: &Lab, name: &str) -> anyhow::Result<()> {
    let vm = lab.select(&[name.to_owned()]).map_err(crate::cli::unknown_vm)?[0];
    let files = VmFiles::new(lab, vm);
    crate::commands::lifecycle::require_running(lab, vm)?;
    let path = files.serial_socket();
    let sock = UnixStream::connect(&path).with_context(|| format!("cannot attach to {}", path.display()))?;
    let tty = std::io::stdin().is_terminal();
    let _raw = if tty {
        eprintln!("connected to {}'s console; Ctrl-] detaches (press Enter for a prompt)\r", vm.name);
        Some(RawMode::enter()?)
    } else {
        None
    };
    let mut from_vm = sock.try_clone()?;
    std::thread::spawn(move || {
        let mut out = std::io::stdout();
        let mut buf = [0u8; 4096];
        while let Ok(n) = from_vm.read(&mut buf) {
            if n == 0 || out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
                break;
            }
        }
    });
    let mut to_vm = sock;
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 1024];
    loop {
        let n = stdin.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        if tty && let Some(i) = chunk.iter().position(|b| *b == DETACH) {
            to_vm.write_all(&chunk[..i])?;
            break;
        }
        to_vm.write_all(chunk)?;
    }
    if tty {
        eprintln!("\r\ndetached from {}\r", vm.name);
    }
    Ok(())
}

/// The terminal in raw mode until dropped.
struct RawMode(nix::sys::termios::Termios);

impl RawMode {
    fn enter() -> anyhow::Result<RawMode> {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).context("reading the terminal's settings")?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).context("setting the terminal raw")?;
        Ok(RawMode(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(std::io::stdin(), nix::sys::termios::SetArg::TCSANOW, &self.0);
    }
}
