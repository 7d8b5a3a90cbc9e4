//! Writing the lab's state files (leases, keys, seeds, SSH files) so that a crash or a full disk
//! never leaves a torn one: a temporary file beside it, fsync, rename, fsync of the folder. I/O.

use std::io::Write;
use std::path::Path;

/// Seconds since the Unix epoch (0 on a clock set before it): the time lease files, snapshot
/// manifests and VM states are written in.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A small text file that someone else may have put there (the lab definition, a public key,
/// read by the root agent too): opened without blocking (a FIFO cannot hang the reader), only a
/// regular file, and at most `cap` bytes (a longer one, or /dev/zero, is an error, not memory).
pub fn read_capped(path: &Path, cap: u64) -> std::io::Result<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc_nonblock()).open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut text = String::new();
    f.take(cap + 1).read_to_string(&mut text)?;
    if text.len() as u64 > cap {
        return Err(std::io::Error::other(format!("longer than {cap} bytes")));
    }
    Ok(text)
}

/// O_NONBLOCK: 0o4000 on Linux, 0x4 on macOS and the BSDs.
fn libc_nonblock() -> i32 {
    if cfg!(target_os = "linux") { 0o4000 } else { 0x4 }
}

/// Replaces `path` with `contents` atomically; the file gets `mode` (less the umask), whatever
/// the mode of the file it replaces or of a temporary one a crash left.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    write_atomic_with(path, mode, |w| w.write_all(contents))
}

/// [`write_atomic`] for contents made as they are written: `fill` writes them through a buffer
/// into the temporary file, so a big file (a lease table) is never whole in memory.
pub fn write_atomic_with(
    path: &Path,
    mode: u32,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    // A temporary file left by a crash keeps its old mode if opened again: start anew.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    {
        let f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        let mut out = std::io::BufWriter::new(f);
        fill(&mut out)?;
        out.into_inner().map_err(std::io::IntoInnerError::into_error)?.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod read_tests {
    use super::read_capped;

    #[test]
    fn only_a_small_regular_file_is_read() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("kubenet.toml");
        std::fs::write(&p, "a = 1\n").unwrap();
        assert_eq!(read_capped(&p, 6).unwrap(), "a = 1\n");
        assert!(read_capped(&p, 5).unwrap_err().to_string().contains("longer than 5 bytes"));
        assert!(read_capped(std::path::Path::new("/dev/zero"), 1 << 20).unwrap_err().to_string().contains("regular"));
        // A FIFO with no writer: opened and refused at once, not waited on.
        let fifo = d.path().join("fifo");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        assert!(read_capped(&fifo, 1 << 20).unwrap_err().to_string().contains("regular"));
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_left_over_temporary_does_not_pass_on_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("seed.iso");
        let tmp = dir.path().join(".seed.iso.tmp");
        std::fs::write(&tmp, b"half").unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_atomic(&p, b"whole", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"whole");
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(!tmp.exists());
    }
}
