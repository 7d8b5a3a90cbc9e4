//! A VM's QEMU process: started from the argv [`crate::qemu::argv`] built, found again through
//! the pidfile QEMU writes (so an agent that restarts re-attaches instead of starting a second
//! copy), and stopped gracefully: ACPI power-down over QMP, then SIGTERM, then SIGKILL. I/O.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use kubenet_cluster::{Lab, Vm};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

use crate::files::VmFiles;
use crate::owner::Owner;
use crate::qemu::{Firmware, HostProfile, Launch};

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("{0}: not prepared: run `kubenet setup {0}` (or `kubenet up`) first")]
    NotPrepared(String),
    #[error("{name}: QEMU did not start ({status}): {log}")]
    Failed { name: String, status: String, log: String },
    #[error("{path}: {source}")]
    Io { path: std::path::PathBuf, source: io::Error },
    #[error("cannot open the tap {name} for QEMU: {source}")]
    Tap { name: String, source: io::Error },
    #[error(transparent)]
    Profile(#[from] crate::qemu::ProfileError),
    #[error(transparent)]
    Owner(#[from] crate::owner::OwnerError),
    #[error("{name}: {source}")]
    Handover { name: String, source: crate::handover::HandoverError },
}

/// The pid of `files`' QEMU if it runs: the pidfile names a live process and (on Linux) that
/// process is the QEMU writing this pidfile, not an unrelated program that got the pid later,
/// and it runs as the user the pidfile belongs to. The agent signals that pid as root, and the
/// pidfile sits in its owner's folder: a file the owner wrote vouches only for the owner's own
/// processes. The pidfile is not followed if it is a link, and only its first bytes are read.
pub fn running(files: &VmFiles) -> Option<u32> {
    let (text, file_uid) = read_pidfile(&files.pidfile()).ok()?;
    let pid: i32 = text.trim().parse().ok()?;
    // Signal 0 only checks that the process exists (EPERM: it does, as another user's). Never
    // init, whatever a file says.
    let alive = pid > 1 && matches!(signal::kill(Pid::from_raw(pid), None), Ok(()) | Err(nix::errno::Errno::EPERM));
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
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        if process_uids(&status)? != [file_uid; 4] {
            return None;
        }
    }
    // macOS: the pidfile is in root's runtime folder (QEMU writes it as root, then becomes the
    // owner), so it is the process that must be the owner's: the VM folder's user.
    #[cfg(target_vendor = "apple")]
    {
        use std::os::unix::fs::MetadataExt;
        let folder_uid = std::fs::metadata(&files.dir).ok()?.uid();
        if process_uid(pid)? != folder_uid {
            return None;
        }
    }
    let _ = file_uid;
    Some(pid as u32)
}

/// A process's real uid (macOS, `proc_pidinfo`).
#[cfg(target_vendor = "apple")]
fn process_uid(pid: i32) -> Option<u32> {
    // SAFETY: proc_bsdinfo is plain old data; all-zero is valid.
    let mut info: libc::proc_bsdinfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::proc_bsdinfo>() as libc::c_int;
    // SAFETY: the buffer is a live proc_bsdinfo of `size` bytes, as PROC_PIDTBSDINFO fills.
    let n = unsafe { libc::proc_pidinfo(pid, libc::PROC_PIDTBSDINFO, 0, (&raw mut info).cast::<libc::c_void>(), size) };
    (n == size).then_some(info.pbi_ruid)
}

/// The pidfile's text (at most 32 bytes) and its owner: a regular file, not a link, not a FIFO.
fn read_pidfile(path: &Path) -> io::Result<(String, u32)> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    let mut text = String::new();
    f.take(32).read_to_string(&mut text)?;
    Ok((text, meta.uid()))
}

/// The real, effective, saved and file-system uids of a process, from `/proc/PID/status`.
fn process_uids(status: &str) -> Option<[u32; 4]> {
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    let ids: Vec<u32> = line.split_whitespace().map(str::parse).collect::<Result<_, _>>().ok()?;
    ids.try_into().ok()
}

