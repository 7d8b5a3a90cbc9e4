//! QEMU command lines as data. A [`HostProfile`] says what the host is (OS, architecture,
//! accelerator) and, per guest architecture, which QEMU and firmware run it and how QEMU drops
//! root; [`argv`] turns a VM and a profile into the exact command, so the macOS profile (hvf,
//! vmnet-shared, edk2) is tested on Linux and the Linux profile (kvm or tcg, a tap on the lab
//! bridge, OVMF/AAVMF) anywhere. A guest of another architecture than the host's (an arm64
//! worker on an x86 laptop) runs under TCG. Only [`HostProfile::detect`] looks at the host.
//!
//! Where QEMU starts as root (macOS, [`HostProfile::files_by_fd`]) the command line names no
//! file of the owner's: the guest's files are fd sets (`-add-fd`, `/dev/fdset/N`), the disk a
//! `-blockdev` tree whose base has no backing of its own, the sockets listening descriptors,
//! all at the numbers the agent's [`crate::handover`] gives ([`FdNumbers`]).

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

pub use kubenet_cluster::Arch;
use kubenet_cluster::{Accelerator, FirmwareChoice, Lab, Vm};

use crate::files::VmFiles;
use crate::owner::Owner;

pub use kubenet_cluster::Os;

/// The accelerator QEMU runs with, decided for this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Hvf,
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Hvf => "hvf",
            Accel::Tcg => "tcg",
        })
    }
}

/// How the guest boots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// QEMU's built-in SeaBIOS (x86 only).
    Bios,
    /// UEFI from two pflash images: the read-only code and a template copied per VM for its
    /// variables.
    Uefi { code: PathBuf, vars_template: PathBuf },
}

/// How QEMU, started as root, gives root up once the network is open: macOS only, where
/// vmnet needs root when QEMU starts. On Linux QEMU starts as the lab's owner instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DropTo {
    /// `-run-with user=NAME` (QEMU 9.1 and later).
    RunWith(String),
    /// `-runas NAME` (older QEMU; removed in 10.0).
    Runas(String),
}

impl DropTo {
    /// The flag for QEMU `version` (major, minor).
    pub fn for_version(version: (u32, u32), user: &str) -> DropTo {
        if version >= (9, 1) { DropTo::RunWith(user.to_owned()) } else { DropTo::Runas(user.to_owned()) }
    }
}

/// What the host is, as far as QEMU's command line cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostProfile {
    pub os: Os,
    /// The host's CPU: guests of this architecture run with `accel`, others under TCG.
    pub arch: Arch,
    pub accel: Accel,
    /// Whether QEMU gets the guest's files and sockets as descriptors the agent opened as the
    /// owner ([`FdNumbers`]) rather than by path: macOS, where QEMU opens them as root before
    /// it drops root. (Linux starts QEMU as the owner, so paths are safe there; a test sets it
    /// on Linux to run the by-descriptor form against a real QEMU.)
    pub files_by_fd: bool,
    /// Per guest architecture, what runs it here, or why nothing can.
    pub guests: Vec<(Arch, Result<Guest, ProfileError>)>,
}

/// What runs guests of one architecture on this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Guest {
    /// The QEMU binary: an absolute path, found in PATH.
    pub qemu: PathBuf,
    pub firmware: Firmware,
    pub drop_to: Option<DropTo>,
}

/// How one VM runs on this host: the profile's answer for the VM's architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch<'a> {
    pub os: Os,
    pub arch: Arch,
    pub accel: Accel,
    /// [`HostProfile::files_by_fd`].
    pub files_by_fd: bool,
    pub guest: &'a Guest,
}

impl HostProfile {
    /// How `vm` runs here: its architecture (the host's unless the group says), the accelerator
    /// (TCG for a foreign architecture), its QEMU and firmware; or why it cannot.
    pub fn launch(&self, vm: &Vm) -> Result<Launch<'_>, ProfileError> {
        let arch = vm.arch_on(self.arch);
        let accel = if arch == self.arch { self.accel } else { Accel::Tcg };
        match self.guests.iter().find(|(a, _)| *a == arch) {
            Some((_, Ok(guest))) => Ok(Launch { os: self.os, arch, accel, files_by_fd: self.files_by_fd, guest }),
            Some((_, Err(e))) => Err(e.clone()),
            None => {
                Err(ProfileError::NoQemu { arch, binary: arch.qemu_binary(), package: qemu_package(self.os, arch) })
            }
        }
    }
}

