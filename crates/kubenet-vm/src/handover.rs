//! What the agent opens for QEMU, so that a QEMU started as root (macOS: vmnet needs root when
//! QEMU starts, and QEMU drops root only after it has opened its drives and chardevs) opens no
//! file of the owner's by path. libvirt's model: the privileged side opens each file the guest
//! gets with the owner's rights ([`crate::owner::Owner::run_as`]), checks it is a regular file
//! and not a link, and hands QEMU the descriptor (`-add-fd` and `/dev/fdset/N`, see
//! [`crate::qemu::FdNumbers`]). A qcow2 disk's backing file is checked to be one of the lab's
//! images and is passed the same way, and a base image with a backing file of its own is refused.
//! The serial and QMP sockets are bound as the owner and passed listening.
//!
//! The code is the same on every OS (a Linux test runs it against a real QEMU); which platform
//! uses it is data ([`crate::qemu::HostProfile::files_by_fd`]). Header parsing is pure; the
//! rest is I/O.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Component, Path, PathBuf};

use crate::files::VmFiles;
use crate::qemu::FdNumbers;

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0} is not a regular file: QEMU is given regular files of the owner's only")]
    NotRegular(PathBuf),
    #[error("{0} changed while it was being opened: try again")]
    Swapped(PathBuf),
    #[error("{path}: not a usable qcow2 image: {why}")]
    BadImage { path: PathBuf, why: &'static str },
    #[error(
        "{0} has no backing file: a VM's disk is an overlay on one of the lab's images (`kubenet reset` makes it again)"
    )]
    NoBacking(PathBuf),
    #[error(
        "{disk}: its backing file `{backing}` is not in the lab's images folder {images}: refusing to give it to the guest (`kubenet reset` makes the disk again)"
    )]
    BackingOutside { disk: PathBuf, backing: String, images: PathBuf },
    #[error(
        "the base image {0} has a backing file of its own: use a base image that stands alone (`qemu-img convert -O qcow2 IN OUT` makes one)"
    )]
    BaseHasBacking(PathBuf),
    #[error("the runtime directory {path} is not safe for root to write in: {why}")]
    RunDir { path: PathBuf, why: String },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> HandoverError + use<> {
    let path = path.to_path_buf();
    move |source| HandoverError::Io { path, source }
}

/// The qcow2 magic, "QFI\xfb" (qcow2 spec, "Header", bytes 0-3).
const QCOW2_MAGIC: &[u8] = b"QFI\xfb";
/// QEMU refuses backing file names longer than this (qcow2 spec: backing_file_size <= 1023).
const MAX_BACKING_NAME: u32 = 1023;

/// Where a qcow2 image's backing file name is, from its first 20 bytes: `None` when it has
/// none. qcow2 spec, "Header": backing_file_offset is a big-endian u64 at byte 8 (0: no backing
/// file), backing_file_size a big-endian u32 at byte 16.
pub fn qcow2_backing(header: &[u8]) -> Result<Option<(u64, u32)>, &'static str> {
    if !header.starts_with(QCOW2_MAGIC) {
        return Err("no qcow2 magic");
    }
    let (Some(off), Some(size)) = (header.get(8..16), header.get(16..20)) else {
        return Err("header cut short");
    };
    let off = u64::from_be_bytes(off.try_into().expect("8 bytes"));
    let size = u32::from_be_bytes(size.try_into().expect("4 bytes"));
    match (off, size) {
        (0, _) => Ok(None),
        (_, 0) => Err("empty backing file name"),
        (_, n) if n > MAX_BACKING_NAME => Err("backing file name longer than 1023 bytes"),
        (o, n) => Ok(Some((o, n))),
    }
}

/// `path` with `.` and `..` taken away by name alone, the way QEMU joins a relative backing
/// name to the overlay's folder. Never touches the file system.
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            c => out.push(c.as_os_str()),
        }
    }
    out
}