/// What a VM is doing, from its folder.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmState {
    pub name: String,
    #[serde(flatten)]
    pub run: RunState,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum RunState {
    /// QEMU runs as `pid`, since `since` (Unix seconds, its pidfile's time).
    Running {
        pid: u32,
        since: Option<u64>,
    },
    Stopped,
}

impl RunState {
    pub fn pid(&self) -> Option<u32> {
        match self {
            RunState::Running { pid, .. } => Some(*pid),
            RunState::Stopped => None,
        }
    }
}

/// What each VM of `lab` is doing, from its folder: running (pid, since when, the pidfile's
/// time) or stopped. The agent answers `vms` with it; `kubenet status` reads it itself when no
/// agent runs (the VMs outlive it).
pub fn states(lab: &Lab) -> Vec<VmState> {
    lab.vms
        .iter()
        .map(|vm| {
            let files = VmFiles::new(lab, vm);
            let run = match running(&files) {
                Some(pid) => {
                    let since = std::fs::metadata(files.pidfile())
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.duration_since(std::time::SystemTime::UNIX_EPOCH).ok())
                        .map(|d| d.as_secs());
                    RunState::Running { pid, since }
                }
                None => RunState::Stopped,
            };
            VmState { name: vm.name.clone(), run }
        })
        .collect()
}

/// A VM started, or found running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launched {
    Started(u32),
    /// It was running already.
    Running(u32),
}

/// Everything that starting one VM takes, in one place: the running check, how it runs on this
/// host ([`HostProfile::launch`]), and the start as its owner ([`start`]), which builds its
/// command line ([`crate::qemu::launch_argv`]).
pub fn launch(lab: &Lab, vm: &Vm, profile: &HostProfile, owner: &Owner) -> Result<Launched, ProcessError> {
    let files = VmFiles::for_os(lab, vm, profile.os);
    if let Some(pid) = running(&files) {
        return Ok(Launched::Running(pid));
    }
    let launch = profile.launch(vm)?;
    #[cfg(target_os = "linux")]
    let tap = {
        let name = crate::qemu::tap_name(lab, vm);
        let tap = crate::tap::for_qemu(&name).map_err(|source| ProcessError::Tap { name, source })?;
        Some(tap)
    };
    #[cfg(not(target_os = "linux"))]
    let tap = None;
    start(lab, vm, &launch, owner, tap).map(Launched::Started)
}

