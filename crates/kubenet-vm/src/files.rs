//! Where things live. One folder per VM under the state directory, named after the VM, holding
//! everything that VM owns, so `rm -r STATE/worker0` forgets it completely; lab-wide SSH files
//! beside them. Pure: paths only.
//!
//! One exception to "everything in the VM's folder": on macOS QEMU starts as root (vmnet needs
//! it) and writes its pidfile by path before it drops root, so the pidfile lives in a runtime
//! directory only root can write, one per lab ([`run_dir`]), where no link of the owner's can
//! send that write elsewhere. On Linux QEMU runs as the owner and the pidfile stays in the folder.

use std::path::{Path, PathBuf};

use kubenet_cluster::{Arch, Lab, Os, Vm};

/// The base image of `vm` on a host of architecture `host`, absolute: the group's `image`
/// (`{arch}` replaced by the guest's architecture) from the state directory.
pub fn base_image(lab: &Lab, vm: &Vm, host: Arch) -> PathBuf {
    lab.state_dir.join(vm.image_for(host))
}

/// Where root keeps the runtime files of all labs on macOS (`/var/run` is root's, 0755).
pub const MACOS_RUN_ROOT: &str = "/var/run/kubenet";

/// The root-owned runtime directory of the lab in `state_dir` on `os`, if that OS needs one:
/// macOS, `/var/run/kubenet/<lab id>`, the id a short hash of the state directory so that two
/// labs of one host (or of two users) never share one. Linux needs none.
pub fn run_dir(state_dir: &Path, os: Os) -> Option<PathBuf> {
    match os {
        Os::Linux => None,
        Os::MacOs => Some(Path::new(MACOS_RUN_ROOT).join(lab_id(state_dir))),
    }
}

/// 16 hex digits of the SHA-256 of the state directory's path: stable across restarts of the
/// agent and the same for the CLI, which finds the pidfile by it too.
pub fn lab_id(state_dir: &Path) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(state_dir.as_os_str().as_encoded_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// One VM's files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmFiles {
    pub dir: PathBuf,
    /// The VM's name, which names its pidfile in `run_dir`.
    pub name: String,
    /// The lab's root-owned runtime directory ([`run_dir`]), where the pidfile goes when set.
    pub run_dir: Option<PathBuf>,
}

impl VmFiles {
    /// The files of `vm` on this host.
    pub fn new(lab: &Lab, vm: &Vm) -> Self {
        VmFiles::for_os(lab, vm, Os::HOST.unwrap_or(Os::Linux))
    }
    /// The files of `vm` on a host running `os`.
    pub fn for_os(lab: &Lab, vm: &Vm, os: Os) -> Self {
        VmFiles { dir: lab.vm_dir(vm), name: vm.name.clone(), run_dir: run_dir(&lab.state_dir, os) }
    }
    /// The qcow2 overlay backed by the base image.
    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk.img")
    }
    /// The cloud-init NoCloud seed (ISO 9660, volume id `cidata`).
    pub fn seed(&self) -> PathBuf {
        self.dir.join("seed.iso")
    }
    /// The VM's SSH host key (OpenSSH private key format), injected through cloud-init.
    pub fn host_key(&self) -> PathBuf {
        self.dir.join("ssh_host_ed25519_key")
    }
    /// The UEFI variable store, a private copy of the firmware's template.
    pub fn efi_vars(&self) -> PathBuf {
        self.dir.join("efi-vars.fd")
    }
    /// Everything the serial console printed since the VM started.
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    /// The serial console, for `kubenet console`.
    pub fn serial_socket(&self) -> PathBuf {
        self.dir.join("serial.sock")
    }
    /// QEMU's machine protocol socket.
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    /// QEMU's pid, written by QEMU itself (`-pidfile`): in the VM's folder, or on macOS, where
    /// QEMU writes it as root, in the lab's runtime directory as `<vm>.pid`.
    pub fn pidfile(&self) -> PathBuf {
        match &self.run_dir {
            Some(run) => run.join(format!("{}.pid", self.name)),
            None => self.dir.join("qemu.pid"),
        }
    }
    /// QEMU's own messages (stderr) from the last start.
    pub fn qemu_log(&self) -> PathBuf {
        self.dir.join("qemu.log")
    }
}

/// The lab's SSH files in the state directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabFiles {
    pub dir: PathBuf,
}