/// The base image the overlay in `vm_dir` names (`backing`, as stored in its header, relative
/// to the overlay's folder or absolute), if it is inside `images` or is `base` (the lab's
/// image for the VM, [`crate::files::base_image`]); else `None`. Pure.
pub fn backing_in_lab(backing: &Path, vm_dir: &Path, images: &Path, base: &Path) -> Option<PathBuf> {
    let path = lexical(&vm_dir.join(backing));
    let images = lexical(images);
    (path != images && path.starts_with(&images) || path == lexical(base)).then_some(path)
}

/// Opens `path` with `flags` (an access mode, maybe `O_APPEND|O_CREAT`), never through a link
/// at its last component, and only if it is a regular file: a FIFO or a device of the owner's
/// would hang the agent or give the guest a host device. Run as the owner.
fn open_regular(path: &Path, flags: libc::c_int) -> Result<File, HandoverError> {
    let mut o = std::fs::OpenOptions::new();
    match flags & libc::O_ACCMODE {
        libc::O_RDONLY => o.read(true),
        libc::O_WRONLY => o.write(true),
        _ => o.read(true).write(true),
    };
    if flags & libc::O_CREAT != 0 {
        o.create(true).mode(0o600);
    }
    // O_NONBLOCK: opening a FIFO does not wait for a writer; cleared again below.
    let extra = flags & libc::O_APPEND | libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_NONBLOCK;
    let f = o.custom_flags(extra).open(path).map_err(io_at(path))?;
    if !f.metadata().map_err(io_at(path))?.is_file() {
        return Err(HandoverError::NotRegular(path.to_path_buf()));
    }
    // SAFETY: fcntl on a descriptor this function owns.
    let fl = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if fl < 0 || unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK) } < 0 {
        return Err(io_at(path)(io::Error::last_os_error()));
    }
    Ok(f)
}

/// `path` opened read-write and read-only, both the same file (an owner who swaps the file
/// between the two opens gets an error, not two files).
fn open_pair(path: &Path) -> Result<(File, File), HandoverError> {
    let rw = open_regular(path, libc::O_RDWR)?;
    let ro = open_regular(path, libc::O_RDONLY)?;
    let (a, b) = (rw.metadata().map_err(io_at(path))?, ro.metadata().map_err(io_at(path))?);
    if (a.dev(), a.ino()) != (b.dev(), b.ino()) {
        return Err(HandoverError::Swapped(path.to_path_buf()));
    }
    Ok((rw, ro))
}

/// Everything QEMU gets from the agent for one VM, open.
#[derive(Debug)]
pub struct Opened {
    pub efi_vars: Option<(OwnedFd, OwnedFd)>,
    pub disk: (OwnedFd, OwnedFd),
    pub base: OwnedFd,
    pub base_format: &'static str,
    pub seed: OwnedFd,
    pub console_log: OwnedFd,
    pub serial: UnixListener,
    pub qmp: UnixListener,
}

/// What [`open`] needs to know beyond the VM's files.
#[derive(Clone, Debug)]
pub struct Wants<'a> {
    /// The lab's images folder (the state directory's `images`).
    pub images: &'a Path,
    /// The VM's base image as the lab names it ([`crate::files::base_image`]).
    pub base: &'a Path,
    /// Whether the firmware is UEFI, with a variable store per VM.
    pub efi_vars: bool,
}

