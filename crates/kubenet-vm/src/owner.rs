//! The lab's owner: the user `sudo kubenet serve` works for. Whatever the root agent does in
//! that user's directories (the state directory, each VM's folder, the lab definition) it does
//! with that user's rights, never as root, so a symlink, a FIFO or a device the owner put there
//! reaches nothing the owner could not reach alone. I/O at the edge.
//!
//! Two tools, both from the model of OpenSSH's privilege separation (the privileged side does
//! little, and nothing with a path it did not check):
//! - [`Owner::run_as`]: a closure run on a thread of its own whose *file-system* identity is the
//!   owner's (Linux: `setfsuid`/`setfsgid` and the owner's groups, all per thread; macOS:
//!   `pthread_setugid_np`). The thread ends with the closure, so no other thread of the agent
//!   ever holds those credentials, and the agent's own identity never changes.
//! - [`Owner::drop_in_child`]: a child process (QEMU on Linux, `test` for the /dev/kvm check)
//!   that becomes the owner, groups included, before `exec`, so it opens every file it is given
//!   as the owner.
//!
//! An owner that cannot be resolved (no passwd entry for SUDO_UID, LDAP down at boot) is an
//! error, never a silent fall-back to root.

use std::io;
use std::process::Command;

/// Who the lab belongs to, resolved once when the agent starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
    /// The owner's supplementary groups (`kvm` among them, where /dev/kvm is reached that way).
    pub groups: Vec<u32>,
    pub name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    #[error(
        "the lab's owner, uid {0}, has no user entry on this host (is the directory service down?): no VM starts until it can be looked up"
    )]
    Unknown(u32),
    #[error("cannot look up the lab's owner, uid {uid}: {source}")]
    Lookup { uid: u32, source: io::Error },
    #[error("cannot act as the lab's owner (uid {uid}): {source}")]
    Credentials { uid: u32, source: io::Error },
}

impl Owner {
    /// root, for an agent that runs for root itself (or a test): nothing to drop.
    pub fn root() -> Owner {
        Owner { uid: 0, gid: 0, groups: vec![0], name: "root".into() }
    }

    /// The owner uid/gid (from SUDO_UID/SUDO_GID), with name and groups from the user database.
    pub fn resolve(uid: u32, gid: u32) -> Result<Owner, OwnerError> {
        let user = nix::unistd::User::from_uid(uid.into())
            .map_err(|e| OwnerError::Lookup { uid, source: e.into() })?
            .ok_or(OwnerError::Unknown(uid))?;
        let groups = owner_groups(&user.name, gid).map_err(|source| OwnerError::Lookup { uid, source })?;
        Ok(Owner { uid, gid, groups, name: user.name })
    }

    /// `uid`/`gid` with no user entry: enough to make and read files as that user (their
    /// supplementary groups unknown), not to start QEMU for them.
    pub fn bare(uid: u32, gid: u32) -> Owner {
        Owner { uid, gid, groups: vec![gid], name: uid.to_string() }
    }

    /// The owner of a lab whose agent runs as root for `uid`/`gid` (SUDO_UID/SUDO_GID): looked
    /// up in the user database, unless the agent runs as that very user, which needs no name.
    pub fn for_agent(uid: u32, gid: u32) -> Result<Owner, OwnerError> {
        if uid != nix::unistd::geteuid().as_raw() {
            return Owner::resolve(uid, gid);
        }
        let name = nix::unistd::User::from_uid(uid.into()).ok().flatten().map_or_else(|| uid.to_string(), |u| u.name);
        Ok(Owner { uid, gid, groups: vec![gid], name })
    }

    /// Whether acting as this owner changes anything for a process running as `euid`.
    pub fn is_self(&self, euid: u32) -> bool {
        self.uid == euid
    }

