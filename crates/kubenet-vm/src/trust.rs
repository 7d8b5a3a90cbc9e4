//! Whether a file root is about to run or hand out can be replaced by someone other than root:
//! the file and every directory above it must belong to root and be writable by no one else,
//! as socket_vmnet asks of its binary and Lima of the paths in its `networks.yaml`. The binary
//! the service runs, and QEMU's binary and firmware (for the agent), are checked this way, by
//! the path with its links resolved, which is then the one used. [`chain_verdict`] is pure over
//! what `lstat` said; [`chain`] does the looking.

use std::path::{Path, PathBuf};

/// One path as `lstat` reports it: its owner and mode (type bits included).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    pub uid: u32,
    pub mode: u32,
}

/// Why a path is not root's alone: someone else could replace what the service runs.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unsafe {
    #[error("{} belongs to uid {uid}, not root", path.display())]
    Owner { path: PathBuf, uid: u32 },
    #[error("{} can be written by others than root (mode {mode:o})", path.display())]
    Writable { path: PathBuf, mode: u32 },
    #[error("{} is a symbolic link", path.display())]
    Link { path: PathBuf },
    #[error("cannot check {}: {reason}", path.display())]
    Unreadable { path: PathBuf, reason: String },
}

/// Whether only root can change what the chain's first path is: the file and every directory
/// above it (`chain`: the path, then each parent up to `/`, with their stat results) belong
/// to root and are not writable by group or others. An other-writable directory with the
/// sticky bit (/tmp) is allowed: there, no one but an entry's owner (root) can rename or
/// remove it.
pub fn chain_verdict(chain: &[(PathBuf, Stat)]) -> Result<(), Unsafe> {
    const S_IFMT: u32 = 0o170_000;
    const S_IFDIR: u32 = 0o040_000;
    const S_IFLNK: u32 = 0o120_000;
    const STICKY: u32 = 0o1000;
    for (path, st) in chain {
        let kind = st.mode & S_IFMT;
        if kind == S_IFLNK {
            return Err(Unsafe::Link { path: path.clone() });
        }
        if st.uid != 0 {
            return Err(Unsafe::Owner { path: path.clone(), uid: st.uid });
        }
        let sticky_dir = kind == S_IFDIR && st.mode & STICKY != 0;
        if st.mode & 0o022 != 0 && !sticky_dir {
            return Err(Unsafe::Writable { path: path.clone(), mode: st.mode & 0o7777 });
        }
    }
    Ok(())
}

/// `path` (made absolute and free of links) and each directory above it, as `lstat` sees them.
pub fn chain(path: &Path) -> Result<Vec<(PathBuf, Stat)>, Unsafe> {
    use std::os::unix::fs::MetadataExt;
    let unreadable = |p: &Path, e: std::io::Error| Unsafe::Unreadable { path: p.to_path_buf(), reason: e.to_string() };
    let real = path.canonicalize().map_err(|e| unreadable(path, e))?;
    real.ancestors()
        .map(|p| {
            let m = std::fs::symlink_metadata(p).map_err(|e| unreadable(p, e))?;
            Ok((p.to_path_buf(), Stat { uid: m.uid(), mode: m.mode() }))
        })
        .collect()
}

/// The system's own folders of programs, where root's tools are looked for (never PATH,
/// which `sudo -E`, a service's environment or a sudo without secure_path hand over from the
/// user): Debian's and Fedora's, then NixOS's.
const SYSTEM_PROGRAMS: [&str; 5] = ["/usr/sbin", "/usr/bin", "/sbin", "/bin", "/run/current-system/sw/bin"];

/// The program `name` root may run: the first in the system's folders that only root can
/// change, as named (a link there must be root's, in a folder of root's) and where it leads.
pub fn program(name: &str) -> Result<PathBuf, String> {
    let mut refused = Vec::new();
    for dir in SYSTEM_PROGRAMS {
        let candidate = Path::new(dir).join(name);
        if !candidate.is_file() {
            continue;
        }
        match root_only_as_named(&candidate) {
            Ok(real) => return Ok(real),
            Err(e) => refused.push(e.to_string()),
        }
    }
    Err(match refused.is_empty() {
        true => format!("{name} is not installed (looked in {})", SYSTEM_PROGRAMS.join(", ")),
        false => format!("no {name} that only root can change: {}", refused.join("; ")),
    })
}

/// [`root_only`], and the path as it is named passes too: each folder holding it is root's and
/// writable by no one else (a link among them is judged by its owner), and a link at `path`
/// itself is root's. Otherwise whoever writes such a folder could point a link there at any
/// root-only program, which [`root_only`] alone, judging where the link leads, would accept.
pub fn root_only_as_named(path: &Path) -> Result<PathBuf, Unsafe> {
    use std::os::unix::fs::MetadataExt;
    let unreadable = |p: &Path, e: std::io::Error| Unsafe::Unreadable { path: p.to_path_buf(), reason: e.to_string() };
    let path = std::path::absolute(path).map_err(|e| unreadable(path, e))?;
    for p in path.ancestors() {
        let m = std::fs::symlink_metadata(p).map_err(|e| unreadable(p, e))?;
        let link = m.file_type().is_symlink();
        if m.uid() != 0 {
            return Err(Unsafe::Owner { path: p.to_path_buf(), uid: m.uid() });
        }
        let sticky_dir = m.is_dir() && m.mode() & 0o1000 != 0;
        if p != path && !link && m.mode() & 0o022 != 0 && !sticky_dir {
            return Err(Unsafe::Writable { path: p.to_path_buf(), mode: m.mode() & 0o7777 });
        }
    }
    root_only(&path)
}