/// Opens the VM's files and binds its sockets, for QEMU. Run as the owner
/// ([`crate::owner::Owner::run_as`]), after stale sockets are gone: every file is then one the
/// owner could open, and the sockets are the owner's. Refuses a disk whose backing file is
/// not one of the lab's images, and a base image that has a backing file of its own.
pub fn open(files: &VmFiles, wants: &Wants) -> Result<Opened, HandoverError> {
    let efi_vars = if wants.efi_vars { Some(open_pair(&files.efi_vars())?) } else { None };
    let disk_path = files.disk();
    let disk = open_pair(&disk_path)?;
    let (base_path, base) = open_base(&disk_path, &disk.0, &files.dir, wants)?;
    let mut header = [0u8; 32];
    let n = read_at_most(&base, &mut header).map_err(io_at(&base_path))?;
    let base_format = crate::disk::image_format(&header[..n]);
    if base_format == "qcow2" {
        match qcow2_backing(&header[..n]) {
            Ok(None) => {}
            Ok(Some(_)) => return Err(HandoverError::BaseHasBacking(base_path)),
            Err(why) => return Err(HandoverError::BadImage { path: base_path, why }),
        }
    }
    let seed = open_regular(&files.seed(), libc::O_RDONLY)?;
    let log = files.console_log();
    let console_log = open_regular(&log, libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT)?;
    let bind = |p: PathBuf| UnixListener::bind(&p).map_err(io_at(&p));
    Ok(Opened {
        efi_vars: efi_vars.map(|(rw, ro)| (rw.into(), ro.into())),
        disk: (disk.0.into(), disk.1.into()),
        base: base.into(),
        base_format,
        seed: seed.into(),
        console_log: console_log.into(),
        serial: bind(files.serial_socket())?,
        qmp: bind(files.qmp_socket())?,
    })
}

/// The overlay's base image, named in its header (read from the descriptor already open, so
/// the file checked is the file QEMU gets), checked to be the lab's, and opened read-only.
fn open_base(disk_path: &Path, disk: &File, vm_dir: &Path, wants: &Wants) -> Result<(PathBuf, File), HandoverError> {
    let mut header = [0u8; 20];
    let n = read_at_most(disk, &mut header).map_err(io_at(disk_path))?;
    let bad = |why| HandoverError::BadImage { path: disk_path.to_path_buf(), why };
    let (off, size) = qcow2_backing(&header[..n]).map_err(bad)?.ok_or(HandoverError::NoBacking(disk_path.into()))?;
    let mut name = vec![0u8; size as usize];
    disk.read_exact_at(&mut name, off).map_err(io_at(disk_path))?;
    use std::os::unix::ffi::OsStrExt;
    let backing = Path::new(std::ffi::OsStr::from_bytes(&name));
    let outside = || HandoverError::BackingOutside {
        disk: disk_path.to_path_buf(),
        backing: backing.display().to_string(),
        images: wants.images.to_path_buf(),
    };
    let path = backing_in_lab(backing, vm_dir, wants.images, wants.base).ok_or_else(outside)?;
    let file = open_regular(&path, libc::O_RDONLY)?;
    Ok((path, file))
}

/// Reads up to `buf.len()` bytes from the start of `f`; a shorter file gives fewer.
fn read_at_most(f: &File, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], got as u64)? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

impl Opened {
    /// The numbers QEMU finds each at: their own, since [`passed`](Opened::passed) keeps them.
    pub fn numbers(&self) -> FdNumbers {
        let raw = |f: &OwnedFd| f.as_raw_fd();
        FdNumbers {
            efi_vars: self.efi_vars.as_ref().map(|(rw, ro)| (raw(rw), raw(ro))),
            disk: (raw(&self.disk.0), raw(&self.disk.1)),
            base: raw(&self.base),
            seed: raw(&self.seed),
            console_log: raw(&self.console_log),
            serial: self.serial.as_raw_fd(),
            qmp: self.qmp.as_raw_fd(),
            base_format: self.base_format,
        }
    }

    /// Every descriptor with the number it has in QEMU (its own: no renumbering, so none can
    /// land on another, nor on the pipe std keeps to report a failed exec).
    pub fn passed(&self) -> Vec<(BorrowedFd<'_>, RawFd)> {
        let mut fds: Vec<BorrowedFd> = Vec::new();
        if let Some((rw, ro)) = &self.efi_vars {
            fds.extend([rw.as_fd(), ro.as_fd()]);
        }
        fds.extend([
            self.disk.0.as_fd(),
            self.disk.1.as_fd(),
            self.base.as_fd(),
            self.seed.as_fd(),
            self.console_log.as_fd(),
            self.serial.as_fd(),
            self.qmp.as_fd(),
        ]);
        fds.into_iter().map(|f| (f, f.as_raw_fd())).collect()
    }
}

