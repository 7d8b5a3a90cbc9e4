//! The lease table and its file format. The table and the parser ([`LeaseTable::from_bytes`])
//! are pure; [`Journal`], [`save`] and [`load`] are the only file I/O.
//!
//! The file uses dnsmasq's lease-file lines, `EXPIRY MAC IP HOSTNAME CLIENT-ID` with `*` for an
//! absent field and expiry 0 for an infinite lease, so tools that read dnsmasq.leases read ours.
//! It is a journal, as Kea's memfile is: it starts as a snapshot of the table, written
//! atomically (temporary file, fsync, rename, fsync of the directory), and each batch of changes
//! is then appended as the changed addresses' new lines, with one fdatasync. Reading applies the
//! lines in order, so a later line for an address overrides an earlier one, and an expired line
//! (a released address is written with expiry 1) removes the address. When the appended lines
//! outnumber twice the table, the next write is a new snapshot. A change costs a few lines on
//! disk however large the table, and a crash loses at most a batch whose replies were never
//! sent. Until the next snapshot, a reader of the file may see several lines for one address:
//! the last one is the lease.
//!
//! The file lives in the lab owner's state directory, and root (`kubenet serve`) reads and
//! writes it, so no path is trusted past its directory: [`load`] opens the file with O_NOFOLLOW
//! and O_NONBLOCK, reads only a regular file, and at most [`MAX_FILE_BYTES`] of it, so a
//! symbolic link to /etc/shadow, /dev/zero or a FIFO is refused at once. A snapshot is created
//! with O_CREAT|O_EXCL|O_NOFOLLOW relative to the state directory, itself opened with
//! O_DIRECTORY|O_NOFOLLOW, and renamed over the old name, which replaces whatever the owner put
//! there (a link is replaced, never followed). Appends go through the descriptor of the
//! snapshot the journal itself created, never through a path: the first write of a server is
//! always a snapshot, so a file left there by anyone else is replaced, not written through.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use kubenet_cluster::Mac;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub ip: Ipv4Addr,
    pub mac: Mac,
    pub client_id: Option<Vec<u8>>,
    /// The client's option 12, kept for the DNS server and the lease file.
    pub hostname: Option<String>,
    /// Unix seconds; None for an infinite lease.
    pub expires: Option<u64>,
}

impl Lease {
    pub fn active(&self, now: u64) -> bool {
        self.expires.is_none_or(|e| e > now)
    }
}

/// Leases by address, with an index by MAC. One lease per MAC: granting a new address to a
/// client drops its old one. The table also notes which addresses changed since the journal
/// last took them ([`LeaseTable::take_changes`]).
#[derive(Clone, Debug, Default)]
pub struct LeaseTable {
    by_ip: BTreeMap<Ipv4Addr, Lease>,
    by_mac: HashMap<Mac, Ipv4Addr>,
    changes: Changes,
}

/// The leases equal, whatever is waiting to be written.
impl PartialEq for LeaseTable {
    fn eq(&self, other: &Self) -> bool {
        self.by_ip == other.by_ip
    }
}
impl Eq for LeaseTable {}

/// What changed in a table since the journal last wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// The addresses whose lease was granted, changed or dropped, each once.
    pub addresses: std::collections::BTreeSet<Ipv4Addr>,
    /// A lease that carries a host name came or went (the DNS zone follows those).
    pub names: bool,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.addresses.is_empty()
    }

    fn note(&mut self, lease: &Lease) {
        self.addresses.insert(lease.ip);
        self.names |= lease.hostname.is_some();
    }
}

impl LeaseTable {
    pub fn get(&self, ip: Ipv4Addr) -> Option<&Lease> {
        self.by_ip.get(&ip)
    }

    pub fn by_mac(&self, mac: Mac) -> Option<&Lease> {
        self.by_mac.get(&mac).and_then(|ip| self.by_ip.get(ip))
    }