/// The one-line warning for a VM whose architecture is not the host's: it is emulated.
pub fn emulation_warning(vm: &Vm, host: Arch) -> Option<String> {
    let arch = vm.arch_on(host);
    (arch != host).then(|| {
        format!(
            "{}: an {arch} guest on an {host} host runs under TCG (software emulation), many times slower than a native one",
            vm.name
        )
    })
}

/// The package that brings QEMU for `arch` guests on `os`.
fn qemu_package(os: Os, arch: Arch) -> &'static str {
    match (os, arch) {
        (Os::Linux, Arch::X86_64) => "qemu-system-x86",
        (Os::Linux, Arch::Aarch64) => "qemu-system-arm",
        (Os::MacOs, _) => "qemu",
    }
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProfileError {
    #[error("accelerator = \"{0}\" is not available on {1}: use \"auto\" or \"tcg\"")]
    AccelUnavailable(&'static str, &'static str),
    #[error("/dev/kvm cannot be opened ({0}): add yourself to the `kvm` group, or set accelerator = \"tcg\"")]
    NoKvm(String),
    #[error(
        "no UEFI firmware for {arch} guests found (looked for {looked}): install it (Debian/Ubuntu: `apt install {package}`; Fedora: `dnf install {fedora}`; macOS: it comes with Homebrew's qemu)"
    )]
    NoFirmware { arch: Arch, looked: String, package: &'static str, fedora: &'static str },
    #[error("firmware = \"bios\" is not available for {0} guests: they boot by UEFI only (use \"auto\" or \"uefi\")")]
    NoBios(Arch),
    #[error(
        "{binary} is not in PATH, so {arch} guests cannot run: install it (Debian/Ubuntu: `apt install {package}`; macOS: `brew install qemu`)"
    )]
    NoQemu { arch: Arch, binary: &'static str, package: &'static str },
    #[error("this host is neither Linux nor macOS, or its CPU is neither x86_64 nor aarch64")]
    UnsupportedHost,
    #[error("QEMU is not safe to run as root: {0} (install QEMU where only root can change it)")]
    Untrusted(String),
}

/// The accelerator for `choice` on `os`, and a warning when `auto` falls back to TCG.
/// `kvm` says whether /dev/kvm opened (Err: why not).
pub fn resolve_accel(
    choice: Accelerator,
    os: Os,
    kvm: Result<(), String>,
) -> Result<(Accel, Option<String>), ProfileError> {
    match (choice, os) {
        (Accelerator::Tcg, _) => Ok((Accel::Tcg, None)),
        (Accelerator::Hvf | Accelerator::Auto, Os::MacOs) => Ok((Accel::Hvf, None)),
        (Accelerator::Hvf, Os::Linux) => Err(ProfileError::AccelUnavailable("hvf", "Linux")),
        (Accelerator::Kvm, Os::MacOs) => Err(ProfileError::AccelUnavailable("kvm", "macOS")),
        (Accelerator::Kvm, Os::Linux) => kvm.map(|()| (Accel::Kvm, None)).map_err(ProfileError::NoKvm),
        (Accelerator::Auto, Os::Linux) => Ok(match kvm {
            Ok(()) => (Accel::Kvm, None),
            Err(why) => (
                Accel::Tcg,
                Some(format!(
                    "/dev/kvm cannot be opened ({why}): falling back to TCG, software emulation, which is many times slower"
                )),
            ),
        }),
    }
}

