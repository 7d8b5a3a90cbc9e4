//! The resolved lab: every VM with its id, MAC, address and sizes worked out. This is what every
//! other crate reads; it is only ever built by `resolve`, so its invariants (unique names, MACs
//! and addresses, all inside the subnet) hold. Pure.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::units::{Bytes, LeaseTime};

/// A 48-bit Ethernet address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4], b[5])
    }
}

impl std::str::FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut out = [0u8; 6];
        let bytes = parse_hex_bytes(s, 6)?;
        out.copy_from_slice(&bytes);
        Ok(Mac(out))
    }
}

impl Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Parses `n` colon-separated hex bytes ("52:52:52").
pub(crate) fn parse_hex_bytes(s: &str, n: usize) -> Result<Vec<u8>, String> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != n {
        return Err(format!("`{s}` is not {n} colon-separated hex bytes"));
    }
    parts
        .iter()
        .map(|p| {
            if p.len() != 2 {
                return Err(format!("`{s}`: `{p}` is not a two-digit hex byte"));
            }
            u8::from_str_radix(p, 16).map_err(|_| format!("`{s}`: `{p}` is not a hex byte"))
        })
        .collect()
}

/// How QEMU runs the guests' CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    /// hvf on macOS, kvm on Linux when /dev/kvm opens, tcg otherwise. Decided on the host at
    /// launch time, never while parsing.
    #[default]
    Auto,
    Kvm,
    Hvf,
    Tcg,
}

/// A CPU architecture: the host's, or a guest's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    X86_64,
    Aarch64,
}

/// The host operating systems kubenet runs on. Detected in one place ([`Os::HOST`]); every
/// difference between them is data that takes an `Os`, so both are testable anywhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Os {
    MacOs,
    Linux,
}

impl Os {
    /// The OS this binary was built for, which is the host's; None elsewhere.
    pub const HOST: Option<Os> = if cfg!(target_os = "macos") {
        Some(Os::MacOs)
    } else if cfg!(target_os = "linux") {
        Some(Os::Linux)
    } else {
        None
    };
}

impl Arch {
    /// Both, in a fixed order.
    pub const ALL: [Arch; 2] = [Arch::X86_64, Arch::Aarch64];

    /// The architecture this binary was built for, which is the host's: kubenet runs on x86_64
    /// and aarch64 hosts only.
    #[cfg(target_arch = "x86_64")]
    pub const HOST: Arch = Arch::X86_64;
    #[cfg(target_arch = "aarch64")]
    pub const HOST: Arch = Arch::Aarch64;

    /// The name cloud images use for it (Ubuntu's and Debian's file names): amd64, arm64.
    pub fn cloud_name(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Aarch64 => "arm64",
        }
    }

    /// QEMU's system emulator for guests of this architecture.
    pub fn qemu_binary(self) -> &'static str {
        match self {
            Arch::X86_64 => "qemu-system-x86_64",
            Arch::Aarch64 => "qemu-system-aarch64",
        }
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!("kubenet runs on x86_64 and aarch64 hosts only");

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        })
    }
}

impl std::str::FromStr for Arch {
    type Err = String;
    /// QEMU's and the kernel's names, and the cloud images' (amd64, arm64) as well.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "x86_64" | "amd64" => Ok(Arch::X86_64),
            "aarch64" | "arm64" => Ok(Arch::Aarch64),
            _ => Err(format!(
                "`{s}` is not a supported architecture: use \"auto\" (the host's), \"x86_64\" or \"aarch64\""
            )),
        }
    }
}

/// Which firmware boots the guests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FirmwareChoice {
    /// UEFI when its files are found (edk2 beside QEMU on macOS, OVMF/AAVMF under /usr/share
    /// on Linux), else BIOS on x86; aarch64 has only UEFI.
    #[default]
    Auto,
    /// UEFI, or an error naming what to install.
    Uefi,
    /// SeaBIOS, QEMU's own; x86 only.
    Bios,
}