    pub fn insert(&mut self, lease: Lease) {
        // Drop this client's previous address, and the address's previous client.
        if let Some(old_ip) = self.by_mac.get(&lease.mac).copied()
            && let Some(old) = self.by_ip.remove(&old_ip)
        {
            self.changes.note(&old);
        }
        if let Some(prev) = self.by_ip.remove(&lease.ip) {
            self.by_mac.remove(&prev.mac);
            self.changes.note(&prev);
        }
        self.changes.note(&lease);
        self.by_mac.insert(lease.mac, lease.ip);
        self.by_ip.insert(lease.ip, lease);
    }

    pub fn remove(&mut self, ip: Ipv4Addr) -> Option<Lease> {
        let l = self.by_ip.remove(&ip)?;
        if self.by_mac.get(&l.mac) == Some(&ip) {
            self.by_mac.remove(&l.mac);
        }
        self.changes.note(&l);
        Some(l)
    }

    /// What changed since the last call, for the journal; the table starts noting afresh.
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }

    /// The journal lines of `addresses` as the table holds them now: each lease's line, or a
    /// removal (expiry 1, long past) for an address with no lease.
    pub fn lines_of(&self, addresses: impl IntoIterator<Item = Ipv4Addr>) -> Vec<u8> {
        let mut out = Vec::new();
        for ip in addresses {
            let written = match self.by_ip.get(&ip) {
                Some(l) => write_line(&mut out, l),
                None => writeln!(out, "1 00:00:00:00:00:00 {ip} * *"),
            };
            written.expect("writing to memory");
        }
        out
    }

    pub fn iter(&self) -> impl Iterator<Item = &Lease> {
        self.by_ip.values()
    }

    pub fn len(&self) -> usize {
        self.by_ip.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty()
    }

    /// Drops expired leases; returns how many.
    pub fn expire(&mut self, now: u64) -> usize {
        let dead: Vec<Ipv4Addr> = self.by_ip.values().filter(|l| !l.active(now)).map(|l| l.ip).collect();
        for ip in &dead {
            self.remove(*ip);
        }
        dead.len()
    }

    /// The table in dnsmasq's lease-file format.
    pub fn to_text(&self) -> String {
        let mut out = Vec::new();
        self.write_to(&mut out).expect("writing to memory");
        String::from_utf8(out).expect("lease lines are ASCII")
    }

    /// Writes the table in dnsmasq's lease-file format, a line at a time.
    pub fn write_to(&self, out: &mut (impl Write + ?Sized)) -> std::io::Result<()> {
        self.by_ip.values().try_for_each(|l| write_line(out, l))
    }

    /// Parses a lease file (a snapshot and the lines appended since), line by line in order: a
    /// later line for an address replaces the earlier one, and an expired line, one expired at
    /// `now` included, drops the address. Returns the table and the number of lines that did
    /// not parse (kept out, and logged by the caller).
    pub fn from_text(text: &str, now: u64) -> (Self, usize) {
        Self::from_bytes(text.as_bytes(), now)
    }

    /// [`LeaseTable::from_text`] for the file's bytes as read: a line that is not UTF-8 is one
    /// that does not parse.
    pub fn from_bytes(bytes: &[u8], now: u64) -> (Self, usize) {
        let mut t = LeaseTable::default();
        let mut bad = 0;
        for line in bytes.split(|b| *b == b'\n').filter(|l| !l.iter().all(u8::is_ascii_whitespace)) {
            match std::str::from_utf8(line).ok().and_then(parse_line) {
                Some(l) if l.active(now) => t.insert(l),
                Some(l) => {
                    t.remove(l.ip);
                }
                None => bad += 1,
            }
        }
        t.changes = Changes::default();
        (t, bad)
    }
}