/// Starts the VM: a private copy of the UEFI variable store (of the firmware `launch` boots) on
/// first start, stale sockets removed, then QEMU, which daemonizes once the VM runs. Returns
/// its pid. Blocks until QEMU has daemonized (or failed, with the tail of its messages).
///
/// Every file in the VM's folder is made, removed and read with `owner`'s rights
/// ([`Owner::run_as`]). On Linux QEMU itself runs as `owner` from its first instruction
/// ([`Owner::drop_in_child`]), so it opens every file as the owner. macOS's QEMU must start
/// as root for vmnet (it drops root itself, [`crate::qemu::DropTo`]), so there files go by
/// descriptor (`launch.files_by_fd`): the agent opens them and binds the sockets as the owner
/// ([`crate::handover`]), and QEMU's pidfile, the one file it still opens by path, goes to
/// the lab's root-owned runtime directory.
pub fn start(lab: &Lab, vm: &Vm, launch: &Launch, owner: &Owner, tap: Option<OwnedFd>) -> Result<u32, ProcessError> {
    let name = vm.name.as_str();
    let files = &VmFiles::for_os(lab, vm, launch.os);
    let firmware = &launch.guest.firmware;
    let handover = |source| ProcessError::Handover { name: name.to_owned(), source };
    if let Some(run) = &files.run_dir {
        crate::handover::make_run_dir(run, &files.pidfile()).map_err(handover)?;
    }
    let log = owner.run_as(|| prepare_folder(name, files, firmware))??;
    let opened = if launch.files_by_fd {
        let base = crate::files::base_image(lab, vm, launch.arch);
        let images = lab.state_dir.join("images");
        let wants = crate::handover::Wants {
            images: &images,
            base: &base,
            efi_vars: matches!(firmware, Firmware::Uefi { .. }),
        };
        Some(owner.run_as(|| crate::handover::open(files, &wants))?.map_err(handover)?)
    } else {
        None
    };
    let argv = crate::qemu::launch_argv(lab, vm, launch, opened.as_ref().map(|o| o.numbers()).as_ref());
    let mut passed: Vec<(BorrowedFd, i32)> = opened.as_ref().map(|o| o.passed()).unwrap_or_default();
    if let Some(tap) = &tap {
        passed.push((tap.as_fd(), crate::qemu::TAP_FD));
    }
    let mut cmd = std::process::Command::new(&argv[0]);
    // Not the VM's folder: std changes directory in the child before the owner's identity is
    // taken (pre_exec), so a folder the owner swapped for a link would be entered as root.
    // Every path QEMU is given is absolute.
    cmd.args(&argv[1..])
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().map_err(io_at(&files.qemu_log()))?)
        .stderr(log.try_clone().map_err(io_at(&files.qemu_log()))?);
    hand_over(&mut cmd, &passed).map_err(|e| ProcessError::Failed {
        name: name.to_owned(),
        status: "not run".into(),
        log: e.to_string(),
    })?;
    if cfg!(target_os = "linux") {
        owner.drop_in_child(&mut cmd);
    }
    let status = cmd.status().map_err(|e| ProcessError::Failed {
        name: name.to_owned(),
        status: "not run".into(),
        log: format!("cannot run {}: {e}", argv[0].to_string_lossy()),
    })?;
    let failed = |status: String| ProcessError::Failed { name: name.to_owned(), status, log: log_text(&log) };
    if !status.success() {
        return Err(failed(status.to_string()));
    }
    // -daemonize: the parent exits once the pidfile is written.
    if files.run_dir.is_some() {
        crate::handover::publish_pidfile(&files.pidfile()).map_err(handover)?;
    }
    running(files).ok_or_else(|| failed("exited without a running VM".into()))
}

