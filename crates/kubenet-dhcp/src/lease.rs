//! The lease table and its file format. The table is pure; [`save`] and [`load`] are the only
//! file I/O.
//!
//! The file uses dnsmasq's lease-file lines, `EXPIRY MAC IP HOSTNAME CLIENT-ID` with `*` for an
//! absent field and expiry 0 for an infinite lease, so tools that read dnsmasq.leases read ours.
//! It is replaced atomically (temporary file, fsync, rename, fsync of the directory): a crash
//! leaves the old table or the new one, never half of either.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;

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
/// client drops its old one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseTable {
    by_ip: BTreeMap<Ipv4Addr, Lease>,
    by_mac: HashMap<Mac, Ipv4Addr>,
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
        if let Some(old_ip) = self.by_mac.get(&lease.mac).copied() {
            self.by_ip.remove(&old_ip);
        }
        if let Some(prev) = self.by_ip.remove(&lease.ip) {
            self.by_mac.remove(&prev.mac);
        }
        self.by_mac.insert(lease.mac, lease.ip);
        self.by_ip.insert(lease.ip, lease);
    }

    pub fn remove(&mut self, ip: Ipv4Addr) -> Option<Lease> {
        let l = self.by_ip.remove(&ip)?;
        if self.by_mac.get(&l.mac) == Some(&ip) {
            self.by_mac.remove(&l.mac);
        }
        Some(l)
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
        let mut out = String::new();
        for l in self.by_ip.values() {
            let host = l.hostname.as_deref().filter(|h| is_plain(h)).unwrap_or("*");
            let cid = match &l.client_id {
                Some(c) if !c.is_empty() => c.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":"),
                _ => "*".into(),
            };
            let _ = writeln!(out, "{} {} {} {host} {cid}", l.expires.unwrap_or(0), l.mac, l.ip);
        }
        out
    }

    /// Parses a lease file, dropping leases expired at `now`. Returns the table and the number
    /// of lines that did not parse (kept out, and logged by the caller).
    pub fn from_text(text: &str, now: u64) -> (Self, usize) {
        let mut t = LeaseTable::default();
        let mut bad = 0;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            match parse_line(line) {
                Some(l) if l.active(now) => t.insert(l),
                Some(_) => {}
                None => bad += 1,
            }
        }
        (t, bad)
    }
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

/// Writes the table atomically: temporary file in the same directory, fsync, rename over the
/// old file, fsync of the directory so the rename itself is durable.
pub fn save(path: &Path, table: &LeaseTable) -> std::io::Result<()> {
    save_text(path, &table.to_text())
}

/// [`save`] for text already rendered, so the caller can render under its lock and write
/// outside it.
pub fn save_text(path: &Path, text: &str) -> std::io::Result<()> {
    kubenet_cluster::state::write_atomic(path, text.as_bytes(), 0o644)
}

/// Reads the lease file; a missing file is an empty table.
pub fn load(path: &Path, now: u64) -> std::io::Result<(LeaseTable, usize)> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(LeaseTable::from_text(&text, now)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((LeaseTable::default(), 0)),
        Err(e) => Err(e),
    }
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
}