/// One lease as a line of the file.
fn write_line(out: &mut (impl Write + ?Sized), l: &Lease) -> std::io::Result<()> {
    let host = l.hostname.as_deref().filter(|h| is_plain(h)).unwrap_or("*");
    write!(out, "{} {} {} {host} ", l.expires.unwrap_or(0), l.mac, l.ip)?;
    match &l.client_id {
        Some(c) if !c.is_empty() => {
            for (i, b) in c.iter().enumerate() {
                write!(out, "{}{b:02x}", if i == 0 { "" } else { ":" })?;
            }
        }
        _ => out.write_all(b"*")?,
    }
    out.write_all(b"\n")
}

/// Host names go into a space-separated file: only plain labels are written.
fn is_plain(h: &str) -> bool {
    !h.is_empty() && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
}

fn parse_line(line: &str) -> Option<Lease> {
    let mut f = line.split_whitespace();
    let expiry: u64 = f.next()?.parse().ok()?;
    let mac: Mac = f.next()?.parse().ok()?;
    let ip: Ipv4Addr = f.next()?.parse().ok()?;
    let host = f.next()?;
    let cid = f.next().unwrap_or("*");
    let client_id = if cid == "*" {
        None
    } else {
        Some(cid.split(':').map(|b| u8::from_str_radix(b, 16).ok()).collect::<Option<Vec<u8>>>()?)
    };
    Some(Lease {
        ip,
        mac,
        client_id,
        hostname: (host != "*").then(|| host.to_string()),
        expires: (expiry != 0).then_some(expiry),
    })
}

/// The lease file, written as a journal (see the module's header): a snapshot, then appended
/// batches. Opened lazily, at the first write, so a file that cannot be written is found when
/// a reply depends on it; any failed write makes the next one a whole new snapshot.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    /// The snapshot this journal created, open for appending; None until then, or after a
    /// failure.
    file: Option<File>,
    /// Lines appended since the snapshot.
    appended: usize,
    /// The last write failed: the table in memory is ahead of the file until a write succeeds.
    behind: bool,
}

impl Journal {
    pub fn new(path: PathBuf) -> Self {
        Journal { path, file: None, appended: 0, behind: false }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True after a failed write, until one succeeds: every reply that relies on a lease must
    /// then wait for a write, even one whose own lease did not change (it may be the lease that
    /// could not be written).
    pub fn behind(&self) -> bool {
        self.behind
    }

    /// Puts the table's changes on disk before it returns: appended lines and an fdatasync, or
    /// a new snapshot when there is none yet or the appended lines outgrew the table.
    pub fn write(&mut self, table: &LeaseTable, changes: &Changes) -> std::io::Result<()> {
        let r = match &mut self.file {
            Some(file) if self.appended + changes.addresses.len() <= 2 * table.len() + 64 => {
                let lines = table.lines_of(changes.addresses.iter().copied());
                let n = changes.addresses.len();
                file.write_all(&lines).and_then(|()| file.sync_data()).map(|()| self.appended += n)
            }
            _ => self.snapshot(table),
        };
        self.behind = r.is_err();
        if r.is_err() {
            self.file = None;
        }
        r
    }

    /// Replaces the file with the table, atomically, and keeps the new file open for appending.
    pub fn snapshot(&mut self, table: &LeaseTable) -> std::io::Result<()> {
        self.file = None;
        self.file = Some(replace(&self.path, table)?);
        self.appended = 0;
        Ok(())
    }
}

/// Writes the table as the file at `path`, atomically; see [`replace`].
pub fn save(path: &Path, table: &LeaseTable) -> std::io::Result<()> {
    replace(path, table).map(drop)
}

/// Writes the table into a new temporary file beside `path` and renames it over `path`, with
/// fsyncs of the file and the directory so the rename itself is durable. Nothing is opened by a
/// path the directory's owner could redirect: the directory is opened with O_NOFOLLOW, the
/// temporary file is created in it with O_EXCL|O_NOFOLLOW (a leftover one, or a link by its
/// name, is unlinked first), and the rename replaces the name itself. Returns the new file,
/// positioned at its end, for the journal's appends.
fn replace(path: &Path, table: &LeaseTable) -> std::io::Result<File> {
    use nix::fcntl::{OFlag, openat, renameat};
    use nix::sys::stat::Mode;
    use nix::unistd::{UnlinkatFlags, unlinkat};

    let dir_path = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let Some(name) = path.file_name() else {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{} names no file", path.display())));
    };
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir_path)
        .map_err(|e| refused_link(e, dir_path))?;
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(".tmp");
    let tmp = Path::new(&tmp);
    match unlinkat(&dir, tmp, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(e.into()),
    }
    let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let file = File::from(openat(&dir, tmp, flags, Mode::from_bits_truncate(0o644))?);
    let mut out = std::io::BufWriter::new(file);
    table.write_to(&mut out)?;
    let file = out.into_inner().map_err(std::io::IntoInnerError::into_error)?;
    file.sync_all()?;
    renameat(&dir, tmp, &dir, name)?;
    dir.sync_all()?;
    Ok(file)
}

