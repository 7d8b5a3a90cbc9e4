//! Lab snapshots: one name across every VM of the lab (or the VMs asked for), taken and restored
//! all or nothing.
//!
//! A snapshot of a VM is an internal qcow2 snapshot of its overlay (`qemu-img snapshot`: the L1
//! table and refcounts only, so a stopped lab saves and restores in milliseconds per VM), its
//! UEFI variable store (copied: the firmware's boot entries belong to the disk they describe)
//! and its DHCP lease lines. The lab-wide record is a manifest, `STATE/snapshots/NAME/
//! manifest.json`, written last: a snapshot without a manifest does not exist, and a save cut
//! short leaves nothing a later save of the same name trips over.
//!
//! The commands run on each disk are data ([`img_command`]); [`Store`] runs them. A disk that
//! `kubenet reset` replaced no longer holds the snapshot, so a restore sees that the lab
//! moved on ([`differences`]).

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use kubenet_cluster::{Lab, Vm};
use serde::{Deserialize, Serialize};

use crate::files::VmFiles;

/// The temporary snapshot a restore takes of every disk first, so that a restore cut short can
/// put back what was there. Never a user's name: those cannot start with a dot.
pub const UNDO: &str = ".kubenet-undo";

/// The manifest's file name in a snapshot's folder.
const MANIFEST: &str = "manifest.json";

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(
        "`{0}` cannot name a snapshot: use letters, digits, `.`, `_` and `-`, at most 64, starting with a letter or digit"
    )]
    BadName(String),
    #[error(
        "a snapshot named `{0}` exists already: delete it first (`kubenet snapshot delete {0}`) or choose another name"
    )]
    Exists(String),
    #[error("no snapshot named `{name}` ({})", if known.is_empty() { "there are none yet".to_owned() } else { format!("there are: {}", known.join(", ")) })]
    Unknown { name: String, known: Vec<String> },
    #[error("{vm}: {disk} is {format}, not qcow2: only qcow2 disks hold snapshots")]
    NotQcow2 { vm: String, disk: PathBuf, format: String },
    #[error("{vm}: no disk at {disk}: set it up first (`kubenet setup {vm}`)")]
    NoDisk { vm: String, disk: PathBuf },
    #[error("{vm}: `{command}` failed: {stderr}")]
    QemuImg { vm: String, command: String, stderr: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a snapshot manifest kubenet can read: {message}")]
    Manifest { path: PathBuf, message: String },
    #[error("{vm}: not in snapshot `{name}` (it holds {})", have.join(", "))]
    NotInSnapshot { vm: String, name: String, have: Vec<String> },
    #[error(
        "the lab is not what snapshot `{name}` was taken of, so it cannot be restored:\n  {}\nrestore only the VMs that match with `--vm`, or take a new snapshot",
        differences.join("\n  ")
    )]
    Differs { name: String, differences: Vec<String> },
}

/// A name a user may give a snapshot: a file name in every shell and on every file system, and
/// never an option (`-x`) or a hidden file.
pub fn check_name(name: &str) -> Result<(), SnapshotError> {
    let ok = (1..=64).contains(&name.len())
        && name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok { Ok(()) } else { Err(SnapshotError::BadName(name.to_owned())) }
}

/// The lab-wide record of one snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    /// Unix seconds when it was taken.
    pub taken: u64,
    /// Taken with `--live`: of the VMs then running with their memory (restored into running
    /// VMs), and of those then stopped, their disks ([`VmEntry::live`]).
    pub live: bool,
    /// Every VM the lab had then, snapshot or not: a VM added since makes the lab differ.
    pub lab_vms: Vec<String>,
    pub vms: Vec<VmEntry>,
}

/// One VM in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmEntry {
    pub name: String,
    pub mac: String,
    pub ip: Ipv4Addr,
    /// The disk's allocated bytes when the snapshot was taken: what the snapshot keeps from
    /// being freed.
    pub disk_bytes: u64,
    /// The memory state saved with a live snapshot (0 otherwise).
    pub state_bytes: u64,
    /// Whether the UEFI variable store was copied beside the manifest.
    pub efi_vars: bool,
    /// The VM's lines of the lease file (dnsmasq format) then.
    pub leases: String,
    /// Saved running, with its memory, or stopped (its disk alone). Absent in manifests from
    /// before a live snapshot could hold stopped VMs: then [`Manifest::live`] says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<bool>,
}