#[derive(Clone, Debug, Serialize)]
pub struct Lab {
    /// The file it was read from, or the built-in reference lab.
    pub source: String,
    /// Where VM folders, leases and SSH files live.
    pub state_dir: PathBuf,
    pub accelerator: Accelerator,
    pub firmware: FirmwareChoice,
    pub network: Network,
    pub dns: Dns,
    pub login: Login,
    pub vms: Vec<Vm>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Dns {
    /// The TTL of the lab's own names.
    pub local_ttl: u32,
    /// Who may ask: the lab's subnet and loopback unless the config says otherwise.
    pub allow: Vec<ipnet::IpNet>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Network {
    pub subnet: Ipv4Net,
    pub host_name: String,
    pub host_address: Ipv4Addr,
    pub dhcp_range: DhcpRange,
    pub lease_time: LeaseTime,
    /// Lower case, no trailing dot.
    pub domain: String,
    pub ip_offset: u32,
    #[serde(serialize_with = "ser_prefix")]
    pub mac_prefix: [u8; 3],
    /// Empty: the host's own resolvers.
    pub upstream: Vec<SocketAddr>,
    pub bridge: String,
    /// On Linux, masquerade the lab's traffic to other networks (nftables) and turn on IP
    /// forwarding while `kubenet serve` runs.
    pub nat: bool,
    /// DHCP relay agents (RFC 1542) allowed to forward requests from a network other than the
    /// lab's interface, by the address they send from. Empty: relayed requests are served only
    /// when they arrive on the lab's own interface.
    pub dhcp_relays: Vec<Ipv4Addr>,
    /// Extra names in the lab's domain, sorted by name.
    pub hosts: Vec<HostEntry>,
}

fn ser_prefix<S: serde::Serializer>(p: &[u8; 3], s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("{:02x}:{:02x}:{:02x}", p[0], p[1], p[2]))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct DhcpRange {
    pub start: Ipv4Addr,
    pub end: Ipv4Addr,
}

impl DhcpRange {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        (self.start..=self.end).contains(&ip)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HostEntry {
    pub name: String,
    pub address: Ipv4Addr,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Login {
    pub user: String,
    /// Never printed: `kubenet config` shows only whether one is set.
    #[serde(skip)]
    pub password: Option<String>,
    pub ssh_public_key: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Vm {
    pub id: u32,
    pub name: String,
    pub role: String,
    pub fqdn: String,
    pub mac: Mac,
    pub ip: Ipv4Addr,
    pub vcpus: u32,
    /// Bytes.
    pub memory: Bytes,
    /// Bytes.
    pub disk: Bytes,
    /// The guest's CPU architecture; None ("auto"): the host's. A guest of another architecture
    /// than the host's runs under TCG.
    #[serde(serialize_with = "ser_arch")]
    pub arch: Option<Arch>,
    /// The base image; relative paths are taken from the state directory. `{arch}` stands for
    /// the guest's architecture as cloud images name it (amd64, arm64): see [`Vm::image_for`].
    pub image: PathBuf,
    /// Where `kubenet image pull` downloads the base image from; `{arch}` as in `image`. None:
    /// the group named its own image and gave no URL, so only the user can provide it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_url: Option<String>,
    /// The image's SHA-256 (lowercase hex); None: taken from the SHA256SUMS file beside the URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_sha256: Option<String>,
    /// Extra `#cloud-config` YAML for this VM's user-data.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    /// A cloud-init network-config (version 1 or 2) for this VM's seed; none: cloud-init's
    /// fallback, DHCP on the first NIC.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network_config: Option<String>,
}

fn ser_arch<S: serde::Serializer>(a: &Option<Arch>, s: S) -> Result<S::Ok, S::Error> {
    match a {
        Some(a) => s.collect_str(a),
        None => s.serialize_str("auto"),
    }
}

impl Vm {
    /// The guest's architecture on a host of architecture `host`.
    pub fn arch_on(&self, host: Arch) -> Arch {
        self.arch.unwrap_or(host)
    }

    /// The base image's path as written, `{arch}` replaced for a host of architecture `host`.
    pub fn image_for(&self, host: Arch) -> PathBuf {
        PathBuf::from(self.image.to_string_lossy().replace("{arch}", self.arch_on(host).cloud_name()))
    }

    /// The download URL, `{arch}` replaced as in [`Vm::image_for`].
    pub fn image_url_for(&self, host: Arch) -> Option<String> {
        self.image_url.as_ref().map(|u| u.replace("{arch}", self.arch_on(host).cloud_name()))
    }
}

impl Lab {
    pub fn vm_by_mac(&self, mac: Mac) -> Option<&Vm> {
        self.vms.iter().find(|v| v.mac == mac)
    }

    pub fn vm_by_name(&self, name: &str) -> Option<&Vm> {
        self.vms.iter().find(|v| v.name.eq_ignore_ascii_case(name))
    }

    pub fn vm_by_ip(&self, ip: Ipv4Addr) -> Option<&Vm> {
        self.vms.iter().find(|v| v.ip == ip)
    }

    /// The VMs a command names, in lab order (no names: all of them). An unknown name is an
    /// error listing the lab's names.
    pub fn select(&self, names: &[String]) -> Result<Vec<&Vm>, String> {
        if let Some(bad) = names.iter().find(|n| self.vm_by_name(n).is_none()) {
            return Err(format!("no VM named `{bad}` in this lab (its VMs: {})", self.vm_list()));
        }
        Ok(self
            .vms
            .iter()
            .filter(|v| names.is_empty() || names.iter().any(|n| n.eq_ignore_ascii_case(&v.name)))
            .collect())
    }

    /// The VMs that command-line targets name, in lab order and each once: a VM's name
    /// (any case), a shell-style glob over the names (`'control*'`, `worker[01]`), or a role
    /// (`@control`, `@worker`; `@all` is every VM). A target that names nothing is an error that
    /// says what the lab has, so that a typo never runs a command on fewer VMs than meant.
    pub fn targets(&self, targets: &[String]) -> Result<Vec<&Vm>, String> {
        let mut chosen = vec![false; self.vms.len()];
        for target in targets {
            let hits: Vec<usize> = if let Some(role) = target.strip_prefix('@') {
                let hits: Vec<usize> =
                    (0..self.vms.len()).filter(|&i| role == "all" || self.vms[i].role == role).collect();
                if hits.is_empty() {
                    let mut roles: Vec<&str> = Vec::new();
                    for vm in &self.vms {
                        if !roles.contains(&vm.role.as_str()) {
                            roles.push(&vm.role);
                        }
                    }
                    return Err(format!(
                        "no VM has the role `{role}` in this lab (its roles: @all, @{})",
                        roles.join(", @")
                    ));
                }
                hits
            } else if target.contains(['*', '?', '[']) {
                let pattern = glob::Pattern::new(&target.to_ascii_lowercase())
                    .map_err(|e| format!("`{target}` is not a glob pattern: {e}"))?;
                let hits: Vec<usize> =
                    (0..self.vms.len()).filter(|&i| pattern.matches(&self.vms[i].name.to_ascii_lowercase())).collect();
                if hits.is_empty() {
                    return Err(format!("`{target}` matches no VM in this lab (its VMs: {})", self.vm_list()));
                }
                hits
            } else {
                match self.vms.iter().position(|v| v.name.eq_ignore_ascii_case(target)) {
                    Some(i) => vec![i],
                    None => {
                        return Err(format!("no VM named `{target}` in this lab (its VMs: {})", self.vm_list()));
                    }
                }
            };
            for i in hits {
                chosen[i] = true;
            }
        }
        Ok(self.vms.iter().zip(chosen).filter(|(_, c)| *c).map(|(v, _)| v).collect())
    }

    fn vm_list(&self) -> String {
        self.vms.iter().map(|v| v.name.as_str()).collect::<Vec<_>>().join(", ")
    }

    /// The folder holding one VM's disk, seed, keys and sockets.
    pub fn vm_dir(&self, vm: &Vm) -> PathBuf {
        self.state_dir.join(&vm.name)
    }

    /// The DHCP lease file, in dnsmasq's format.
    pub fn lease_file(&self) -> PathBuf {
        self.state_dir.join("leases")
    }

    /// Every name the lab's DNS answers for with its address: the host, the VMs and the extra
    /// host entries, in that order.
    pub fn names(&self) -> impl Iterator<Item = (&str, Ipv4Addr)> {
        let n = &self.network;
        std::iter::once((n.host_name.as_str(), n.host_address))
            .chain(self.vms.iter().map(|v| (v.name.as_str(), v.ip)))
            .chain(n.hosts.iter().map(|h| (h.name.as_str(), h.address)))
    }

    /// The lease duration, or None for infinite.
    pub fn lease_duration(&self) -> Option<Duration> {
        match self.network.lease_time {
            LeaseTime::Finite(d) => Some(d),
            LeaseTime::Infinite => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trip() {
        let m: Mac = "52:52:52:00:01:2c".parse().unwrap();
        assert_eq!(m.0, [0x52, 0x52, 0x52, 0, 1, 0x2c]);
        assert_eq!(m.to_string(), "52:52:52:00:01:2c");
        assert!("52:52:52".parse::<Mac>().is_err());
        assert!("52:52:52:00:01:zz".parse::<Mac>().is_err());
    }

    #[test]
    fn select_names_in_lab_order() {
        let lab = crate::parse(crate::REFERENCE_CONFIG, crate::Source::Embedded, "/".as_ref()).unwrap();
        let names = |v: Vec<&Vm>| v.iter().map(|v| v.name.clone()).collect::<Vec<_>>();
        assert_eq!(lab.select(&[]).unwrap().len(), 7);
        assert_eq!(names(lab.select(&["worker1".into(), "Gateway".into()]).unwrap()), ["gateway", "worker1"]);
        let err = lab.select(&["worker9".into()]).unwrap_err();
        assert!(err.starts_with("no VM named `worker9`") && err.contains("control0, control1"), "{err}");
    }

    #[test]
    fn targets_by_name_glob_and_role_in_lab_order_once_each() {
        let lab = crate::parse(crate::REFERENCE_CONFIG, crate::Source::Embedded, "/".as_ref()).unwrap();
        let names = |t: &[&str]| {
            let t: Vec<String> = t.iter().map(|s| s.to_string()).collect();
            lab.targets(&t).map(|v| v.iter().map(|v| v.name.clone()).collect::<Vec<_>>())
        };
        assert_eq!(names(&["control*"]).unwrap(), ["control0", "control1", "control2"]);
        assert_eq!(names(&["@worker", "Gateway"]).unwrap(), ["gateway", "worker0", "worker1", "worker2"]);
        assert_eq!(names(&["worker[02]", "worker0", "@all"]).unwrap().len(), 7);
        assert_eq!(names(&["w*1", "worker?"]).unwrap(), ["worker0", "worker1", "worker2"]);
        assert_eq!(names(&["@control", "control1"]).unwrap(), ["control0", "control1", "control2"]);
        let err = names(&["@workers"]).unwrap_err();
        assert_eq!(err, "no VM has the role `workers` in this lab (its roles: @all, @gateway, @control, @worker)");
        let err = names(&["control0", "db*"]).unwrap_err();
        assert!(err.starts_with("`db*` matches no VM") && err.contains("worker2"), "{err}");
        assert!(names(&["worker[0"]).unwrap_err().starts_with("`worker[0` is not a glob pattern"));
        assert!(names(&["worker9"]).unwrap_err().starts_with("no VM named `worker9`"));
    }
}