/// An open with O_NOFOLLOW that met a link (ELOOP; ENOTDIR with O_DIRECTORY on Linux), said as
/// what it means.
fn refused_link(e: std::io::Error, path: &Path) -> std::io::Error {
    let link = || std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) && link() {
        std::io::Error::other(format!("{} is a symbolic link: kubenet does not follow it", path.display()))
    } else {
        e
    }
}

/// The most a lease file may hold: over 100,000 leases at their longest lines, far more than a
/// pool hands out. A bigger file is not one kubenet wrote, and is refused, not read into memory.
pub const MAX_FILE_BYTES: u64 = 16 << 20;

/// Why the lease file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0} is a symbolic link: kubenet reads only a regular file there (remove the link)")]
    Symlink(PathBuf),
    #[error("{path} is a {kind}, not a regular file: kubenet reads only a regular file there (remove it)")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{path} holds more than {max} bytes: that is not a lease file kubenet wrote (remove it)")]
    TooBig { path: PathBuf, max: u64 },
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// Reads the lease file; a missing file is an empty table. Returns the table and the number of
/// lines that did not parse.
pub fn load(path: &Path, now: u64) -> Result<(LeaseTable, usize), LoadError> {
    match read_capped(path, MAX_FILE_BYTES)? {
        Some(bytes) => Ok(LeaseTable::from_bytes(&bytes, now)),
        None => Ok((LeaseTable::default(), 0)),
    }
}

