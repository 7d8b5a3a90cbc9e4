//! The VM's disk: a qcow2 overlay backed by the lab's base image, created once and kept across
//! `down`/`up` (only `kubenet reset` replaces it). The backing path is stored relative to the
//! VM's folder, so the state directory can move. The command is data; [`create`] runs it.

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};

use kubenet_cluster::{Arch, Bytes, Lab, Vm};

use crate::files::{VmFiles, relative_to};

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("the base image {path} does not exist: {hint}")]
    NoBaseImage { path: PathBuf, hint: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("`qemu-img create` failed for {disk}: {stderr}")]
    QemuImg { disk: PathBuf, stderr: String },
    #[error(
        "{vm}: disk = {disk} is smaller than its base image {base} ({base_size}): the guest would see a cut file system; set the group's `disk` to at least {base_size}"
    )]
    SmallerThanImage { vm: String, disk: Bytes, base: PathBuf, base_size: Bytes },
}

/// The size the guest sees of an image that starts with `header` (at least 32 bytes read) and
/// is `file_len` bytes long: a qcow2's virtual size (big-endian at byte 24 of its header), or a
/// raw image's length.
pub fn virtual_size(header: &[u8], file_len: u64) -> Bytes {
    match header.get(24..32) {
        Some(size) if image_format(header) == "qcow2" => Bytes(u64::from_be_bytes(size.try_into().expect("8 bytes"))),
        _ => Bytes(file_len),
    }
}

/// The base image's format from its first bytes: qcow2 images start with "QFI\xfb", anything
/// else is taken as raw.
pub fn image_format(header: &[u8]) -> &'static str {
    if header.starts_with(b"QFI\xfb") { "qcow2" } else { "raw" }
}

/// `qemu-img create -f qcow2 -F FORMAT -b BACKING DISK SIZE`, with BACKING relative to the
/// disk's folder (qemu-img resolves it from there).
pub fn overlay_command(backing: &Path, backing_format: &str, disk: &Path, size: Bytes) -> Vec<OsString> {
    let mut v: Vec<OsString> = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", backing_format, "-b"]
        .into_iter()
        .map(OsString::from)
        .collect();
    v.push(backing.as_os_str().to_owned());
    v.push(disk.as_os_str().to_owned());
    v.push(size.0.to_string().into());
    v
}

/// The base image `vm`'s overlay will sit on: its path, format and virtual size, checked
/// against the VM's disk size. Reads the image's header only; makes nothing.
pub fn base_of(lab: &Lab, vm: &Vm) -> Result<(PathBuf, &'static str, Bytes), DiskError> {
    let base = crate::files::base_image(lab, vm, Arch::HOST);
    let io = |source| DiskError::Io { path: base.clone(), source };
    let mut header = Vec::with_capacity(32);
    let base_size = match std::fs::File::open(&base) {
        Ok(f) => {
            let len = f.metadata().map_err(io)?.len();
            f.take(32).read_to_end(&mut header).map_err(io)?;
            virtual_size(&header, len)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let hint = match vm.image_url_for(Arch::HOST) {
                Some(url) => format!("run `kubenet image pull` to download it from {url} and check its SHA-256"),
                None => "put a cloud image there, or point the group's `image` (and `image_url`) elsewhere".into(),
            };
            return Err(DiskError::NoBaseImage { path: base, hint });
        }
        Err(e) => return Err(io(e)),
    };
    if vm.disk < base_size {
        return Err(DiskError::SmallerThanImage { vm: vm.name.clone(), disk: vm.disk, base, base_size });
    }
    Ok((base, image_format(&header), base_size))
}

/// What [`create`] would refuse, found without making anything: a VM whose overlay exists
/// passes; else its base image must be there and fit.
pub fn check(lab: &Lab, vm: &Vm) -> Result<(), DiskError> {
    if VmFiles::new(lab, vm).disk().exists() { Ok(()) } else { base_of(lab, vm).map(drop) }
}

/// Creates the VM's overlay unless it exists. Returns whether it made one.
pub fn create(lab: &Lab, vm: &Vm) -> Result<bool, DiskError> {
    let files = VmFiles::new(lab, vm);
    let disk = files.disk();
    if disk.exists() {
        return Ok(false);
    }
    let (base, format, _) = base_of(lab, vm)?;
    std::fs::create_dir_all(&files.dir).map_err(|source| DiskError::Io { path: files.dir.clone(), source })?;
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let backing = relative_to(&abs(&base), &abs(&files.dir));
    let cmd = overlay_command(&backing, format, Path::new("disk.img"), vm.disk);
    let out = std::process::Command::new(&cmd[0])
        .args(&cmd[1..])
        .current_dir(&files.dir)
        .output()
        .map_err(|e| DiskError::QemuImg { disk: disk.clone(), stderr: format!("cannot run qemu-img: {e}") })?;
    if !out.status.success() {
        return Err(DiskError::QemuImg { disk, stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned() });
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtual_size_of_qcow2_and_raw() {
        let mut qcow2 = b"QFI\xfb\0\0\0\x03".to_vec();
        qcow2.resize(32, 0);
        qcow2[24..32].copy_from_slice(&(3_758_096_384u64).to_be_bytes());
        assert_eq!(virtual_size(&qcow2, 600 << 20), Bytes(3_758_096_384), "the header's size, not the file's");
        assert_eq!(virtual_size(&[0xeb; 32], 2 << 30), Bytes(2 << 30), "raw: the file's length");
    }

    #[test]
    fn format_sniffing() {
        assert_eq!(image_format(b"QFI\xfb\0\0\0\x03"), "qcow2");
        assert_eq!(image_format(b"\xeb\x63\x90\x10"), "raw");
        assert_eq!(image_format(b""), "raw");
    }

    #[test]
    fn overlay_command_is_relative_and_sized() {
        let c = overlay_command(Path::new("../images/base.img"), "qcow2", Path::new("disk.img"), Bytes(20 << 30));
        let c: Vec<String> = c.iter().map(|s| s.to_string_lossy().into_owned()).collect();
        assert_eq!(
            c,
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                "-b",
                "../images/base.img",
                "disk.img",
                "21474836480"
            ]
        );
    }
}