impl Manifest {
    /// Whether `e` was saved running, with its memory.
    pub fn is_live(&self, e: &VmEntry) -> bool {
        e.live.unwrap_or(self.live)
    }
}

/// What a lab's disk says about itself (`qemu-img info --output=json`).
#[derive(Clone, Debug, Deserialize)]
pub struct DiskInfo {
    pub format: String,
    #[serde(default)]
    pub snapshots: Vec<DiskSnapshot>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct DiskSnapshot {
    pub name: String,
    #[serde(rename = "vm-state-size", default)]
    pub vm_state_size: u64,
}

impl DiskInfo {
    pub fn has(&self, tag: &str) -> bool {
        self.snapshots.iter().any(|s| s.name == tag)
    }
}

/// What to do to a disk's internal snapshots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Create,
    Apply,
    Delete,
}

/// `qemu-img snapshot -c|-a|-d TAG DISK`.
pub fn img_command(op: Op, tag: &str, disk: &Path) -> Vec<OsString> {
    let flag = match op {
        Op::Create => "-c",
        Op::Apply => "-a",
        Op::Delete => "-d",
    };
    let mut v: Vec<OsString> = ["qemu-img", "snapshot", flag, tag].into_iter().map(OsString::from).collect();
    v.push(disk.as_os_str().to_owned());
    v
}

/// `qemu-img info -U --output=json DISK`: `-U` reads a disk a running QEMU holds.
pub fn info_command(disk: &Path) -> Vec<OsString> {
    let mut v: Vec<OsString> = ["qemu-img", "info", "-U", "--output=json"].into_iter().map(OsString::from).collect();
    v.push(disk.as_os_str().to_owned());
    v
}

/// The lines of a dnsmasq-format lease file that belong to `mac` (second field).
pub fn lease_lines(leases: &str, mac: &str) -> String {
    leases
        .lines()
        .filter(|l| l.split_whitespace().nth(1).is_some_and(|m| m.eq_ignore_ascii_case(mac)))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// `current` with the lines of `macs` replaced by `saved`.
pub fn merge_leases(current: &str, macs: &[&str], saved: &str) -> String {
    let mut out: String = current
        .lines()
        .filter(|l| !l.split_whitespace().nth(1).is_some_and(|m| macs.iter().any(|x| x.eq_ignore_ascii_case(m))))
        .map(|l| format!("{l}\n"))
        .collect();
    out.push_str(saved);
    out
}

/// Why `lab` cannot take back snapshot `m` for the VMs `targets` (names in the snapshot), one
/// line per VM; `holds(vm)` says whether that VM's disk still holds the snapshot. Empty: go on.
/// With `whole` (no `--vm`), a VM the lab gained or lost since counts too.
pub fn differences(
    m: &Manifest,
    lab: &Lab,
    targets: &[&VmEntry],
    whole: bool,
    holds: &dyn Fn(&Vm) -> bool,
) -> Vec<String> {
    let mut out = Vec::new();
    if whole {
        let then: BTreeSet<&str> = m.lab_vms.iter().map(String::as_str).collect();
        for vm in lab.vms.iter().filter(|vm| !then.contains(vm.name.as_str())) {
            out.push(format!("{}: added to the lab since", vm.name));
        }
    }
    for e in targets {
        let Some(vm) = lab.vm_by_name(&e.name) else {
            out.push(format!("{}: no longer in the lab", e.name));
            continue;
        };
        if vm.mac.to_string() != e.mac || vm.ip != e.ip {
            out.push(format!("{}: was {} at {}, is now {} at {}", e.name, e.mac, e.ip, vm.mac, vm.ip));
        } else if !holds(vm) {
            out.push(format!("{}: its disk no longer holds the snapshot (reset or made anew since)", e.name));
        }
    }
    out
}

/// The snapshots of one lab, under `STATE/snapshots`.
pub struct Store<'a> {
    lab: &'a Lab,
    dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io { path: path.to_path_buf(), source }
}

