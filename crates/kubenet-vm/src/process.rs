//! A VM's QEMU process: started from the argv [`crate::qemu::argv`] built, found again through
//! the pidfile QEMU writes (so an agent that restarts re-attaches instead of starting a second
//! copy), and stopped gracefully: ACPI power-down over QMP, then SIGTERM, then SIGKILL. I/O.

use std::ffi::OsString;
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::files::VmFiles;
use crate::qemu::Firmware;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("{0}: not prepared: run `kubenet setup {0}` (or `kubenet up`) first")]
    NotPrepared(String),
    #[error("{name}: QEMU did not start ({status}): {log}")]
    Failed { name: String, status: String, log: String },
    #[error("{path}: {source}")]
    Io { path: std::path::PathBuf, source: io::Error },
}

/// The pid of `files`' QEMU if it runs: the pidfile names a live process and (on Linux) that
/// process is the QEMU writing this pidfile, not an unrelated program that got the pid later.
pub fn running(files: &VmFiles) -> Option<u32> {
    let pid: i32 = std::fs::read_to_string(files.pidfile()).ok()?.trim().parse().ok()?;
    // SAFETY: signal 0 only checks that the process exists.
    let alive = pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM));
    if !alive {
        return None;
    }
    if cfg!(target_os = "linux") {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let want = files.pidfile();
        let want = want.as_os_str().as_encoded_bytes();
        if !cmdline.split(|b| *b == 0).any(|arg| arg == want) {
            return None;
        }
    }
    Some(pid as u32)
}

/// Starts the VM: a private copy of the UEFI variable store (of `firmware`, the one `argv`
/// boots) on first start, stale sockets removed, then QEMU, which daemonizes once the VM runs.
/// Returns its pid. Blocks until QEMU has daemonized (or failed, with the tail of its messages).
pub fn start(name: &str, argv: &[OsString], files: &VmFiles, firmware: &Firmware) -> Result<u32, ProcessError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ProcessError::Io { path, source }
    };
    if !files.disk().exists() || !files.seed().exists() {
        return Err(ProcessError::NotPrepared(name.to_owned()));
    }
    if let Firmware::Uefi { vars_template, .. } = firmware
        && !files.efi_vars().exists()
    {
        std::fs::copy(vars_template, files.efi_vars()).map_err(io(vars_template))?;
    }
    for sock in [files.qmp_socket(), files.serial_socket(), files.pidfile()] {
        match std::fs::remove_file(&sock) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io(&sock)(e)),
            _ => {}
        }
    }
    let log = std::fs::File::create(files.qemu_log()).map_err(io(&files.qemu_log()))?;
    let status = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .current_dir(&files.dir)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().map_err(io(&files.qemu_log()))?)
        .stderr(log)
        .status()
        .map_err(|e| ProcessError::Failed {
            name: name.to_owned(),
            status: "not run".into(),
            log: format!("cannot run {}: {e}", argv[0].to_string_lossy()),
        })?;
    let failed = |status: String| ProcessError::Failed {
        name: name.to_owned(),
        status,
        log: std::fs::read_to_string(files.qemu_log()).unwrap_or_default().trim().to_owned(),
    };
    if !status.success() {
        return Err(failed(status.to_string()));
    }
    // -daemonize: the parent exits once the pidfile is written.
    running(files).ok_or_else(|| failed("exited without a running VM".into()))
}

/// How a VM went down.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stopped {
    /// It was not running.
    NotRunning,
    /// The guest powered off after the ACPI request.
    Powerdown,
    /// QEMU quit on SIGTERM (the guest did not power off in time).
    Terminated,
    /// SIGKILL.
    Killed,
}

/// Stops the VM: ACPI power-down and up to `grace` for the guest to power off, then SIGTERM
/// (QEMU quits at once), then SIGKILL after 5 s.
pub async fn stop(files: &VmFiles, grace: Duration) -> Stopped {
    let Some(pid) = running(files) else { return Stopped::NotRunning };
    let asked = match crate::qmp::Qmp::connect(&files.qmp_socket()).await {
        Ok(mut q) => q.execute("system_powerdown").await.is_ok(),
        Err(_) => false,
    };
    if asked && wait_gone(files, grace).await {
        return Stopped::Powerdown;
    }
    // SAFETY: plain signals to the pid `running` vouched for.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    if wait_gone(files, Duration::from_secs(5)).await {
        return Stopped::Terminated;
    }
    // SAFETY: as above.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    wait_gone(files, Duration::from_secs(5)).await;
    Stopped::Killed
}

async fn wait_gone(files: &VmFiles, within: Duration) -> bool {
    let until = Instant::now() + within;
    loop {
        if running(files).is_none() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What firmware prints once it has tried every boot option and found nothing it can start:
/// edk2 (OVMF, AAVMF, Homebrew's edk2) drops to its shell or says so, SeaBIOS says so. An image
/// of another architecture than the guest's ends here, since its bootloader (BOOTX64.EFI on an
/// aarch64 guest) is not one the firmware can load.
const NOTHING_TO_BOOT: [&str; 4] =
    ["UEFI Interactive Shell", "No bootable option or device was found", "No bootable device", "Shell> "];

/// Whether the console shows the firmware giving up: nothing on the disk it can boot.
pub fn found_nothing_to_boot(console: &str) -> bool {
    NOTHING_TO_BOOT.iter().any(|m| console.contains(m))
}

/// The last `n` lines of the VM's console log (for errors: what the guest said last).
pub fn console_tail(files: &VmFiles, n: usize) -> String {
    let text = std::fs::read(files.console_log()).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::found_nothing_to_boot;

    #[test]
    fn firmware_that_gives_up_is_recognised() {
        // AAVMF with an x86_64 image (what this project's own e2e image printed).
        let aavmf = "UEFI firmware (version  built at 13:10:49 on Nov  5 2024)\r\n\
            BdsDxe: failed to load Boot0001 \"UEFI Misc Device\" from PciRoot(0x0)/Pci(0x1,0x0): Not Found\r\n\
            BdsDxe: loading Boot0002 \"EFI Internal Shell\" from Fv(64074AFE)/FvFile(7C04A583)\r\n\
            UEFI Interactive Shell v2.2\r\nEDK II\r\n";
        assert!(found_nothing_to_boot(aavmf));
        assert!(found_nothing_to_boot("iPXE (PCI 00:02.0) starting execution...\nNo bootable device.\n"));
        assert!(found_nothing_to_boot("BdsDxe: No bootable option or device was found.\n"));
        // A boot that goes on: GRUB, then the kernel, never matches, even with a failed option.
        let booting = "BdsDxe: failed to load Boot0003 \"UEFI PXEv4\": Not Found\r\n\
            BdsDxe: loading Boot0001 \"UEFI Misc Device\"\r\nWelcome to GRUB!\r\n\
            [    0.000000] Linux version 6.1.0-50-cloud-arm64\r\nworker1 login: ";
        assert!(!found_nothing_to_boot(booting));
    }
}