/// Makes each `(fd, at)` the child's descriptor `at`, open across exec. Every other
/// descriptor of the agent is close-on-exec, so these are the only ones QEMU inherits besides
/// its standard ones. A descriptor already at its number is only opened up; one that must move
/// (the tap, to [`crate::qemu::TAP_FD`]) may not land on another one handed over. (std's own
/// exec-error pipe cannot be the tap's `at`: the tap was opened first and holds the lowest free
/// number, so either it is `at` or `at` was already taken.)
fn hand_over(cmd: &mut std::process::Command, fds: &[(BorrowedFd, i32)]) -> io::Result<()> {
    use std::os::unix::process::CommandExt;
    let moves: Vec<(i32, i32)> = fds.iter().map(|(fd, at)| (fd.as_raw_fd(), *at)).collect();
    if let Some((_, at)) = moves.iter().find(|(raw, at)| raw != at && moves.iter().any(|(r, _)| r == at)) {
        return Err(io::Error::other(format!("descriptor {at} is needed twice for QEMU")));
    }
    // SAFETY: dup2 and fcntl are async-signal-safe system calls on integers; `moves` was
    // allocated before the fork and is only read.
    unsafe {
        cmd.pre_exec(move || {
            for &(raw, at) in &moves {
                let r = if raw == at { libc::fcntl(at, libc::F_SETFD, 0) } else { libc::dup2(raw, at) };
                if r < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(())
}

/// What [`start`] does in the VM's folder before QEMU runs, as the owner: checks the disk and
/// seed are there, copies the firmware's variable store on first start, removes stale sockets
/// and the old pidfile, and makes a new QEMU log (returned, open for reading and writing).
fn prepare_folder(name: &str, files: &VmFiles, firmware: &Firmware) -> Result<std::fs::File, ProcessError> {
    if !files.disk().exists() || !files.seed().exists() {
        return Err(ProcessError::NotPrepared(name.to_owned()));
    }
    if let Firmware::Uefi { vars_template, .. } = firmware
        && !files.efi_vars().exists()
    {
        std::fs::copy(vars_template, files.efi_vars()).map_err(io_at(vars_template))?;
    }
    // A pidfile in the root-owned runtime directory is root's to remove (`start`), not the owner's.
    let pidfile = files.run_dir.is_none().then(|| files.pidfile());
    for file in [files.qmp_socket(), files.serial_socket(), files.qemu_log()].into_iter().chain(pidfile) {
        match std::fs::remove_file(&file) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_at(&file)(e)),
            _ => {}
        }
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(files.qemu_log())
        .map_err(io_at(&files.qemu_log()))
}

/// What QEMU wrote to its log, read back from the descriptor [`start`] made (never the path,
/// which the owner may have pointed elsewhere since): its last 16 KiB.
fn log_text(mut log: &std::fs::File) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let len = log.metadata().map(|m| m.len()).unwrap_or(0);
    let mut text = Vec::new();
    let _ =
        log.seek(SeekFrom::Start(len.saturating_sub(16 << 10))).and_then(|_| log.take(16 << 10).read_to_end(&mut text));
    String::from_utf8_lossy(&text).trim().to_owned()
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> ProcessError + use<> {
    let path = path.to_path_buf();
    move |source| ProcessError::Io { path, source }
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
    let asked = match crate::qmp::Qmp::connect_to(&files.qmp_socket(), pid).await {
        Ok(mut q) => q.execute("system_powerdown").await.is_ok(),
        Err(_) => false,
    };
    if asked && wait_gone(files, pid, grace).await {
        return Stopped::Powerdown;
    }
    signal_vm(files, pid, Signal::SIGTERM);
    if wait_gone(files, pid, Duration::from_secs(5)).await {
        return Stopped::Terminated;
    }
    signal_vm(files, pid, Signal::SIGKILL);
    wait_gone(files, pid, Duration::from_secs(5)).await;
    Stopped::Killed
}

/// Signals `pid` only if it is still the VM's QEMU, vouched for again by [`running`] right
/// now: the grace time may have been long, the owner may have rewritten the pidfile, and the pid
/// may belong to another process by now (one of root's would fail `running`'s checks).
fn signal_vm(files: &VmFiles, pid: u32, sig: Signal) {
    if running(files) == Some(pid) {
        let _ = signal::kill(Pid::from_raw(pid as i32), sig);
    }
}

/// Whether the VM's QEMU `pid` is gone within `within`: its pidfile no longer vouches for it.
async fn wait_gone(files: &VmFiles, pid: u32, within: Duration) -> bool {
    // No deadline the clock cannot hold (a huge grace time) rather than a panic on the addition.
    let until = Instant::now().checked_add(within);
    loop {
        if running(files) != Some(pid) {
            return true;
        }
        if until.is_some_and(|u| Instant::now() >= u) {
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
    use super::*;

    /// What QEMU inherits: each descriptor at its number, open across exec, and nothing else
    /// of the parent's; a move onto another handed-over descriptor is refused up front.
    #[test]
    fn descriptors_are_handed_over_at_their_numbers_and_none_lands_on_another() {
        let a: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let b: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let other: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let (ra, rb) = (a.as_raw_fd(), b.as_raw_fd());
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", &format!("ls /proc/self/fd/{ra} /proc/self/fd/{rb} /proc/self/fd/{}", other.as_raw_fd())]);
        hand_over(&mut cmd, &[(a.as_fd(), ra), (b.as_fd(), rb)]).unwrap();
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        if cfg!(target_os = "linux") {
            assert!(text.contains(&format!("/proc/self/fd/{ra}")) && text.contains(&format!("/proc/self/fd/{rb}")));
            assert!(!text.contains(&format!("/proc/self/fd/{}", other.as_raw_fd())), "{text}");
        }
        let e = hand_over(&mut std::process::Command::new("true"), &[(a.as_fd(), rb), (b.as_fd(), rb)]).unwrap_err();
        assert!(e.to_string().contains(&format!("descriptor {rb} is needed twice")), "{e}");
    }

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