    /// Runs `f` with the owner's file-system rights: on a thread of its own when the agent is
    /// root acting for someone else, else right here. `f` sees files exactly as the owner would.
    pub fn run_as<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, OwnerError> {
        if self.is_self(nix::unistd::geteuid().as_raw()) {
            return Ok(f());
        }
        std::thread::scope(|s| {
            s.spawn(|| {
                become_on_this_thread(self).map_err(|source| OwnerError::Credentials { uid: self.uid, source })?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Gives the calling thread the owner's file-system identity for the rest of its life: for
    /// a thread of the agent's own that does nothing else with files, as the DHCP loop, whose
    /// only file is the lab's lease file in the owner's folder. Nothing for an owner the agent
    /// already is. The caller must never run other work on this thread (no pool thread).
    pub fn adopt_on_this_thread(&self) -> Result<(), OwnerError> {
        if self.is_self(nix::unistd::geteuid().as_raw()) {
            return Ok(());
        }
        become_on_this_thread(self).map_err(|source| OwnerError::Credentials { uid: self.uid, source })
    }

    /// Makes the child `cmd` spawns this owner before it runs: groups, then gid, then uid
    /// (Linux: `setgroups`, `setresgid`, `setresuid`), with no way back. Nothing for an owner
    /// the agent already is.
    pub fn drop_in_child(&self, cmd: &mut Command) {
        if self.is_self(nix::unistd::geteuid().as_raw()) {
            return;
        }
        use std::os::unix::process::CommandExt;
        let (uid, gid) = (self.uid, self.gid);
        let groups: Vec<libc::gid_t> = self.groups.clone();
        // SAFETY: between fork and exec only async-signal-safe system calls run here, on
        // memory (`groups`) allocated before the fork.
        unsafe {
            cmd.pre_exec(move || {
                #[cfg(target_vendor = "apple")]
                let n = groups.len() as libc::c_int;
                #[cfg(not(target_vendor = "apple"))]
                let n = groups.len();
                if libc::setgroups(n, groups.as_ptr()) != 0 {
                    return Err(io::Error::last_os_error());
                }
                set_ids(uid, gid)
            });
        }
    }
}

/// setresgid/setresuid (Linux), setgid/setuid elsewhere: real, effective and saved ids all
/// become the owner's, so the child cannot regain root.
fn set_ids(uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: plain system calls on integers.
    #[cfg(target_os = "linux")]
    let (g, u) = unsafe { (libc::setresgid(gid, gid, gid), libc::setresuid(uid, uid, uid)) };
    // SAFETY: as above; on macOS setgid/setuid as root set real, effective and saved ids.
    #[cfg(not(target_os = "linux"))]
    let (g, u) = unsafe { (libc::setgid(gid), libc::setuid(uid)) };
    if g != 0 || u != 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// The owner's groups: its primary group and every group that lists it.
fn owner_groups(name: &str, gid: u32) -> io::Result<Vec<u32>> {
    #[cfg(target_os = "linux")]
    {
        let name = std::ffi::CString::new(name).map_err(io::Error::other)?;
        let groups = nix::unistd::getgrouplist(&name, gid.into()).map_err(io::Error::from)?;
        Ok(groups.into_iter().map(|g| g.as_raw()).collect())
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = name;
        Ok(vec![gid])
    }
}

/// This thread's file-system identity becomes `owner`'s. Linux keeps credentials per thread in
/// the kernel; the raw `setgroups` system call (not glibc's, which changes every thread of
/// the process) and `setfsgid`/`setfsuid` change only the calling thread, and only for file
/// access. The thread must end after use: [`Owner::run_as`] makes one for that alone.
#[cfg(target_os = "linux")]
fn become_on_this_thread(owner: &Owner) -> io::Result<()> {
    // SAFETY: raw system calls with a pointer to a live slice and its length.
    let r = unsafe { libc::syscall(libc::SYS_setgroups, owner.groups.len(), owner.groups.as_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // setfsuid/setfsgid return the previous id and cannot report failure directly: calling
    // them again with the same id returns the id now in force, which must be the owner's.
    // SAFETY: plain system calls on integers.
    let ok = unsafe {
        libc::setfsgid(owner.gid);
        libc::setfsuid(owner.uid);
        libc::setfsgid(owner.gid) as u32 == owner.gid && libc::setfsuid(owner.uid) as u32 == owner.uid
    };
    if ok { Ok(()) } else { Err(io::Error::from(io::ErrorKind::PermissionDenied)) }
}

/// macOS: `pthread_setugid_np`, the per-thread identity Apple's own file servers use.
#[cfg(target_vendor = "apple")]
fn become_on_this_thread(owner: &Owner) -> io::Result<()> {
    unsafe extern "C" {
        fn pthread_setugid_np(uid: libc::uid_t, gid: libc::gid_t) -> libc::c_int;
    }
    // SAFETY: a system call on integers; it affects this thread only.
    if unsafe { pthread_setugid_np(owner.uid, owner.gid) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(not(any(target_os = "linux", target_vendor = "apple")))]
fn become_on_this_thread(_: &Owner) -> io::Result<()> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "acting as another user needs Linux or macOS"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn root_acts_as_itself_without_a_thread() {
        let me = nix::unistd::geteuid().as_raw();
        let o = Owner { uid: me, gid: 0, groups: vec![], name: "me".into() };
        let id = std::thread::current().id();
        assert_eq!(o.run_as(|| std::thread::current().id()).unwrap(), id);
    }

    /// Root, as uid 65534, cannot read a root-only file nor write in a root-only folder, and
    /// the rest of the process is still root afterwards.
    #[test]
    fn the_owners_thread_has_the_owners_rights_and_no_other_thread_does() {
        if !root() {
            eprintln!("SKIPPED: needs root to act as another user");
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let secret = d.path().join("secret");
        std::fs::write(&secret, "root only").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let nobody = Owner { uid: 65534, gid: 65534, groups: vec![65534], name: "nobody".into() };
        let (read, wrote) = nobody
            .run_as(|| {
                (std::fs::read(&secret).map_err(|e| e.kind()), std::fs::write(d.path().join("new"), "x").is_ok())
            })
            .unwrap();
        assert_eq!(read, Err(io::ErrorKind::PermissionDenied));
        assert!(!wrote, "uid 65534 wrote in a root folder");
        // This thread (and so the agent) is still root.
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "root only");
        // A file the owner's thread makes is the owner's.
        let mine = d.path().join("mine");
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        nobody.run_as(|| std::fs::write(&mine, "x")).unwrap().unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&mine).unwrap().uid(), 65534);
    }

    #[test]
    fn a_child_becomes_the_owner_groups_included() {
        if !root() {
            eprintln!("SKIPPED: needs root to start a child as another user");
            return;
        }
        let nobody = Owner { uid: 65534, gid: 65534, groups: vec![65534, 100], name: "nobody".into() };
        let mut cmd = Command::new("id");
        nobody.drop_in_child(&mut cmd);
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.starts_with("uid=65534"), "{text}");
        assert!(text.contains("gid=65534") && text.contains("groups=65534") && text.contains(",100"), "{text}");
        assert!(!text.contains("(root)"), "{text}");
    }

    #[test]
    fn an_owner_without_a_user_entry_is_an_error() {
        // uid 4000000000: no passwd entry on any test host.
        let e = Owner::resolve(4_000_000_000, 4_000_000_000).unwrap_err();
        assert!(e.to_string().contains("uid 4000000000, has no user entry"), "{e}");
        let root = Owner::resolve(0, 0).unwrap();
        assert_eq!((root.name.as_str(), root.uid), ("root", 0));
    }
}