impl<'a> Store<'a> {
    pub fn new(lab: &'a Lab) -> Self {
        Store { lab, dir: crate::files::LabFiles::new(lab).snapshots() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn folder(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Every snapshot, oldest first. A folder without a readable manifest (a save cut short)
    /// is not one.
    pub fn list(&self) -> Result<Vec<Manifest>, SnapshotError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&self.dir)(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io(&self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if check_name(&name).is_ok() && entry.path().join(MANIFEST).exists() {
                out.push(self.get(&name)?);
            }
        }
        out.sort_by(|a, b| (a.taken, &a.name).cmp(&(b.taken, &b.name)));
        Ok(out)
    }

    /// The snapshot called `name`.
    pub fn get(&self, name: &str) -> Result<Manifest, SnapshotError> {
        check_name(name)?;
        let path = self.folder(name).join(MANIFEST);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let known = self.list()?.into_iter().map(|m| m.name).collect();
                return Err(SnapshotError::Unknown { name: name.to_owned(), known });
            }
            Err(e) => return Err(io(&path)(e)),
        };
        serde_json::from_str(&text).map_err(|e| SnapshotError::Manifest { path, message: e.to_string() })
    }

    fn write_manifest(&self, m: &Manifest) -> Result<(), SnapshotError> {
        let path = self.folder(&m.name).join(MANIFEST);
        let text = serde_json::to_string_pretty(m).expect("a manifest serializes");
        kubenet_cluster::state::write_atomic(&path, text.as_bytes(), 0o600).map_err(io(&path))
    }

    /// What `vm`'s disk holds; errors for a missing or non-qcow2 disk.
    pub fn info(&self, vm: &Vm) -> Result<DiskInfo, SnapshotError> {
        let disk = VmFiles::new(self.lab, vm).disk();
        if !disk.exists() {
            return Err(SnapshotError::NoDisk { vm: vm.name.clone(), disk });
        }
        let out = run(vm, &info_command(&disk))?;
        let info: DiskInfo = serde_json::from_str(&out).map_err(|e| SnapshotError::QemuImg {
            vm: vm.name.clone(),
            command: "qemu-img info".into(),
            stderr: format!("unreadable answer: {e}"),
        })?;
        if info.format != "qcow2" {
            return Err(SnapshotError::NotQcow2 { vm: vm.name.clone(), disk, format: info.format });
        }
        Ok(info)
    }

    /// `op` with `tag` on `vm`'s disk.
    pub fn img(&self, vm: &Vm, op: Op, tag: &str) -> Result<(), SnapshotError> {
        run(vm, &img_command(op, tag, &VmFiles::new(self.lab, vm).disk())).map(drop)
    }

    /// The lease file's text now (none yet: empty).
    pub fn leases(&self) -> Result<String, SnapshotError> {
        read_leases(&self.lab.lease_file())
    }

    /// Writes the manifest of a snapshot whose disks are done: from here on it exists.
    pub fn finish(&self, m: &Manifest) -> Result<(), SnapshotError> {
        self.write_manifest(m)
    }

    /// Takes snapshot `name` of the stopped `vms`, all or nothing: a failure removes what this
    /// call made before it returns. `each` hears of every VM done.
    pub fn save(
        &self,
        name: &str,
        vms: &[&Vm],
        now: u64,
        each: &mut dyn FnMut(&VmEntry),
    ) -> Result<Manifest, SnapshotError> {
        self.begin(name, vms)?;
        let mut done: Vec<&Vm> = Vec::new();
        let result = (|| {
            let leases = self.leases()?;
            let mut entries = Vec::new();
            for vm in vms {
                done.push(vm);
                self.img(vm, Op::Create, name)?;
                let entry = self.entry(vm, name, false, &leases)?;
                each(&entry);
                entries.push(entry);
            }
            let m = self.manifest(name, now, false, entries);
            self.write_manifest(&m)?;
            Ok(m)
        })();
        if result.is_err() {
            self.abandon(name, &done);
        }
        result
    }

    /// Checks that `name` is free and every disk can hold it, clears what a save cut short left
    /// of the same name in the disks, and makes the snapshot's folder.
    pub fn begin(&self, name: &str, vms: &[&Vm]) -> Result<(), SnapshotError> {
        check_name(name)?;
        let folder = self.folder(name);
        if folder.join(MANIFEST).exists() {
            return Err(SnapshotError::Exists(name.to_owned()));
        }
        for vm in vms {
            if self.info(vm)?.has(name) {
                self.img(vm, Op::Delete, name)?;
            }
        }
        for dir in [&self.dir, &folder] {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
            set_private(dir)?;
        }
        Ok(())
    }