/// Where UEFI firmware is looked for, in order: (code, vars template). `qemu_share` is the
/// `share/qemu` folder beside the QEMU binary found in PATH (Homebrew, MacPorts, a build).
pub fn firmware_candidates(os: Os, arch: Arch, qemu_share: Option<&Path>) -> Vec<(PathBuf, PathBuf)> {
    let bundled = |code: &str, vars: &str| {
        let mut v: Vec<(PathBuf, PathBuf)> = Vec::new();
        let mut shares: Vec<PathBuf> = qemu_share.map(Path::to_path_buf).into_iter().collect();
        let system: &[&str] = match os {
            Os::MacOs => &["/opt/homebrew/share/qemu", "/usr/local/share/qemu", "/opt/local/share/qemu"],
            Os::Linux => &["/usr/share/qemu", "/usr/local/share/qemu"],
        };
        shares.extend(system.iter().map(PathBuf::from));
        for s in shares {
            let pair = (s.join(code), s.join(vars));
            if !v.contains(&pair) {
                v.push(pair);
            }
        }
        v
    };
    let p = |a: &str, b: &str| (PathBuf::from(a), PathBuf::from(b));
    match (os, arch) {
        (Os::MacOs, Arch::Aarch64) => bundled("edk2-aarch64-code.fd", "edk2-arm-vars.fd"),
        (Os::MacOs, Arch::X86_64) => bundled("edk2-x86_64-code.fd", "edk2-i386-vars.fd"),
        (Os::Linux, Arch::X86_64) => {
            let mut v = vec![
                // Debian and Ubuntu (ovmf), 4 MiB flash first.
                p("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
                p("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
                // Fedora (edk2-ovmf), Arch (edk2-ovmf).
                p("/usr/share/edk2/ovmf/OVMF_CODE.fd", "/usr/share/edk2/ovmf/OVMF_VARS.fd"),
                p("/usr/share/edk2/x64/OVMF_CODE.4m.fd", "/usr/share/edk2/x64/OVMF_VARS.4m.fd"),
            ];
            v.extend(bundled("edk2-x86_64-code.fd", "edk2-i386-vars.fd"));
            v
        }
        (Os::Linux, Arch::Aarch64) => {
            let mut v = vec![
                // Debian and Ubuntu (qemu-efi-aarch64), Fedora (edk2-aarch64).
                p("/usr/share/AAVMF/AAVMF_CODE.fd", "/usr/share/AAVMF/AAVMF_VARS.fd"),
                p("/usr/share/edk2/aarch64/QEMU_EFI-pflash.raw", "/usr/share/edk2/aarch64/vars-template-pflash.raw"),
            ];
            v.extend(bundled("edk2-aarch64-code.fd", "edk2-arm-vars.fd"));
            v
        }
    }
}

/// The firmware for `choice`: BIOS when asked for (x86 only); else the first UEFI candidate
/// whose two files exist. With `auto`, x86 falls back to BIOS (cloud images boot both ways);
/// aarch64 has no BIOS, and `uefi` means UEFI, so there no firmware is an error.
pub fn pick_firmware(
    choice: FirmwareChoice,
    os: Os,
    arch: Arch,
    candidates: &[(PathBuf, PathBuf)],
    exists: impl Fn(&Path) -> bool,
) -> Result<Firmware, ProfileError> {
    if choice == FirmwareChoice::Bios {
        return match arch {
            Arch::X86_64 => Ok(Firmware::Bios),
            Arch::Aarch64 => Err(ProfileError::NoBios(arch)),
        };
    }
    if let Some((code, vars)) = candidates.iter().find(|(c, v)| exists(c) && exists(v)) {
        return Ok(Firmware::Uefi { code: code.clone(), vars_template: vars.clone() });
    }
    match arch {
        Arch::X86_64 if choice == FirmwareChoice::Auto => Ok(Firmware::Bios),
        _ => Err(ProfileError::NoFirmware {
            arch,
            looked: candidates.iter().map(|(c, _)| c.display().to_string()).collect::<Vec<_>>().join(", "),
            package: match (os, arch) {
                (Os::Linux, Arch::X86_64) => "ovmf",
                (Os::Linux, Arch::Aarch64) => "qemu-efi-aarch64",
                (Os::MacOs, _) => "qemu",
            },
            fedora: match arch {
                Arch::X86_64 => "edk2-ovmf",
                Arch::Aarch64 => "edk2-aarch64",
            },
        }),
    }
}

/// "QEMU emulator version 7.2.19 (Debian ...)" -> (7, 2).
pub fn parse_version(text: &str) -> Option<(u32, u32)> {
    let rest = text.split("version ").nth(1)?;
    let mut it = rest.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

impl HostProfile {
    /// Looks at this host: OS and CPU, /dev/kvm, and per guest architecture QEMU (in PATH, by
    /// absolute path) and firmware. `owner` is given by the root agent, which starts QEMU for
    /// that user: /dev/kvm must then open for the owner (Linux runs QEMU as the owner), QEMU
    /// and its firmware must be files only root can replace ([`crate::trust`]), and on macOS
    /// QEMU's version decides how it drops root. Returns the profile and any warning to show.
    pub fn detect(lab: &Lab, owner: Option<&Owner>) -> Result<(HostProfile, Option<String>), ProfileError> {
        let os = Os::HOST.ok_or(ProfileError::UnsupportedHost)?;
        let kvm = match owner {
            Some(o) if os == Os::Linux => owner_opens_kvm(o),
            _ => {
                std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").map(drop).map_err(|e| e.to_string())
            }
        };
        let (accel, warning) = resolve_accel(lab.accelerator, os, kvm)?;
        let guests = Arch::ALL.iter().map(|&arch| (arch, Guest::detect(lab.firmware, os, arch, owner))).collect();
        Ok((HostProfile { os, arch: Arch::HOST, accel, files_by_fd: os == Os::MacOs, guests }, warning))
    }
}

/// Whether `owner` may open /dev/kvm (its groups and the device's ACL decide): asked of
/// `test -r -w`, run as the owner, which is exactly what QEMU will be.
fn owner_opens_kvm(owner: &Owner) -> Result<(), String> {
    let mut cmd = std::process::Command::new("test");
    cmd.args(["-r", "/dev/kvm", "-a", "-w", "/dev/kvm"]);
    owner.drop_in_child(&mut cmd);
    match cmd.status() {
        Ok(s) if s.success() => Ok(()),
        Ok(_) => Err(format!(
            "the lab's owner {} may not open it: add them to the group of /dev/kvm (usually `kvm`)",
            owner.name
        )),
        Err(e) => Err(format!("cannot check it as {}: {e}", owner.name)),
    }
}

impl Guest {
    /// QEMU for `arch` guests found in PATH, its firmware, and how it drops root to `owner`.
    fn detect(choice: FirmwareChoice, os: Os, arch: Arch, owner: Option<&Owner>) -> Result<Guest, ProfileError> {
        let found = find_in_path(Path::new(arch.qemu_binary())).ok_or(ProfileError::NoQemu {
            arch,
            binary: arch.qemu_binary(),
            package: qemu_package(os, arch),
        })?;
        // The agent runs QEMU as root (macOS) or hands it the owner's guest (Linux): either way
        // no one but root may be able to swap the binary, or its firmware, underneath.
        let qemu = match owner {
            Some(_) => crate::trust::root_only_as_named(&found).map_err(|e| ProfileError::Untrusted(e.to_string()))?,
            None => found,
        };
        let share = qemu.parent().and_then(Path::parent).map(|p| p.join("share/qemu"));
        let candidates = firmware_candidates(os, arch, share.as_deref());
        let trusted = |p: &Path| p.exists() && (owner.is_none() || crate::trust::root_only(p).is_ok());
        let firmware = pick_firmware(choice, os, arch, &candidates, trusted)?;
        // Linux starts QEMU as the owner (see [`crate::process::start`]); only macOS's QEMU,
        // which needs root to open vmnet, gives root up itself.
        let drop_to = owner.filter(|o| os == Os::MacOs && o.uid != 0).map(|o| {
            let version = std::process::Command::new(&qemu)
                .arg("--version")
                .output()
                .ok()
                .and_then(|o| parse_version(&String::from_utf8_lossy(&o.stdout)))
                .unwrap_or((0, 0));
            DropTo::for_version(version, &o.name)
        });
        Ok(Guest { qemu, firmware, drop_to })
    }
}

fn find_in_path(name: &Path) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .filter(|d| d.is_absolute())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Where QEMU finds its tap on Linux, opened by the agent (`crate::tap`): a number on every OS
/// so that the Linux command line is built and tested anywhere.
pub const TAP_FD: i32 = 3;

/// The tap device of `vm` on the lab's bridge (Linux): at most 15 bytes, unique per id.
pub fn tap_name(lab: &Lab, vm: &Vm) -> String {
    tap_of(&lab.network.bridge, vm.id)
}

/// The tap of VM `id` on `bridge`: the bridge's name cut so that "-ID" fits Linux's 15 bytes.
pub fn tap_of(bridge: &str, id: u32) -> String {
    let id = format!("-{id}");
    let keep = 15 - id.len().min(15);
    let bridge: String = bridge.chars().take(keep).collect();
    format!("{bridge}{id}")
}

/// The descriptor numbers, in QEMU, of what the agent opened for it when files go by
/// descriptor ([`HostProfile::files_by_fd`]; [`crate::handover`] opens them). Writable images
/// come twice, read-write and read-only, because QEMU picks from an fd set (`-add-fd`) the
/// descriptor whose access mode matches each open it makes, and its file driver reopens an
/// image read-only while probing and locking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdNumbers {
    /// The UEFI variable store (read-write, read-only), when the firmware is UEFI.
    pub efi_vars: Option<(i32, i32)>,
    /// The qcow2 overlay (read-write, read-only).
    pub disk: (i32, i32),
    /// The overlay's base image, read-only.
    pub base: i32,
    /// The cloud-init seed, read-only.
    pub seed: i32,
    /// The console log, write-only, appending.
    pub console_log: i32,
    /// The listening serial-console socket, bound as the owner at `serial.sock`.
    pub serial: i32,
    /// The listening QMP socket, bound as the owner at `qmp.sock`.
    pub qmp: i32,
    /// The base image's format (`qcow2` or `raw`), read from its header by the agent.
    pub base_format: &'static str,
}

impl FdNumbers {
    /// The numbers shown by `kubenet up --dry-run` and in the golden tests: the real ones are
    /// whatever the agent's descriptors are when it starts the VM.
    pub const NOMINAL: FdNumbers = FdNumbers {
        efi_vars: Some((4, 5)),
        disk: (6, 7),
        base: 8,
        seed: 9,
        console_log: 10,
        serial: 11,
        qmp: 12,
        base_format: "qcow2",
    };
}

/// The fd sets (`-add-fd set=N`) the guest's files are in; `/dev/fdset/N` names them.
const SET_EFI_VARS: u32 = 1;
const SET_DISK: u32 = 2;
const SET_BASE: u32 = 3;
const SET_SEED: u32 = 4;
const SET_CONSOLE_LOG: u32 = 5;

/// The exact QEMU command line of `vm` on a host like `profile`, or why the VM cannot run there
/// (no QEMU or firmware for its architecture). QEMU daemonizes once the VM runs and writes its
/// pid to the pidfile; the serial console goes to a socket and a log file; QMP listens on a
/// socket; there is no display. Files by descriptor show [`FdNumbers::NOMINAL`].
pub fn argv(lab: &Lab, vm: &Vm, profile: &HostProfile) -> Result<Vec<OsString>, ProfileError> {
    let launch = profile.launch(vm)?;
    let fds = launch.files_by_fd.then_some(FdNumbers::NOMINAL);
    Ok(launch_argv(lab, vm, &launch, fds.as_ref()))
}

/// [`argv`] for a VM whose launch is decided, with the guest's files at the descriptors `fds`
/// when they go by descriptor (`launch.files_by_fd`; ignored otherwise).
pub fn launch_argv(lab: &Lab, vm: &Vm, launch: &Launch, fds: Option<&FdNumbers>) -> Vec<OsString> {
    let guest = launch.guest;
    let files = VmFiles::for_os(lab, vm, launch.os);
    let fds = fds.filter(|_| launch.files_by_fd);
    let uefi = match &guest.firmware {
        Firmware::Uefi { code, .. } => Some(code.as_path()),
        Firmware::Bios => None,
    };
    let mut a = words(&[&guest.qemu, &"-name", &vm.name]);
    a.extend(machine_args(vm, launch));
    a.extend(match fds {
        None => drives_by_path(&files, uefi),
        Some(fd) => drives_by_fd(fd, uefi),
    });
    a.extend(nic_args(lab, vm, launch.os));
    a.extend(words(&[&"-device", &"virtio-rng-pci"]));
    a.extend(console_args(&files, fds));
    match &guest.drop_to {
        Some(DropTo::RunWith(u)) => a.extend(words(&[&"-run-with", &format!("user={u}")])),
        Some(DropTo::Runas(u)) => a.extend(words(&[&"-runas", u])),
        None => {}
    }
    a.extend(words(&[&"-pidfile", &files.pidfile(), &"-daemonize"]));
    a
}

/// Command-line words from anything that is one.
fn words(parts: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<OsString> {
    parts.iter().map(|p| p.as_ref().to_owned()).collect()
}

/// A path inside an option list (`file=PATH,...`) with its commas doubled, as QEMU reads them.
fn joined(prefix: &str, p: &Path, suffix: &str) -> OsString {
    let mut s = OsString::from(prefix);
    s.push(option_value(p.as_os_str()));
    s.push(suffix);
    s
}

/// The machine, CPU, size and no display.
fn machine_args(vm: &Vm, launch: &Launch) -> Vec<OsString> {
    let machine = match launch.arch {
        Arch::X86_64 => format!("q35,accel={}", launch.accel),
        Arch::Aarch64 => format!("virt,accel={},highmem=on", launch.accel),
    };
    let cpu = match (launch.accel, launch.arch) {
        // Debian's and Ubuntu's arm64 programs sign return addresses (pointer authentication)
        // in every function; QEMU's own cheap signing instead of the architected QARMA cuts an
        // emulated guest's user-space time by more than half (boot to login: 259 s -> 187 s,
        // 127 s of it a network wait). What the Linux kernel's own QEMU tests use.
        (Accel::Tcg, Arch::Aarch64) => "max,pauth-impdef=on",
        (Accel::Tcg, Arch::X86_64) => "max",
        _ => "host",
    };
    let mut a = words(&[&"-machine", &machine, &"-cpu", &cpu]);
    a.extend(words(&[&"-smp", &vm.vcpus.to_string(), &"-m", &format!("{}M", vm.memory.mib())]));
    a.extend(words(&[&"-nodefaults", &"-display", &"none"]));
    a
}

/// The firmware's flash, the disk and the seed, opened by QEMU by path (Linux: QEMU is the owner).
fn drives_by_path(files: &VmFiles, uefi: Option<&Path>) -> Vec<OsString> {
    let mut a = Vec::new();
    if let Some(code) = uefi {
        a.extend(words(&[&"-drive", &joined("if=pflash,format=raw,unit=0,readonly=on,file=", code, "")]));
        a.extend(words(&[&"-drive", &joined("if=pflash,format=raw,unit=1,file=", &files.efi_vars(), "")]));
    }
    a.extend(words(&[&"-drive", &joined("if=virtio,format=qcow2,file=", &files.disk(), "")]));
    a.extend(words(&[&"-drive", &joined("if=virtio,format=raw,readonly=on,file=", &files.seed(), "")]));
    a
}

/// The same drives as descriptors the agent opened as the owner (macOS: QEMU starts as root).
fn drives_by_fd(fd: &FdNumbers, uefi: Option<&Path>) -> Vec<OsString> {
    let mut sets: Vec<(i32, u32)> = Vec::new();
    if let (Some(_), Some((rw, ro))) = (uefi, fd.efi_vars) {
        sets.extend([(rw, SET_EFI_VARS), (ro, SET_EFI_VARS)]);
    }
    sets.extend([
        (fd.disk.0, SET_DISK),
        (fd.disk.1, SET_DISK),
        (fd.base, SET_BASE),
        (fd.seed, SET_SEED),
        (fd.console_log, SET_CONSOLE_LOG),
    ]);
    let mut a = Vec::new();
    for (n, set) in sets {
        a.extend(words(&[&"-add-fd", &format!("fd={n},set={set}")]));
    }
    // The firmware's code is root's (checked by `crate::trust`), so QEMU may open it by path as
    // root; the variables are the owner's.
    if let Some(code) = uefi {
        a.extend(words(&[&"-drive", &joined("if=pflash,format=raw,unit=0,readonly=on,file=", code, "")]));
        a.extend(words(&[&"-drive", &format!("if=pflash,format=raw,unit=1,file=/dev/fdset/{SET_EFI_VARS}")]));
    }
    // The overlay and its base as one node tree, both by descriptor, the base with no backing of
    // its own (`null`): else QEMU would open a backing file named inside the base, which the
    // owner can rewrite at any time, by path and as root.
    let disk = format!(
        r#"{{"driver":"qcow2","node-name":"disk0","file":{{"driver":"file","filename":"/dev/fdset/{SET_DISK}"}},"backing":{{"driver":"{}","file":{{"driver":"file","filename":"/dev/fdset/{SET_BASE}"}},"backing":null}}}}"#,
        fd.base_format
    );
    a.extend(words(&[&"-blockdev", &disk, &"-device", &"virtio-blk-pci,drive=disk0"]));
    a.extend(words(&[&"-drive", &format!("if=virtio,format=raw,readonly=on,file=/dev/fdset/{SET_SEED}")]));
    a
}

/// The NIC: vmnet-shared on macOS, the lab bridge's tap on Linux.
fn nic_args(lab: &Lab, vm: &Vm, os: Os) -> Vec<OsString> {
    let n = &lab.network;
    match os {
        Os::MacOs => {
            let nic = format!(
                "vmnet-shared,start-address={},end-address={},subnet-mask={},mac={},model=virtio-net-pci",
                n.host_address,
                n.dhcp_range.end,
                n.subnet.netmask(),
                vm.mac
            );
            words(&[&"-nic", &nic])
        }
        Os::Linux => {
            // The agent opens the tap (`tap_name`) and QEMU finds it at this descriptor.
            let netdev = format!("tap,id=net0,fd={TAP_FD}");
            words(&[&"-netdev", &netdev, &"-device", &format!("virtio-net-pci,netdev=net0,mac={}", vm.mac)])
        }
    }
}

/// The serial console (a socket and a log) and QMP, by path or as sockets the agent bound.
fn console_args(files: &VmFiles, fds: Option<&FdNumbers>) -> Vec<OsString> {
    match fds {
        None => {
            let mut serial = joined("socket,id=serial0,server=on,wait=off,path=", &files.serial_socket(), ",logfile=");
            serial.push(option_value(files.console_log().as_os_str()));
            serial.push(",logappend=on");
            let mut a = words(&[&"-chardev", &serial, &"-serial", &"chardev:serial0"]);
            a.extend(words(&[&"-qmp", &joined("unix:", &files.qmp_socket(), ",server=on,wait=off")]));
            a
        }
        Some(fd) => {
            // Sockets the agent bound as the owner, already listening.
            let serial = format!(
                "socket,id=serial0,fd={},server=on,wait=off,logfile=/dev/fdset/{SET_CONSOLE_LOG},logappend=on",
                fd.serial
            );
            let mut a = words(&[&"-chardev", &serial, &"-serial", &"chardev:serial0"]);
            let qmp = format!("socket,id=qmp,fd={},server=on,wait=off", fd.qmp);
            a.extend(words(&[&"-chardev", &qmp, &"-mon", &"chardev=qmp,mode=control"]));
            a
        }
    }
}

/// `value` as a value inside a QEMU option list (`-drive file=VALUE,format=...`): QEMU ends a
/// value at a comma and reads `,,` as one, so a state directory such as "~/labs/a, b" must
/// have its commas doubled or QEMU reads the rest as options.
pub fn option_value(value: &std::ffi::OsStr) -> OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut out = Vec::with_capacity(value.len());
    for &b in value.as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

/// A command line as one shell-quoted string (`kubenet up --dry-run`).
pub fn shell_line(argv: &[OsString]) -> String {
    argv.iter()
        .map(|a| {
            let s = a.to_string_lossy();
            if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,@+".contains(c)) {
                s.into_owned()
            } else {
                format!("'{}'", s.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
#[path = "qemu_tests.rs"]
pub(crate) mod tests;