/// Makes the runtime directory `dir` and its parent (`/var/run/kubenet/<lab id>`), or checks
/// them: each a directory, not a link, owned by the agent's user (root) and writable by no one
/// else, so that the pidfile QEMU writes there as root goes nowhere the owner chose. Removes
/// the VM's stale `pidfile` (unlink does not follow links). Run as root, not as the owner.
pub fn make_run_dir(dir: &Path, pidfile: &Path) -> Result<(), HandoverError> {
    use std::os::unix::fs::DirBuilderExt;
    let me = nix::unistd::geteuid().as_raw();
    for d in [dir.parent(), Some(dir)].into_iter().flatten() {
        match std::fs::DirBuilder::new().mode(0o755).create(d) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(io_at(d)(e)),
            _ => {}
        }
        let meta = std::fs::symlink_metadata(d).map_err(io_at(d))?;
        let why = if !meta.file_type().is_dir() {
            Some("not a directory (a link?)".to_owned())
        } else if meta.uid() != me {
            Some(format!("owned by uid {}, not {me}", meta.uid()))
        } else if meta.mode() & 0o022 != 0 {
            Some(format!("mode {:o} lets others write in it", meta.mode() & 0o7777))
        } else {
            None
        };
        if let Some(why) = why {
            return Err(HandoverError::RunDir { path: d.to_path_buf(), why });
        }
    }
    match std::fs::remove_file(pidfile) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_at(pidfile)(e)),
        _ => Ok(()),
    }
}