/// The bytes of the regular file at `path`, at most `max` of them; None if there is no file.
/// O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
fn read_capped(path: &Path, max: u64) -> Result<Option<Vec<u8>>, LoadError> {
    let io = |source| LoadError::Io { path: path.to_path_buf(), source };
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Err(LoadError::Symlink(path.to_path_buf())),
        Err(e) => return Err(io(e)),
    };
    let meta = file.metadata().map_err(io)?;
    let t = meta.file_type();
    if !t.is_file() {
        let kind = if t.is_dir() {
            "directory"
        } else if t.is_fifo() {
            "FIFO"
        } else if t.is_char_device() || t.is_block_device() {
            "device"
        } else if t.is_socket() {
            "socket"
        } else {
            "special file"
        };
        return Err(LoadError::NotRegular { path: path.to_path_buf(), kind });
    }
    let too_big = || LoadError::TooBig { path: path.to_path_buf(), max };
    if meta.len() > max {
        return Err(too_big());
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // The file may grow while it is read: one byte past the cap tells.
    file.take(max + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > max {
        return Err(too_big());
    }
    Ok(Some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(ip: u8, mac: u8, expires: Option<u64>) -> Lease {
        Lease {
            ip: Ipv4Addr::new(192, 168, 1, ip),
            mac: Mac([0x52, 0x52, 0x52, 0, 0, mac]),
            client_id: Some(vec![1, 0x52, 0x52, 0x52, 0, 0, mac]),
            hostname: Some(format!("h{mac}")),
            expires,
        }
    }

    #[test]
    fn dnsmasq_format_round_trip() {
        let mut t = LeaseTable::default();
        t.insert(lease(14, 4, Some(2_000_000_000)));
        t.insert(Lease { hostname: None, client_id: None, ..lease(3, 9, None) });
        let text = t.to_text();
        assert_eq!(
            text,
            "0 52:52:52:00:00:09 192.168.1.3 * *\n2000000000 52:52:52:00:00:04 192.168.1.14 h4 01:52:52:52:00:00:04\n"
        );
        let (back, bad) = LeaseTable::from_text(&text, 1_000_000_000);
        assert_eq!((back, bad), (t, 0));
    }

    #[test]
    fn expired_and_garbage_lines_are_dropped_on_load() {
        let text = "100 52:52:52:00:00:01 192.168.1.11 a *\nnot a lease\n300 52:52:52:00:00:02 192.168.1.12 b *\n";
        let (t, bad) = LeaseTable::from_text(text, 200);
        assert_eq!(bad, 1);
        assert_eq!(t.len(), 1);
        assert_eq!(t.get(Ipv4Addr::new(192, 168, 1, 12)).unwrap().hostname.as_deref(), Some("b"));
    }

    #[test]
    fn one_lease_per_mac_and_per_address() {
        let mut t = LeaseTable::default();
        t.insert(lease(5, 1, None));
        t.insert(lease(6, 1, None));
        assert!(t.get(Ipv4Addr::new(192, 168, 1, 5)).is_none());
        assert_eq!(t.by_mac(Mac([0x52, 0x52, 0x52, 0, 0, 1])).unwrap().ip, Ipv4Addr::new(192, 168, 1, 6));
        // Another client takes .6 over: the first client has no lease left.
        t.insert(lease(6, 2, None));
        assert!(t.by_mac(Mac([0x52, 0x52, 0x52, 0, 0, 1])).is_none());
        assert_eq!(t.len(), 1);
        assert_eq!(t.expire(0), 0);
    }

    #[test]
    fn save_replaces_the_file_and_load_reads_it_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases");
        assert_eq!(load(&path, 0).unwrap().0.len(), 0);
        let mut t = LeaseTable::default();
        t.insert(lease(14, 4, Some(500)));
        save(&path, &t).unwrap();
        t.insert(lease(15, 5, Some(500)));
        save(&path, &t).unwrap();
        assert_eq!(load(&path, 100).unwrap().0, t);
        assert!(!path.with_extension("tmp").exists());
    }

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, 1, last)
    }

    /// Writes the table's changes as the server does.
    fn write(j: &mut Journal, t: &mut LeaseTable) {
        let changes = t.take_changes();
        j.write(t, &changes).unwrap();
    }

    #[test]
    fn the_journal_appends_changes_and_reads_back_as_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases");
        let mut j = Journal::new(path.clone());
        let mut t = LeaseTable::default();
        t.insert(lease(14, 4, Some(500)));
        t.insert(lease(15, 5, Some(500)));
        write(&mut j, &mut t); // the first write is a snapshot
        let snapshot = std::fs::read_to_string(&path).unwrap();
        assert_eq!(snapshot.lines().count(), 2);

        // A renewal, a client moving to another address, a release: three changed addresses
        // plus the one the move left, each one line appended.
        t.insert(lease(14, 4, Some(900)));
        t.insert(lease(16, 5, Some(900)));
        t.remove(ip(14));
        let c = t.take_changes();
        assert_eq!(c.addresses.iter().copied().collect::<Vec<_>>(), [ip(14), ip(15), ip(16)]);
        assert!(c.names);
        j.write(&t, &c).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(&snapshot), "appended, not rewritten:\n{text}");
        assert_eq!(
            &text[snapshot.len()..],
            "1 00:00:00:00:00:00 192.168.1.14 * *\n1 00:00:00:00:00:00 192.168.1.15 * *\n\
             900 52:52:52:00:00:05 192.168.1.16 h5 01:52:52:52:00:00:05\n"
        );
        let (back, bad) = LeaseTable::from_text(&text, 100);
        assert_eq!((back, bad), (t, 0));
        assert_eq!(load(&path, 100).unwrap().0.len(), 1);
    }

    #[test]
    fn the_journal_starts_a_new_snapshot_once_appends_outgrow_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases");
        let mut j = Journal::new(path.clone());
        let mut t = LeaseTable::default();
        t.insert(lease(14, 4, Some(100)));
        write(&mut j, &mut t);
        // One lease renewed again and again: the file stays small.
        for expiry in 101..400 {
            t.insert(lease(14, 4, Some(expiry)));
            write(&mut j, &mut t);
            assert!(std::fs::read_to_string(&path).unwrap().lines().count() <= 2 * t.len() + 64 + 1);
        }
        assert_eq!(load(&path, 50).unwrap().0, t);
        assert_eq!(load(&path, 50).unwrap().0.get(ip(14)).unwrap().expires, Some(399));
    }

    #[test]
    fn a_failed_write_leaves_the_journal_behind_until_a_snapshot_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gone/leases");
        let mut j = Journal::new(path.clone());
        let mut t = LeaseTable::default();
        t.insert(lease(14, 4, Some(500)));
        let c = t.take_changes();
        assert!(j.write(&t, &c).is_err());
        assert!(j.behind());
        // Nothing changed since, but the next write still puts the whole table on disk.
        std::fs::create_dir(dir.path().join("gone")).unwrap();
        j.write(&t, &t.clone().take_changes()).unwrap();
        assert!(!j.behind());
        assert_eq!(load(&path, 100).unwrap().0, t);
    }

    #[test]
    fn loading_applies_lines_in_order() {
        // An address granted, then released (expiry 1), then granted to another client; a
        // client that moved keeps only its last address.
        let text = "500 52:52:52:00:00:01 192.168.1.11 a *\n\
                    1 00:00:00:00:00:00 192.168.1.11 * *\n\
                    500 52:52:52:00:00:02 192.168.1.12 b *\n\
                    600 52:52:52:00:00:02 192.168.1.13 b *\n\
                    600 52:52:52:00:00:03 192.168.1.11 c *\n";
        let (t, bad) = LeaseTable::from_text(text, 100);
        assert_eq!(bad, 0);
        let held: Vec<(Ipv4Addr, Option<&str>)> = t.iter().map(|l| (l.ip, l.hostname.as_deref())).collect();
        assert_eq!(held, [(ip(11), Some("c")), (ip(13), Some("b"))]);
    }

    /// A file outside the state directory, as an attacker would aim a link at: its bytes.
    fn outside(dir: &Path) -> PathBuf {
        let p = dir.join("shadow");
        std::fs::write(&p, b"root:secret\n").unwrap();
        p
    }

    fn mkfifo(p: &Path) {
        nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    }

    /// Runs `f` on a thread and fails the test if it takes more than 5 s (a FIFO read hangs).
    fn promptly<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(f()));
        rx.recv_timeout(std::time::Duration::from_secs(5)).expect("hung")
    }

    #[test]
    fn load_refuses_a_symlink_a_fifo_a_device_and_a_huge_file() {
        let dir = tempfile::tempdir().unwrap();
        let secret = outside(dir.path());
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let path = state.join("leases");

        std::os::unix::fs::symlink(&secret, &path).unwrap();
        let e = load(&path, 0).unwrap_err();
        assert!(matches!(e, LoadError::Symlink(_)), "{e}");
        assert!(e.to_string().contains("state/leases is a symbolic link"), "{e}");

        std::fs::remove_file(&path).unwrap();
        mkfifo(&path);
        let p = path.clone();
        let e = promptly(move || load(&p, 0).unwrap_err());
        assert!(e.to_string().contains("is a FIFO, not a regular file"), "{e}");

        let e = promptly(|| load(Path::new("/dev/zero"), 0).unwrap_err());
        assert!(e.to_string().contains("/dev/zero is a device"), "{e}");

        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "0 52:52:52:00:00:09 192.168.1.3 * *\n".repeat(10)).unwrap();
        let e = read_capped(&path, 100).unwrap_err();
        assert!(matches!(e, LoadError::TooBig { max: 100, .. }), "{e}");
        assert!(e.to_string().contains("state/leases holds more than 100 bytes"), "{e}");
        assert_eq!(load(&path, 0).unwrap().0.len(), 1);
        assert_eq!(std::fs::read(&secret).unwrap(), b"root:secret\n");
    }

    #[test]
    fn writes_replace_links_and_fifos_and_never_write_through_them() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let secret = outside(dir.path());
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let path = state.join("leases");
        let mut t = LeaseTable::default();
        t.insert(lease(14, 4, Some(500)));

        // The lease file and the temporary's name both links to the outside file.
        symlink(&secret, &path).unwrap();
        symlink(&secret, state.join(".leases.tmp")).unwrap();
        let mut j = Journal::new(path.clone());
        write(&mut j, &mut t);
        assert!(std::fs::symlink_metadata(&path).unwrap().file_type().is_file());
        assert!(!state.join(".leases.tmp").exists());
        assert_eq!(load(&path, 100).unwrap().0, t);
        assert_eq!(std::fs::read(&secret).unwrap(), b"root:secret\n");

        // The owner swaps a link in after the snapshot: appends go to the journal's own file,
        // and the next snapshot replaces the link.
        std::fs::remove_file(&path).unwrap();
        symlink(&secret, &path).unwrap();
        t.insert(lease(15, 5, Some(500)));
        write(&mut j, &mut t);
        j.snapshot(&t).unwrap();
        assert_eq!(std::fs::read(&secret).unwrap(), b"root:secret\n");
        assert_eq!(load(&path, 100).unwrap().0, t);

        // A FIFO in its place is replaced too, without waiting for a reader.
        std::fs::remove_file(&path).unwrap();
        mkfifo(&path);
        let (p, table) = (path.clone(), t.clone());
        promptly(move || Journal::new(p).snapshot(&table).unwrap());
        assert_eq!(load(&path, 100).unwrap().0, t);
    }

    #[test]
    fn a_state_directory_that_is_a_link_is_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.path().join("state")).unwrap();
        let mut t = LeaseTable::default();
        t.insert(lease(14, 4, Some(500)));
        let e = save(&dir.path().join("state/leases"), &t).unwrap_err();
        assert!(e.to_string().contains("state is a symbolic link"), "{e}");
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    }

    #[test]
    fn lines_that_are_not_utf8_count_as_bad() {
        let (t, bad) = LeaseTable::from_bytes(b"500 52:52:52:00:00:01 192.168.1.11 a *\n\xff\xfe\r\n\n  \n", 100);
        assert_eq!((t.len(), bad), (1, 1));
    }

    /// The fuzz target's property (fuzz/fuzz_targets/lease_file.rs) over every cut and
    /// one-byte change of a journal: what parses writes out and reads back whole.
    #[test]
    fn every_cut_and_mutation_of_a_journal_parses_and_round_trips() {
        let seed: &[u8] = b"0 52:52:52:00:00:09 192.168.1.3 * *\n2000000000 52:52:52:00:00:04 192.168.1.14 worker0 01:52:52:52:00:00:04\n1 00:00:00:00:00:00 192.168.1.3 * *\n";
        let check = |data: &[u8]| {
            let (table, _) = LeaseTable::from_bytes(data, 1_000_000_000);
            let (again, bad) = LeaseTable::from_text(&table.to_text(), 1_000_000_000);
            assert_eq!((bad, again.len()), (0, table.len()), "{:?}", String::from_utf8_lossy(data));
        };
        for cut in 0..=seed.len() {
            check(&seed[..cut]);
        }
        for at in 0..seed.len() {
            for b in [b' ', b'\n', b'*', b':', b'0', b'f', 0xff] {
                let mut m = seed.to_vec();
                m[at] = b;
                check(&m);
            }
        }
    }
}