impl LabFiles {
    pub fn new(lab: &Lab) -> Self {
        LabFiles { dir: lab.state_dir.clone() }
    }
    /// Every VM's host key under its name, FQDN and address.
    pub fn known_hosts(&self) -> PathBuf {
        self.dir.join("known_hosts")
    }
    /// `ssh -F STATE/ssh_config worker0`.
    pub fn ssh_config(&self) -> PathBuf {
        self.dir.join("ssh_config")
    }
    /// The login key kubenet generates when the user has none.
    pub fn lab_key(&self) -> PathBuf {
        self.dir.join("id_ed25519")
    }
    /// The lab's snapshots, one folder each.
    pub fn snapshots(&self) -> PathBuf {
        self.dir.join("snapshots")
    }

    /// Every path kubenet makes in the state directory for `lab`, whether it exists yet or
    /// not: what `kubenet destroy` removes. Base images and the lab definition are not kubenet's.
    pub fn made(&self, lab: &Lab) -> Vec<PathBuf> {
        let mut paths: Vec<PathBuf> = lab.vms.iter().map(|vm| lab.vm_dir(vm)).collect();
        let key = self.lab_key();
        paths.extend([
            lab.lease_file(),
            self.known_hosts(),
            self.ssh_config(),
            key.with_extension("pub"),
            key,
            self.snapshots(),
        ]);
        paths
    }
}

/// `path` relative to directory `from`, both absolute or both relative to the same place
/// (`../images/base.img`), so a disk overlay keeps finding its base when the folder moves.
pub fn relative_to(path: &Path, from: &Path) -> PathBuf {
    use std::path::Component;
    let p: Vec<Component> = path.components().collect();
    let f: Vec<Component> = from.components().filter(|c| *c != Component::CurDir).collect();
    let p: Vec<Component> = p.into_iter().filter(|c| *c != Component::CurDir).collect();
    let common = p.iter().zip(&f).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..f.len() {
        out.push("..");
    }
    for c in &p[common..] {
        out.push(c.as_os_str());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_kubenet_made_is_every_vm_folder_and_the_labs_files_never_the_images() {
        let lab = kubenet_cluster::load(&kubenet_cluster::Choice::Embedded, Path::new("/lab")).unwrap();
        let made = LabFiles::new(&lab).made(&lab);
        let names: Vec<String> = made.iter().map(|p| p.strip_prefix("/lab").unwrap().display().to_string()).collect();
        assert_eq!(
            names,
            [
                "gateway",
                "control0",
                "control1",
                "control2",
                "worker0",
                "worker1",
                "worker2",
                "leases",
                "known_hosts",
                "ssh_config",
                "id_ed25519.pub",
                "id_ed25519",
                "snapshots"
            ]
        );
        assert!(made.iter().all(|p| !p.starts_with(lab.state_dir.join("images"))));
    }

    #[test]
    fn the_pidfile_is_in_the_vm_folder_on_linux_and_in_roots_runtime_directory_on_macos() {
        let lab = kubenet_cluster::load(&kubenet_cluster::Choice::Embedded, Path::new("/lab")).unwrap();
        let vm = lab.vm_by_name("worker0").unwrap();
        let linux = VmFiles::for_os(&lab, vm, Os::Linux);
        assert_eq!(linux.pidfile(), Path::new("/lab/worker0/qemu.pid"));
        let mac = VmFiles::for_os(&lab, vm, Os::MacOs);
        let id = lab_id(Path::new("/lab"));
        assert_eq!(id.len(), 16);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        assert_eq!(mac.pidfile(), PathBuf::from(format!("/var/run/kubenet/{id}/worker0.pid")));
        // Everything else stays in the owner's folder on both.
        assert_eq!(mac.disk(), linux.disk());
        assert_eq!(mac.qmp_socket(), Path::new("/lab/worker0/qmp.sock"));
        // Another lab gets another directory; the same lab always the same one.
        assert_ne!(lab_id(Path::new("/lab2")), id);
        assert_eq!(lab_id(Path::new("/lab")), id);
    }

    #[test]
    fn relative_paths_climb_out_of_the_vm_folder() {
        assert_eq!(
            relative_to(Path::new("/lab/images/base.img"), Path::new("/lab/worker0")),
            PathBuf::from("../images/base.img")
        );
        assert_eq!(relative_to(Path::new("/lab/worker0/x"), Path::new("/lab/worker0")), PathBuf::from("x"));
        assert_eq!(relative_to(Path::new("/img/b.img"), Path::new("/a/b/c")), PathBuf::from("../../../img/b.img"));
        assert_eq!(relative_to(Path::new("./images/b"), Path::new("./w")), PathBuf::from("../images/b"));
    }
}