/// Lets the owner read the pidfile QEMU wrote as root in the runtime directory: QEMU makes it
/// 0600, and the owner's own `kubenet status` finds its VMs through it. Done on the descriptor,
/// not the path, and only to a regular file of root's. Run as root.
pub fn publish_pidfile(pidfile: &Path) -> Result<(), HandoverError> {
    let f = open_regular(pidfile, libc::O_RDONLY)?;
    let meta = f.metadata().map_err(io_at(pidfile))?;
    if meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(HandoverError::RunDir { path: pidfile.to_path_buf(), why: format!("owned by uid {}", meta.uid()) });
    }
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(std::fs::Permissions::from_mode(0o644)).map_err(io_at(pidfile))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(off: u64, size: u32) -> Vec<u8> {
        let mut h = b"QFI\xfb\0\0\0\x03".to_vec();
        h.extend(off.to_be_bytes());
        h.extend(size.to_be_bytes());
        h
    }

    #[test]
    fn the_qcow2_header_says_where_the_backing_name_is() {
        assert_eq!(qcow2_backing(&header(0, 0)), Ok(None));
        assert_eq!(qcow2_backing(&header(0x200, 27)), Ok(Some((0x200, 27))));
        assert!(qcow2_backing(&header(0x200, 0)).is_err());
        assert!(qcow2_backing(&header(0x200, 1024)).is_err());
        assert_eq!(qcow2_backing(&header(0x200, 1023)), Ok(Some((0x200, 1023))));
        assert_eq!(qcow2_backing(b"\0\0\0\0raw image data here"), Err("no qcow2 magic"));
        assert_eq!(qcow2_backing(&header(0x200, 27)[..19]), Err("header cut short"));
    }

    #[test]
    fn a_backing_file_must_be_one_of_the_labs_images() {
        let (vm, images, base) = (Path::new("/lab/w0"), Path::new("/lab/images"), Path::new("/lab/images/u.img"));
        let ok = |b: &str| backing_in_lab(Path::new(b), vm, images, base);
        assert_eq!(ok("../images/u.img"), Some(PathBuf::from("/lab/images/u.img")));
        assert_eq!(ok("/lab/images/other.qcow2"), Some(PathBuf::from("/lab/images/other.qcow2")));
        assert_eq!(ok("./../images/sub/x.img"), Some(PathBuf::from("/lab/images/sub/x.img")));
        for bad in
            ["/etc/shadow", "../../etc/shadow", "../images/../../etc/shadow", "../images", "disk.img", "/dev/sda"]
        {
            assert_eq!(ok(bad), None, "{bad}");
        }
        // A base image the lab names outside images/ is the lab's too.
        let elsewhere = Path::new("/srv/base.qcow2");
        assert_eq!(backing_in_lab(elsewhere, vm, images, elsewhere), Some(elsewhere.to_path_buf()));
    }

    fn lab_folder() -> (tempfile::TempDir, VmFiles) {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("images")).unwrap();
        std::fs::create_dir_all(d.path().join("w0")).unwrap();
        let files = VmFiles { dir: d.path().join("w0"), name: "w0".into(), run_dir: None };
        (d, files)
    }

    /// A qcow2 overlay naming `backing` (the name at byte 0x200), and seed, vars and base files.
    fn write_vm(files: &VmFiles, backing: &str, base: &[u8]) {
        let mut disk = header(0x200, backing.len() as u32);
        disk.resize(0x200, 0);
        disk.extend(backing.as_bytes());
        std::fs::write(files.disk(), disk).unwrap();
        std::fs::write(files.seed(), "seed").unwrap();
        std::fs::write(files.efi_vars(), "vars").unwrap();
        std::fs::write(files.dir.join("../images/base.img"), base).unwrap();
    }

    fn wants(d: &Path) -> (PathBuf, PathBuf) {
        (d.join("images"), d.join("images/base.img"))
    }

    #[test]
    fn the_files_open_with_the_right_modes_and_the_sockets_listen() {
        let (d, files) = lab_folder();
        write_vm(&files, "../images/base.img", &header(0, 0));
        let (images, base) = wants(d.path());
        let o = open(&files, &Wants { images: &images, base: &base, efi_vars: true }).unwrap();
        // SAFETY: fcntl F_GETFL only reads a descriptor's flags.
        let mode = |f: RawFd| unsafe { libc::fcntl(f, libc::F_GETFL) };
        let n = o.numbers();
        assert_eq!(n.base_format, "qcow2");
        assert_eq!(mode(n.disk.0) & libc::O_ACCMODE, libc::O_RDWR);
        assert_eq!(mode(n.disk.1) & libc::O_ACCMODE, libc::O_RDONLY);
        assert_eq!(mode(n.base) & libc::O_ACCMODE, libc::O_RDONLY);
        assert_eq!(mode(n.efi_vars.unwrap().0) & libc::O_ACCMODE, libc::O_RDWR);
        assert_eq!(mode(n.console_log) & (libc::O_ACCMODE | libc::O_APPEND), libc::O_WRONLY | libc::O_APPEND);
        assert_eq!(mode(n.seed) & libc::O_NONBLOCK, 0);
        // Every descriptor is close-on-exec until handed over, and kept at its own number.
        let passed = o.passed();
        assert_eq!(passed.len(), 9);
        assert!(passed.iter().all(|(f, n)| f.as_raw_fd() == *n));
        // SAFETY: fcntl F_GETFD only reads a descriptor's flags.
        let flags = |n: RawFd| unsafe { libc::fcntl(n, libc::F_GETFD) };
        assert!(passed.iter().all(|(_, n)| flags(*n) & libc::FD_CLOEXEC != 0));
        std::os::unix::net::UnixStream::connect(files.qmp_socket()).unwrap();
        std::os::unix::net::UnixStream::connect(files.serial_socket()).unwrap();
        assert!(files.console_log().is_file());
        // A raw base image is passed as raw.
        drop(o);
        for s in [files.qmp_socket(), files.serial_socket()] {
            std::fs::remove_file(s).unwrap();
        }
        std::fs::write(&base, b"\0raw").unwrap();
        let o = open(&files, &Wants { images: &images, base: &base, efi_vars: false }).unwrap();
        assert_eq!((o.numbers().base_format, o.numbers().efi_vars), ("raw", None));
    }

    #[test]
    fn links_devices_foreign_backing_files_and_chained_bases_are_refused() {
        let (d, files) = lab_folder();
        let (images, base) = wants(d.path());
        let w = Wants { images: &images, base: &base, efi_vars: false };
        let secret = d.path().join("secret");
        std::fs::write(&secret, "root only").unwrap();

        // The seed as a link to another file.
        write_vm(&files, "../images/base.img", &header(0, 0));
        std::fs::remove_file(files.seed()).unwrap();
        std::os::unix::fs::symlink(&secret, files.seed()).unwrap();
        let e = open(&files, &w).unwrap_err();
        assert!(
            matches!(&e, HandoverError::Io { path, source } if path == &files.seed() && source.raw_os_error() == Some(libc::ELOOP)),
            "{e}"
        );
        // ... or a device.
        std::fs::remove_file(files.seed()).unwrap();
        std::os::unix::fs::symlink("/dev/null", files.seed()).unwrap();
        assert!(open(&files, &w).is_err());
        std::fs::remove_file(files.seed()).unwrap();
        // A FIFO neither hangs the agent nor is taken.
        nix_mkfifo(&files.seed());
        assert!(matches!(open(&files, &w), Err(HandoverError::NotRegular(p)) if p == files.seed()));
        std::fs::remove_file(files.seed()).unwrap();

        // The overlay naming a file outside the images.
        write_vm(&files, "../secret", &header(0, 0));
        let e = open(&files, &w).unwrap_err().to_string();
        assert!(e.contains("its backing file `../secret` is not in the lab's images folder"), "{e}");
        // A base image with a backing file of its own.
        write_vm(&files, "../images/base.img", &header(0x200, 9));
        let e = open(&files, &w).unwrap_err();
        assert!(matches!(&e, HandoverError::BaseHasBacking(p) if p == &base), "{e}");
        // The base image as a link.
        write_vm(&files, "../images/base.img", &header(0, 0));
        std::fs::remove_file(&base).unwrap();
        std::os::unix::fs::symlink(&secret, &base).unwrap();
        assert!(open(&files, &w).is_err());
        // An overlay with no backing file at all, and a disk that is not qcow2.
        std::fs::write(files.disk(), header(0, 0)).unwrap();
        assert!(matches!(open(&files, &w), Err(HandoverError::NoBacking(_))));
        std::fs::write(files.disk(), "raw").unwrap();
        assert!(matches!(open(&files, &w), Err(HandoverError::BadImage { .. })));
    }

    fn nix_mkfifo(p: &Path) {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    #[test]
    fn the_runtime_directory_is_roots_alone() {
        let d = tempfile::tempdir().unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let run = d.path().join("kubenet/abc");
        let pid = run.join("w0.pid");
        make_run_dir(&run, &pid).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!((mode(&run), mode(run.parent().unwrap())), (0o755, 0o755));
        // A stale pidfile goes; a second call finds everything in order.
        std::fs::write(&pid, "1").unwrap();
        make_run_dir(&run, &pid).unwrap();
        assert!(!pid.exists());
        // Writable by others: refused, naming it.
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = make_run_dir(&run, &pid).unwrap_err().to_string();
        assert!(e.contains("lets others write in it") && e.contains("kubenet/abc"), "{e}");
        // A link in its place: refused, and nothing made where it points.
        std::fs::remove_dir(&run).unwrap();
        let elsewhere = d.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &run).unwrap();
        let e = make_run_dir(&run, &pid).unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");
    }

    #[test]
    fn the_pidfile_is_made_readable_on_its_descriptor_only() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let pid = d.path().join("w0.pid");
        std::fs::write(&pid, "42\n").unwrap();
        std::fs::set_permissions(&pid, std::fs::Permissions::from_mode(0o600)).unwrap();
        publish_pidfile(&pid).unwrap();
        assert_eq!(std::fs::metadata(&pid).unwrap().permissions().mode() & 0o777, 0o644);
        // A link in its place is not followed: its target keeps its mode.
        let target = d.path().join("target");
        std::fs::write(&target, "x").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::remove_file(&pid).unwrap();
        std::os::unix::fs::symlink(&target, &pid).unwrap();
        assert!(publish_pidfile(&pid).is_err());
        assert_eq!(std::fs::metadata(&target).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