    /// The record of `vm` just saved as `name`: sizes, its firmware variables copied, its lease
    /// lines.
    pub fn entry(&self, vm: &Vm, name: &str, live: bool, leases: &str) -> Result<VmEntry, SnapshotError> {
        let files = VmFiles::new(self.lab, vm);
        let disk = files.disk();
        let disk_bytes = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(&disk).map_err(io(&disk))?.blocks() * 512
        };
        let state_bytes = if live {
            self.info(vm)?.snapshots.iter().find(|s| s.name == name).map_or(0, |s| s.vm_state_size)
        } else {
            0
        };
        // A running QEMU owns its variable store, and a live restore cannot put one back.
        let efi = files.efi_vars();
        let efi_vars = !live && efi.exists();
        if efi_vars {
            let copy = self.efi_copy(name, &vm.name);
            std::fs::copy(&efi, &copy).map_err(io(&copy))?;
        }
        let mac = vm.mac.to_string();
        Ok(VmEntry {
            name: vm.name.clone(),
            leases: lease_lines(leases, &mac),
            mac,
            ip: vm.ip,
            disk_bytes,
            state_bytes,
            efi_vars,
            live: Some(live),
        })
    }

    pub fn manifest(&self, name: &str, now: u64, live: bool, vms: Vec<VmEntry>) -> Manifest {
        let lab_vms = self.lab.vms.iter().map(|v| v.name.clone()).collect();
        Manifest { name: name.to_owned(), taken: now, live, lab_vms, vms }
    }

    fn efi_copy(&self, name: &str, vm: &str) -> PathBuf {
        self.folder(name).join(format!("{vm}.efi-vars.fd"))
    }

    /// Undoes a save that failed: the snapshot leaves the disks it reached, and its folder goes.
    /// Best effort: what cannot be undone is logged, and the next save of the name clears it.
    pub fn abandon(&self, name: &str, done: &[&Vm]) {
        for vm in done {
            if self.info(vm).is_ok_and(|i| i.has(name))
                && let Err(e) = self.img(vm, Op::Delete, name)
            {
                eprintln!("kubenet: while undoing snapshot {name}: {e}");
            }
        }
        let _ = std::fs::remove_dir_all(self.folder(name));
    }

    /// The entries of `m` that `names` choose (none: all), or an error naming a VM the snapshot
    /// does not have.
    pub fn targets<'m>(&self, m: &'m Manifest, names: &[String]) -> Result<Vec<&'m VmEntry>, SnapshotError> {
        if let Some(bad) = names.iter().find(|n| !m.vms.iter().any(|e| e.name.eq_ignore_ascii_case(n))) {
            let have = m.vms.iter().map(|e| e.name.clone()).collect();
            return Err(SnapshotError::NotInSnapshot { vm: bad.clone(), name: m.name.clone(), have });
        }
        Ok(m.vms.iter().filter(|e| names.is_empty() || names.iter().any(|n| n.eq_ignore_ascii_case(&e.name))).collect())
    }

    /// Checks that the lab can take back `targets` of `m` ([`differences`]), returning their VMs.
    pub fn check_restorable(
        &self,
        m: &Manifest,
        targets: &[&VmEntry],
        whole: bool,
    ) -> Result<Vec<&'a Vm>, SnapshotError> {
        let holds = |vm: &Vm| self.info(vm).is_ok_and(|i| i.has(&m.name));
        let differences = differences(m, self.lab, targets, whole, &holds);
        if !differences.is_empty() {
            return Err(SnapshotError::Differs { name: m.name.clone(), differences });
        }
        Ok(targets.iter().filter_map(|e| self.lab.vm_by_name(&e.name)).collect())
    }

    /// Puts the stopped `targets` back to snapshot `m`, all or nothing: every disk first gets an
    /// [`UNDO`] snapshot; if one restore fails, the disks already restored go back to it.
    /// `leases` says whether to put the VMs' lease lines back too (not while `serve` owns the
    /// file).
    pub fn restore(
        &self,
        m: &Manifest,
        targets: &[&VmEntry],
        whole: bool,
        leases: bool,
        each: &mut dyn FnMut(&VmEntry),
    ) -> Result<(), SnapshotError> {
        let vms = self.check_restorable(m, targets, whole)?;
        let mut marked: Vec<&Vm> = Vec::new();
        let result = (|| {
            for vm in &vms {
                if self.info(vm)?.has(UNDO) {
                    self.img(vm, Op::Delete, UNDO)?;
                }
                self.img(vm, Op::Create, UNDO)?;
                marked.push(vm);
            }
            for (vm, e) in vms.iter().zip(targets) {
                self.img(vm, Op::Apply, &m.name)?;
                if e.efi_vars {
                    let to = VmFiles::new(self.lab, vm).efi_vars();
                    let from = self.efi_copy(&m.name, &e.name);
                    let bytes = std::fs::read(&from).map_err(io(&from))?;
                    kubenet_cluster::state::write_atomic(&to, &bytes, 0o600).map_err(io(&to))?;
                }
                each(e);
            }
            Ok(())
        })();
        if let Err(e) = &result {
            for vm in &marked {
                if let Err(undo) = self.img(vm, Op::Apply, UNDO) {
                    eprintln!("kubenet: after `{e}`, {} could not be put back: {undo}", vm.name);
                }
            }
        }
        for vm in &marked {
            let _ = self.img(vm, Op::Delete, UNDO);
        }
        result?;
        if leases {
            let path = self.lab.lease_file();
            let macs: Vec<&str> = targets.iter().map(|e| e.mac.as_str()).collect();
            let saved: String = targets.iter().map(|e| e.leases.as_str()).collect();
            let merged = merge_leases(&read_leases(&path)?, &macs, &saved);
            kubenet_cluster::state::write_atomic(&path, merged.as_bytes(), 0o644).map_err(io(&path))?;
        }
        Ok(())
    }

    /// Deletes `targets` of `m` from their disks (a disk reset since no longer has it) and from
    /// the manifest; the snapshot goes when no VM is left in it.
    pub fn delete(
        &self,
        m: &Manifest,
        targets: &[&VmEntry],
        each: &mut dyn FnMut(&VmEntry),
    ) -> Result<(), SnapshotError> {
        for e in targets {
            if let Some(vm) = self.lab.vm_by_name(&e.name)
                && self.info(vm).is_ok_and(|i| i.has(&m.name))
            {
                self.img(vm, Op::Delete, &m.name)?;
            }
            let copy = self.efi_copy(&m.name, &e.name);
            match std::fs::remove_file(&copy) {
                Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(io(&copy)(err)),
                _ => {}
            }
            each(e);
        }
        let left: Vec<VmEntry> = m.vms.iter().filter(|e| !targets.iter().any(|t| t.name == e.name)).cloned().collect();
        let folder = self.folder(&m.name);
        if left.is_empty() {
            std::fs::remove_dir_all(&folder).map_err(io(&folder))
        } else {
            self.write_manifest(&Manifest { vms: left, ..m.clone() })
        }
    }
}