/// `path` with its links resolved, once only root can change what it holds: the path to use.
pub fn root_only(path: &Path) -> Result<PathBuf, Unsafe> {
    let c = chain(path)?;
    chain_verdict(&c)?;
    Ok(c[0].0.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIR: u32 = 0o040_000;
    const FILE: u32 = 0o100_000;
    const LINK: u32 = 0o120_000;

    fn chain_of(entries: &[(&str, u32, u32)]) -> Vec<(PathBuf, Stat)> {
        entries.iter().map(|(p, uid, mode)| (PathBuf::from(p), Stat { uid: *uid, mode: *mode })).collect()
    }

    #[test]
    fn a_chain_is_safe_only_when_root_alone_can_change_it() {
        let root = |p: &'static str, mode| (p, 0, mode);
        let usr = [root("/usr/bin/kubenet", FILE | 0o755), root("/usr/bin", DIR | 0o755), root("/usr", DIR | 0o755)];
        let with_root = |mut v: Vec<(&'static str, u32, u32)>| {
            v.push(root("/", DIR | 0o755));
            chain_of(&v)
        };
        assert_eq!(chain_verdict(&with_root(usr.to_vec())), Ok(()));
        // cargo install's ~/.cargo/bin: the owner's.
        let cargo = with_root(vec![
            root("/home/ann/.cargo/bin/kubenet", FILE | 0o755),
            ("/home/ann/.cargo/bin", 1000, DIR | 0o755),
            ("/home/ann/.cargo", 1000, DIR | 0o755),
            ("/home/ann", 1000, DIR | 0o750),
            root("/home", DIR | 0o755),
        ]);
        assert_eq!(
            chain_verdict(&cargo).unwrap_err().to_string(),
            "/home/ann/.cargo/bin belongs to uid 1000, not root"
        );
        // Homebrew's prefix on an Intel Mac: /usr/local owned by the user.
        let brew = with_root(vec![
            root("/usr/local/bin/kubenet", FILE | 0o755),
            root("/usr/local/bin", DIR | 0o755),
            ("/usr/local", 501, DIR | 0o755),
            root("/usr", DIR | 0o755),
        ]);
        assert_eq!(chain_verdict(&brew), Err(Unsafe::Owner { path: "/usr/local".into(), uid: 501 }));
        // Root's, but group- or world-writable.
        for (mode, what) in [(FILE | 0o775, "group"), (FILE | 0o757, "others")] {
            let c = with_root(vec![root("/opt/kubenet", mode), root("/opt", DIR | 0o755)]);
            assert_eq!(
                chain_verdict(&c),
                Err(Unsafe::Writable { path: "/opt/kubenet".into(), mode: mode & 0o7777 }),
                "{what}"
            );
        }
        let c = with_root(vec![root("/opt/bin/kubenet", FILE | 0o755), root("/opt/bin", DIR | 0o777)]);
        assert!(matches!(chain_verdict(&c), Err(Unsafe::Writable { .. })), "a world-writable folder");
        // /tmp: world-writable but sticky, so a root file in it stays root's.
        let tmp = with_root(vec![root("/tmp/kubenet", FILE | 0o755), root("/tmp", DIR | 0o1777)]);
        assert_eq!(chain_verdict(&tmp), Ok(()));
        let sticky_file = with_root(vec![root("/opt/kubenet", FILE | 0o1777)]);
        assert!(chain_verdict(&sticky_file).is_err(), "the sticky bit protects folders only");
        let link = with_root(vec![root("/usr/bin/kubenet", LINK | 0o777), root("/usr/bin", DIR | 0o755)]);
        assert_eq!(chain_verdict(&link), Err(Unsafe::Link { path: "/usr/bin/kubenet".into() }));
    }

    #[test]
    fn a_program_is_found_where_only_root_can_change_it() {
        let sh = program("sh").unwrap();
        assert!(sh.is_absolute() && root_only(&sh).is_ok(), "{}", sh.display());
        assert!(program("no-such-kubenet-tool").unwrap_err().starts_with("no-such-kubenet-tool is not installed"));
        // A link to a root-only program, from a folder its user may write, is not root's.
        let d = tempfile::tempdir().unwrap();
        let link = d.path().join("nft");
        std::os::unix::fs::symlink("/bin/sh", &link).unwrap();
        assert!(root_only(&link).is_ok(), "where it leads is root's");
        // (A test run as root gives the folder to uid 65534, as a user's own folder.)
        std::os::unix::fs::chown(d.path(), Some(65534), Some(65534)).unwrap_or_default();
        let e = root_only_as_named(&link).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{} belongs to uid", d.path().display())), "{e}");
    }

    #[test]
    fn the_real_host_paths_are_judged() {
        // /bin/sh is root's on every test host (through Debian's /bin and sh links); a file in
        // a folder of uid 65534's is not.
        assert!(root_only(Path::new("/bin/sh")).is_ok_and(|p| p.is_absolute() && !p.ends_with("sh")));
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("qemu");
        std::fs::write(&f, "").unwrap();
        std::os::unix::fs::chown(d.path(), Some(65534), Some(65534)).unwrap_or_default();
        let e = root_only(&f).unwrap_err().to_string();
        assert!(e.contains("belongs to uid") || e.contains("can be written"), "{e}");
    }
}