fn set_private(dir: &Path) -> Result<(), SnapshotError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))
}

/// The lease file's text; none yet is empty.
fn read_leases(path: &Path) -> Result<String, SnapshotError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(io(path)(e)),
    }
}

/// Runs a qemu-img command for `vm`; its standard output, or its complaint.
fn run(vm: &Vm, argv: &[OsString]) -> Result<String, SnapshotError> {
    let shown = crate::qemu::shell_line(argv);
    let out = std::process::Command::new(&argv[0]).args(&argv[1..]).output().map_err(|e| SnapshotError::QemuImg {
        vm: vm.name.clone(),
        command: shown.clone(),
        stderr: format!("cannot run qemu-img: {e}"),
    })?;
    if !out.status.success() {
        return Err(SnapshotError::QemuImg {
            vm: vm.name.clone(),
            command: shown,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_plain_file_names() {
        for ok in ["s1", "step-07.etcd", "A_b", &"x".repeat(64)] {
            check_name(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["", "-rf", ".hidden", UNDO, "a/b", "with space", "ü", "../x", &"x".repeat(65)] {
            let err = check_name(bad).unwrap_err().to_string();
            assert!(err.contains("cannot name a snapshot"), "{bad}: {err}");
        }
    }

    #[test]
    fn commands_are_qemu_img_snapshot() {
        let c = |op| img_command(op, "s1", Path::new("/lab/worker0/disk.img"));
        assert_eq!(c(Op::Create), ["qemu-img", "snapshot", "-c", "s1", "/lab/worker0/disk.img"]);
        assert_eq!(c(Op::Apply)[2], "-a");
        assert_eq!(c(Op::Delete)[2], "-d");
        assert_eq!(info_command(Path::new("d.img")), ["qemu-img", "info", "-U", "--output=json", "d.img"]);
    }

    #[test]
    fn info_reads_qemu_imgs_json() {
        let json = r#"{"virtual-size": 21474836480, "filename": "disk.img", "format": "qcow2",
            "snapshots": [{"icount": 0, "vm-clock-nsec": 0, "name": "s1", "date-sec": 1764720000,
            "date-nsec": 0, "vm-clock-sec": 0, "id": "1", "vm-state-size": 123456}]}"#;
        let info: DiskInfo = serde_json::from_str(json).unwrap();
        assert!(info.has("s1") && !info.has("s2"));
        assert_eq!(info.snapshots[0].vm_state_size, 123456);
        let raw: DiskInfo = serde_json::from_str(r#"{"format": "raw", "virtual-size": 1}"#).unwrap();
        assert!(raw.snapshots.is_empty());
    }

    #[test]
    fn lease_lines_travel_per_mac() {
        let file = "100 52:52:52:00:00:04 192.168.1.14 worker0 *\n200 52:52:52:00:00:05 192.168.1.15 worker1 *\n";
        assert_eq!(lease_lines(file, "52:52:52:00:00:05"), "200 52:52:52:00:00:05 192.168.1.15 worker1 *\n");
        assert_eq!(lease_lines(file, "52:52:52:00:00:06"), "");
        let now = "300 52:52:52:00:00:04 192.168.1.14 worker0 *\n400 52:52:52:00:00:05 192.168.1.15 worker1 *\n";
        let merged = merge_leases(now, &["52:52:52:00:00:04"], "100 52:52:52:00:00:04 192.168.1.14 worker0 *\n");
        assert_eq!(
            merged,
            "400 52:52:52:00:00:05 192.168.1.15 worker1 *\n100 52:52:52:00:00:04 192.168.1.14 worker0 *\n"
        );
    }

    fn reference() -> Lab {
        kubenet_cluster::load(&kubenet_cluster::Choice::Embedded, Path::new("/lab")).unwrap()
    }

    fn snapshot_of(lab: &Lab, names: &[&str]) -> Manifest {
        let vms = names
            .iter()
            .map(|n| {
                let vm = lab.vm_by_name(n).unwrap();
                VmEntry {
                    name: vm.name.clone(),
                    mac: vm.mac.to_string(),
                    ip: vm.ip,
                    disk_bytes: 0,
                    state_bytes: 0,
                    efi_vars: false,
                    leases: String::new(),
                    live: None,
                }
            })
            .collect();
        Manifest {
            name: "s1".into(),
            taken: 0,
            live: false,
            lab_vms: lab.vms.iter().map(|v| v.name.clone()).collect(),
            vms,
        }
    }

    #[test]
    fn an_entry_is_live_as_it_says_or_as_its_manifest_said_before_entries_said() {
        let lab = reference();
        let mut m = snapshot_of(&lab, &["gateway", "worker0"]);
        m.live = true;
        // A manifest from before: every VM of a live snapshot was saved running.
        let old: Manifest = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert!(!serde_json::to_string(&m).unwrap().contains("\"live\":null"));
        assert!(old.vms.iter().all(|e| old.is_live(e)));
        m.vms[1].live = Some(false);
        m.vms[0].live = Some(true);
        let new: Manifest = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(new.vms.iter().map(|e| new.is_live(e)).collect::<Vec<_>>(), [true, false]);
    }

    #[test]
    fn a_lab_that_moved_on_is_named_vm_by_vm() {
        let lab = reference();
        let all: Vec<&str> = lab.vms.iter().map(|v| v.name.as_str()).collect();
        let m = snapshot_of(&lab, &all);
        let targets: Vec<&VmEntry> = m.vms.iter().collect();
        assert!(differences(&m, &lab, &targets, true, &|_| true).is_empty());

        // worker2 removed from the lab, a new VM added, control0 moved, worker0's disk reset.
        let mut changed = lab.clone();
        changed.vms.retain(|v| v.name != "worker2");
        let mut extra = changed.vms[0].clone();
        extra.name = "extra".into();
        changed.vms.push(extra);
        changed.vms.iter_mut().find(|v| v.name == "control0").unwrap().ip = Ipv4Addr::new(192, 168, 1, 99);
        let d = differences(&m, &changed, &targets, true, &|vm| vm.name != "worker0");
        assert_eq!(
            d,
            [
                "extra: added to the lab since",
                "control0: was 52:52:52:00:00:01 at 192.168.1.11, is now 52:52:52:00:00:01 at 192.168.1.99",
                "worker0: its disk no longer holds the snapshot (reset or made anew since)",
                "worker2: no longer in the lab",
            ]
        );
        // `--vm worker1`: only worker1 is asked about, and it matches.
        let w1: Vec<&VmEntry> = m.vms.iter().filter(|e| e.name == "worker1").collect();
        assert!(differences(&m, &changed, &w1, false, &|vm| vm.name != "worker0").is_empty());
    }
}
