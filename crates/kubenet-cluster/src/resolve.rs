//! From the file as written (`raw`) to the resolved lab (`model`): defaults, ids, MACs and
//! addresses, and every rule that spans more than one value. Problems are collected, not
//! returned at the first, so a user fixes a file in one pass. Pure: nothing here looks at the
//! host.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use toml::Spanned;

use crate::error::{LineIndex, Problem};
use crate::model::{DhcpRange, Dns, HostEntry, Lab, Login, Network, Vm, parse_hex_bytes};
use crate::raw::{RawGroup, RawLab};
use crate::units::{Bytes, LeaseTime};

/// Defaults of the reference lab, used where the file says nothing.
const SUBNET: &str = "192.168.1.0/24";
const HOST_NAME: &str = "vmhost";
const DOMAIN: &str = "kubevms";
const LEASE_TIME: &str = "12h";
const IP_OFFSET: u32 = 10;
const MAC_PREFIX: [u8; 3] = [0x52, 0x52, 0x52];
const BRIDGE: &str = "kubenet0";
const USER: &str = "kube";
const VCPUS: u32 = 2;
const MEMORY: Bytes = Bytes(2 * Bytes::GIB);
/// Less does not boot a cloud image; more is a typo (QEMU's own limits lie far beyond a laptop).
const MIN_MEMORY: Bytes = Bytes(64 * Bytes::MIB);
const MAX_MEMORY: Bytes = Bytes(4 << 40);
const DISK: Bytes = Bytes(20 * Bytes::GIB);
const IMAGE: &str = "images/ubuntu-24.04-server-cloudimg-{arch}.img";
/// Where the default image comes from: Ubuntu 24.04's current cloud image for the guest's
/// architecture.
pub const IMAGE_URL: &str = "https://cloud-images.ubuntu.com/noble/current/noble-server-cloudimg-{arch}.img";
/// MACs carry the id in three bytes.
const MAX_VMS: u32 = 1 << 24;
const DNS_PORT: u16 = 53;

struct Ctx<'a> {
    index: LineIndex<'a>,
    problems: Vec<Problem>,
}

impl Ctx<'_> {
    fn at(&mut self, span: Range<usize>, key: impl Into<String>, message: impl Into<String>) {
        let (line, column) = self.index.locate(span.start);
        self.problems.push(Problem { line, column, key: key.into(), message: message.into() });
    }

    /// Parses a spanned string, reporting the error at its place.
    fn parse<T>(&mut self, v: &Spanned<String>, key: &str, f: impl FnOnce(&str) -> Result<T, String>) -> Option<T> {
        match f(v.get_ref()) {
            Ok(t) => Some(t),
            Err(e) => {
                self.at(v.span(), key, e);
                None
            }
        }
    }
}

/// Whether `s` is a DNS label as RFC 1123 allows for host names: 1-63 letters, digits and
/// hyphens, not starting or ending with a hyphen.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn check_label(s: &str, what: &str) -> Result<String, String> {
    if is_dns_label(s) {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(format!(
            "`{s}` is not a valid {what}: use 1-63 letters, digits and hyphens, not starting or ending with a hyphen"
        ))
    }
}

fn check_domain(s: &str) -> Result<String, String> {
    let d = s.strip_suffix('.').unwrap_or(s);
    if d.len() <= 253 && d.split('.').all(is_dns_label) {
        Ok(d.to_ascii_lowercase())
    } else {
        Err(format!("`{s}` is not a valid domain: use dot-separated DNS labels, e.g. \"kubevms\" or \"lab.example\""))
    }
}

fn parse_subnet(s: &str) -> Result<Ipv4Net, String> {
    let net: Ipv4Net =
        s.parse().map_err(|_| format!("`{s}` is not an IPv4 network in CIDR form, e.g. \"192.168.1.0/24\""))?;
    if net.prefix_len() > 30 {
        return Err(format!("`{s}` is too small: a lab needs at least a /30"));
    }
    if net.addr() != net.network() {
        return Err(format!("`{s}` has host bits set: did you mean \"{}\"?", net.trunc()));
    }
    Ok(net)
}

/// A download address kubenet can fetch: http or https.
fn check_url(s: &str) -> Result<String, String> {
    match s.split_once("://") {
        Some((scheme, rest))
            if matches!(scheme.to_ascii_lowercase().as_str(), "http" | "https") && !rest.is_empty() =>
        {
            Ok(s.to_owned())
        }
        _ => Err(format!("`{s}` is not an http:// or https:// address (kubenet image pull downloads over HTTP)")),
    }
}

/// cloud-init YAML that must be a mapping (of cloud-config keys, or network-config's).
fn check_yaml_mapping(s: &str, what: &str) -> Result<String, String> {
    match serde_yaml_ng::from_str::<serde_yaml_ng::Value>(s) {
        Ok(serde_yaml_ng::Value::Mapping(_) | serde_yaml_ng::Value::Null) => Ok(s.to_owned()),
        Ok(other) => {
            let found = match other {
                serde_yaml_ng::Value::Sequence(_) => "a list",
                serde_yaml_ng::Value::String(_) => "a string",
                _ => "a single value",
            };
            Err(format!("{what} must be a YAML mapping (`key: value` lines), but this is {found}"))
        }
        Err(e) => Err(format!("{what} is not YAML: {e}")),
    }
}

/// The login key file `path` (`~` is `home`, a relative path the config folder's): there, and
/// an OpenSSH public key ("TYPE BASE64 [comment]"), since every VM's seed carries it.
pub fn check_public_key_file(path: &str, home: Option<&Path>, base_dir: &Path) -> Result<PathBuf, String> {
    let full = match (path.strip_prefix("~/"), home) {
        (Some(rest), Some(h)) => h.join(rest),
        _ => base_dir.join(path),
    };
    // A key is a line; a regular file, read no further than 16 KiB (never /dev/zero to its end).
    let text = (|| {
        use std::io::Read;
        let f = std::fs::File::open(&full)?;
        if !f.metadata()?.is_file() {
            return Err(std::io::Error::other("not a regular file"));
        }
        let mut text = String::new();
        f.take(16 << 10).read_to_string(&mut text)?;
        Ok(text)
    })()
    .map_err(|e: std::io::Error| format!("cannot read {}: {e}", full.display()))?;
    let mut words = text.split_whitespace();
    let kind = words.next().unwrap_or("");
    let key = words.next().unwrap_or("");
    let known = kind.starts_with("ssh-") || kind.starts_with("ecdsa-sha2-") || kind.starts_with("sk-");
    let base64 = key.len() >= 16 && key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='));
    if known && base64 {
        // `~` stays for the reader to expand; a relative path is the config's folder's.
        Ok(if path.starts_with("~/") { PathBuf::from(path) } else { full })
    } else if text.contains("PRIVATE KEY") {
        Err(format!("{} is a private key: name the public one (usually the same path with .pub)", full.display()))
    } else {
        Err(format!("{} is not an OpenSSH public key (`ssh-ed25519 AAAA... comment`)", full.display()))
    }
}

fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, DNS_PORT));
    }
    s.parse::<SocketAddr>()
        .map_err(|_| format!("`{s}` is not an address: write \"IP\" or \"IP:PORT\" (\"[IPv6]:PORT\")"))
}

/// Why `ip` cannot be a VM's or host entry's address: outside the subnet, or its network or
/// broadcast address.
fn usable_message(net: &Ipv4Net, ip: Ipv4Addr) -> Option<String> {
    if !net.contains(&ip) {
        Some(format!("{ip} is outside the subnet {net}"))
    } else if ip == net.network() {
        Some(format!("{ip} is the network address of {net}"))
    } else if ip == net.broadcast() {
        Some(format!("{ip} is the broadcast address of {net}"))
    } else {
        None
    }
}

pub(crate) fn resolve(raw: RawLab, text: &str, source: String, base_dir: &Path) -> Result<Lab, Vec<Problem>> {
    let mut cx = Ctx { index: LineIndex::new(text), problems: Vec::new() };
    let n = raw.network;

    let subnet = match &n.subnet {
        Some(v) => cx.parse(v, "network.subnet", parse_subnet),
        None => Some(SUBNET.parse().expect("default subnet")),
    };
    // Without a subnet nothing else about addresses can be judged; report what we have.
    let Some(subnet) = subnet else { return Err(cx.problems) };

    let host_name = match &n.host_name {
        Some(v) => cx.parse(v, "network.host_name", |s| check_label(s, "host name")),
        None => Some(HOST_NAME.to_string()),
    }
    .unwrap_or_default();

    let host_address = match &n.host_address {
        Some(v) => {
            if let Some(m) = usable_message(&subnet, *v.get_ref()) {
                cx.at(v.span(), "network.host_address", m);
            }
            *v.get_ref()
        }
        None => subnet.hosts().next().expect("a /30 has hosts"),
    };

    let dhcp_range = match &n.dhcp_range {
        Some(v) => {
            let (start, end) = *v.get_ref();
            for ip in [start, end] {
                if let Some(m) = usable_message(&subnet, ip) {
                    cx.at(v.span(), "network.dhcp_range", m);
                }
            }
            if start > end {
                cx.at(v.span(), "network.dhcp_range", format!("the range is reversed: {start} comes after {end}"));
            }
            DhcpRange { start, end }
        }
        // The reference lab's .2-.20, scaled to the subnet: the first 19 host addresses after the
        // host's own.
        None => {
            let mut hosts = subnet.hosts().skip(1);
            let start = hosts.next().unwrap_or(host_address);
            let end = hosts.take(18).last().unwrap_or(start);
            DhcpRange { start, end }
        }
    };

    let lease_time = match &n.lease_time {
        Some(v) => cx.parse(v, "network.lease_time", |s| s.parse::<LeaseTime>()),
        None => LEASE_TIME.parse().ok(),
    }
    .unwrap_or(LeaseTime::Infinite);

    let domain = match &n.domain {
        Some(v) => cx.parse(v, "network.domain", check_domain),
        None => Some(DOMAIN.to_string()),
    }
    .unwrap_or_default();

    let ip_offset = n.ip_offset.as_ref().map_or(IP_OFFSET, |v| *v.get_ref());
    if let Some(v) = &n.ip_offset {
        let hosts = u32::from(subnet.broadcast()).saturating_sub(u32::from(subnet.network()));
        if ip_offset == 0 || ip_offset >= hosts {
            cx.at(
                v.span(),
                "network.ip_offset",
                format!(
                    "{ip_offset} puts the VMs outside {subnet}: VM id 0 gets the subnet's address number ip_offset, so use 1 to {}",
                    hosts.saturating_sub(1)
                ),
            );
        }
    }

    let mac_prefix = match &n.mac_prefix {
        Some(v) => cx.parse(v, "network.mac_prefix", |s| {
            let b = parse_hex_bytes(s, 3)?;
            if b[0] & 1 == 1 {
                return Err(format!("`{s}` is a multicast prefix: the first byte must be even, e.g. 52:52:52"));
            }
            Ok([b[0], b[1], b[2]])
        }),
        None => Some(MAC_PREFIX),
    }
    .unwrap_or(MAC_PREFIX);

    let upstream: Vec<SocketAddr> = n
        .upstream
        .iter()
        .flatten()
        .enumerate()
        .filter_map(|(i, v)| cx.parse(v, &format!("network.upstream[{i}]"), parse_upstream))
        .collect();

    let bridge = match &n.bridge {
        // Linux interface names are at most 15 bytes (IFNAMSIZ - 1).
        Some(v) => cx.parse(v, "network.bridge", |s| {
            if s.is_empty() || s.len() > 15 || s.contains(['/', ' ', ':']) {
                Err(format!("`{s}` is not a valid interface name: use 1-15 characters without '/', ':' or spaces"))
            } else {
                Ok(s.to_string())
            }
        }),
        None => Some(BRIDGE.to_string()),
    }
    .unwrap_or_default();

    // Names and addresses already taken, with the key that took them, for duplicate checks.
    let mut names: HashMap<String, String> = HashMap::new();
    let mut addrs: HashMap<Ipv4Addr, String> = HashMap::new();
    names.insert(host_name.clone(), "network.host_name".into());
    addrs.insert(host_address, "network.host_address".into());

    let mut hosts = Vec::new();
    for (name, addr) in &n.hosts {
        let key = format!("network.hosts.{name}");
        let ip = *addr.get_ref();
        match check_label(name, "host name") {
            Err(e) => cx.at(addr.span(), &key, e),
            Ok(name) => {
                if let Some(m) = usable_message(&subnet, ip) {
                    cx.at(addr.span(), &key, m);
                } else if let Some(prev) = addrs.get(&ip) {
                    cx.at(addr.span(), &key, format!("{ip} is already taken by {prev}"));
                }
                if let Some(prev) = names.get(&name) {
                    cx.at(addr.span(), &key, format!("the name `{name}` is already used by {prev}"));
                }
                names.insert(name.clone(), key.clone());
                addrs.insert(ip, key);
                hosts.push(HostEntry { name, address: ip });
            }
        }
    }

    let dns = Dns {
        local_ttl: raw.dns.local_ttl.unwrap_or(0),
        allow: match &raw.dns.allow {
            Some(list) => list
                .iter()
                .enumerate()
                .filter_map(|(i, v)| {
                    cx.parse(v, &format!("dns.allow[{i}]"), |s| {
                        s.parse::<ipnet::IpNet>()
                            .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                            .map(|n| n.trunc())
                            .map_err(|_| format!("`{s}` is not an address or a network in CIDR form"))
                    })
                })
                .collect(),
            None => vec![
                ipnet::IpNet::V4(subnet),
                "127.0.0.0/8".parse().expect("loopback"),
                "::1/128".parse().expect("loopback"),
            ],
        },
    };

    let login = Login {
        user: match &raw.login.user {
            Some(v) => cx.parse(v, "login.user", |s| {
                // Debian's adduser rule, the strictest of the cloud images'.
                let ok = !s.is_empty()
                    && s.len() <= 32
                    && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                    && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
                if ok { Ok(s.to_string()) } else { Err(format!("`{s}` is not a valid user name: use lower-case letters, digits, '_' and '-', starting with a letter")) }
            }),
            None => Some(USER.to_string()),
        }
        .unwrap_or_default(),
        password: raw.login.password,
        ssh_public_key: raw.login.ssh_public_key.as_ref().and_then(|v| {
            // Under sudo (`sudo kubenet serve`) `~` is not the user's home, and serve never reads
            // the key: only the user's own commands, which do, check a `~` path.
            if v.get_ref().starts_with("~/") && std::env::var_os("SUDO_USER").is_some() {
                return Some(PathBuf::from(v.get_ref()));
            }
            let home = std::env::var_os("HOME").map(PathBuf::from);
            cx.parse(v, "login.ssh_public_key", |s| check_public_key_file(s, home.as_deref(), base_dir))
        }),
    };

    // Expand groups into VMs; ids run in file order across groups.
    let mut vms: Vec<Vm> = Vec::new();
    // (group index, span of the address override) for VMs whose address was given.
    let mut overridden: Vec<Option<Range<usize>>> = Vec::new();
    // Each VM's group, to point at when a rule across VMs (a name or address taken twice) fails.
    let mut group_of: Vec<Range<usize>> = Vec::new();
    for (gi, g) in raw.groups.iter().enumerate() {
        let gspan = g.span();
        let key = format!("group[{gi}]");
        let expanded = expand_group(&mut cx, g.get_ref(), gspan.clone(), &key);
        let gr = g.get_ref();
        let image_url = gr.image_url.as_ref().and_then(|v| cx.parse(v, &format!("{key}.image_url"), check_url));
        let user_data = gr
            .user_data
            .as_ref()
            .and_then(|v| cx.parse(v, &format!("{key}.user_data"), |s| check_yaml_mapping(s, "user_data")));
        let network_config = gr
            .network_config
            .as_ref()
            .and_then(|v| cx.parse(v, &format!("{key}.network_config"), |s| check_yaml_mapping(s, "network_config")));
        // The guests' architecture; "auto" (None) is decided on the host at launch.
        let arch = match &g.get_ref().arch {
            Some(v) if v.get_ref().eq_ignore_ascii_case("auto") => None,
            Some(v) => cx.parse(v, &format!("{key}.arch"), |s| s.parse::<crate::Arch>()),
            None => None,
        };
        for (name, name_span, addr) in expanded {
            let id = vms.len() as u32;
            if id >= MAX_VMS {
                cx.at(
                    name_span,
                    format!("{key}.count"),
                    format!("a lab holds at most {MAX_VMS} VMs (the MAC carries the id in 3 bytes)"),
                );
                return Err(cx.problems);
            }
            let gr = g.get_ref();
            let memory = size(&mut cx, gr.memory.as_ref(), &format!("{key}.memory"), MEMORY);
            let disk = size(&mut cx, gr.disk.as_ref(), &format!("{key}.disk"), DISK);
            if let Some(m) = &gr.memory {
                if memory < MIN_MEMORY {
                    cx.at(
                        m.span(),
                        format!("{key}.memory"),
                        format!("{memory} is too little memory for a VM: use at least 64M"),
                    );
                } else if memory > MAX_MEMORY {
                    cx.at(
                        m.span(),
                        format!("{key}.memory"),
                        format!("{memory} is more memory than kubenet gives a VM: use at most {MAX_MEMORY}"),
                    );
                }
            }
            if let Some(d) = &gr.disk
                && disk == Bytes(0)
            {
                cx.at(d.span(), format!("{key}.disk"), "a disk of 0 bytes holds nothing: use e.g. \"20G\"");
            }
            let vcpus = gr.vcpus.as_ref().map_or(VCPUS, |v| *v.get_ref());
            if !(1..=255).contains(&vcpus) {
                let span = gr.vcpus.as_ref().map_or(gspan.clone(), |v| v.span());
                cx.at(span, format!("{key}.vcpus"), format!("{vcpus} vCPUs: use 1 to 255"));
            }
            let role = match &gr.role {
                Some(v) => cx.parse(v, &format!("{key}.role"), |s| check_label(s, "role")),
                None => None,
            }
            .unwrap_or_else(|| {
                gr.name.as_ref().or(gr.prefix.as_ref()).map(|s| s.get_ref().to_ascii_lowercase()).unwrap_or_default()
            });
            let image_sha256 = match &gr.image_sha256 {
                Some(v) => cx.parse(v, &format!("{key}.image_sha256"), |s| {
                    let s = s.to_ascii_lowercase();
                    if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
                        Ok(s)
                    } else {
                        Err(format!("`{s}` is not a SHA-256: use its 64 hex digits"))
                    }
                }),
                None => None,
            };
            let id_bytes = id.to_be_bytes();
            vms.push(Vm {
                id,
                fqdn: format!("{name}.{domain}"),
                name,
                role,
                mac: crate::Mac([mac_prefix[0], mac_prefix[1], mac_prefix[2], id_bytes[1], id_bytes[2], id_bytes[3]]),
                ip: addr.as_ref().map_or(Ipv4Addr::UNSPECIFIED, |a| *a.get_ref()),
                vcpus,
                memory,
                disk,
                arch,
                image: PathBuf::from(gr.image.as_deref().unwrap_or(IMAGE)),
                // The default image comes from Ubuntu unless the group says otherwise.
                image_url: image_url
                    .clone()
                    .or_else(|| (gr.image.as_deref().unwrap_or(IMAGE) == IMAGE).then(|| IMAGE_URL.to_owned())),
                image_sha256: image_sha256.clone(),
                user_data: user_data.clone(),
                network_config: network_config.clone(),
            });
            overridden.push(addr.map(|a| a.span()));
            group_of.push(gspan.clone());
        }
    }
    if vms.is_empty() && raw.groups.is_empty() {
        cx.at(0..0, "group", "the lab has no VMs: add a [[group]] with a `name` or a `prefix` and `count`");
    }

    // Capacity first: with too many VMs, per-VM errors would only repeat it hundreds of times.
    let first = u32::from(subnet.network()).saturating_add(ip_offset);
    let last = u32::from(subnet.broadcast()) - 1;
    let free = if first > last { 0 } else { last - first + 1 };
    let needed = overridden.iter().filter(|o| o.is_none()).count() as u32;
    if needed > free {
        let first_ip = Ipv4Addr::from(first.min(last + 1));
        // Blame the subnet (or the offset) where the file sets it, else the last group.
        let (span, key) = match (&n.subnet, &n.ip_offset) {
            (Some(v), _) => (v.span(), "network.subnet".to_owned()),
            (None, Some(v)) => (v.span(), "network.ip_offset".to_owned()),
            (None, None) => {
                (raw.groups.last().map_or(0..0, |g| g.span()), format!("group[{}]", raw.groups.len().saturating_sub(1)))
            }
        };
        cx.at(
            span,
            key,
            format!(
                "the lab has {needed} VMs without an address override but {subnet} has only {free} free addresses from {first_ip} (network.ip_offset = {ip_offset}) to {}: use a larger subnet, a smaller ip_offset or fewer VMs",
                Ipv4Addr::from(last)
            ),
        );
        return Err(cx.problems);
    }

    for ((vm, ovr), group) in vms.iter_mut().zip(&overridden).zip(&group_of) {
        let key = format!("VM {}", vm.name);
        if ovr.is_none() {
            vm.ip = Ipv4Addr::from(first + vm.id);
        }
        // The address override if there is one, else the group that made the VM.
        let at = ovr.clone().unwrap_or_else(|| group.clone());
        if let Some(m) = usable_message(&subnet, vm.ip) {
            cx.at(at, &key, m);
        } else if let Some(prev) = addrs.get(&vm.ip) {
            cx.at(at, &key, format!("{} of {} is already taken by {prev}", vm.ip, vm.name));
        }
        addrs.insert(vm.ip, format!("VM {}", vm.name));
    }
    // Names: VMs against each other, the host and the extra entries.
    let mut vm_names: HashMap<&str, u32> = HashMap::new();
    for (vm, group) in vms.iter().zip(&group_of) {
        if let Some(prev) = vm_names.insert(&vm.name, vm.id) {
            cx.at(
                group.clone(),
                format!("VM {}", vm.name),
                format!("the name `{}` is used by VM ids {prev} and {}", vm.name, vm.id),
            );
        } else if let Some(prev) = names.get(&vm.name) {
            cx.at(
                group.clone(),
                format!("VM {}", vm.name),
                format!("the name `{}` is already used by {prev}", vm.name),
            );
        }
    }

    let state_dir = raw.state_dir.as_ref().map_or_else(|| base_dir.to_path_buf(), |d| base_dir.join(d.get_ref()));

    if !cx.problems.is_empty() {
        cx.problems.sort_by_key(|p| (p.line == 0, p.line, p.column));
        return Err(cx.problems);
    }
    Ok(Lab {
        source,
        state_dir,
        accelerator: raw.accelerator.map(|a| a.into_inner()).unwrap_or_default(),
        firmware: raw.firmware.map(|f| f.into_inner()).unwrap_or_default(),
        network: Network {
            subnet,
            host_name,
            host_address,
            dhcp_range,
            lease_time,
            domain,
            ip_offset,
            mac_prefix,
            upstream,
            bridge,
            nat: n.nat.unwrap_or(true),
            hosts,
        },
        dns,
        login,
        vms,
    })
}

fn size(cx: &mut Ctx, v: Option<&Spanned<String>>, key: &str, default: Bytes) -> Bytes {
    match v {
        Some(v) => cx.parse(v, key, |s| s.parse::<Bytes>()).unwrap_or(default),
        None => default,
    }
}

/// The VMs of one group: (name, span to blame, address override).
fn expand_group(
    cx: &mut Ctx,
    g: &RawGroup,
    gspan: Range<usize>,
    key: &str,
) -> Vec<(String, Range<usize>, Option<Spanned<Ipv4Addr>>)> {
    match (&g.name, &g.prefix) {
        (Some(name), None) => {
            if let Some(c) = &g.count {
                cx.at(c.span(), format!("{key}.count"), "`count` goes with `prefix`; a group with `name` is one VM");
            }
            if let Some((vm, a)) = g.addresses.iter().next() {
                cx.at(
                    a.span(),
                    format!("{key}.addresses.{vm}"),
                    "`addresses` is for numbered groups; a one-VM group uses `address`",
                );
            }
            match cx.parse(name, &format!("{key}.name"), |s| check_label(s, "VM name")) {
                Some(n) => vec![(n, name.span(), g.address.clone())],
                None => Vec::new(),
            }
        }
        (None, Some(prefix)) => {
            let Some(count) = &g.count else {
                cx.at(prefix.span(), format!("{key}.count"), "a group with `prefix` needs `count`, the number of VMs");
                return Vec::new();
            };
            if *count.get_ref() == 0 {
                cx.at(count.span(), format!("{key}.count"), "count must be at least 1");
            }
            if let Some(a) = &g.address {
                cx.at(
                    a.span(),
                    format!("{key}.address"),
                    "`address` is for one-VM groups; a numbered group uses `addresses = { NAME = \"IP\" }`",
                );
            }
            let n = *count.get_ref();
            // The longest name must still be a label: check it before making thousands.
            let longest = format!("{}{}", prefix.get_ref(), n.saturating_sub(1));
            let Some(_) = cx.parse(&Spanned::new(prefix.span(), longest), &format!("{key}.prefix"), |s| {
                check_label(s, "VM name prefix")
            }) else {
                return Vec::new();
            };
            let prefix_lc = prefix.get_ref().to_ascii_lowercase();
            let names: Vec<String> = (0..n).map(|i| format!("{prefix_lc}{i}")).collect();
            for (vm, a) in &g.addresses {
                if !names.iter().any(|n| n.eq_ignore_ascii_case(vm)) {
                    cx.at(
                        a.span(),
                        format!("{key}.addresses.{vm}"),
                        format!("`{vm}` is not a VM of this group ({prefix_lc}0..{prefix_lc}{})", n.saturating_sub(1)),
                    );
                }
            }
            names
                .into_iter()
                .map(|name| {
                    let addr = g.addresses.iter().find(|(k, _)| k.eq_ignore_ascii_case(&name)).map(|(_, a)| a.clone());
                    (name, prefix.span(), addr)
                })
                .collect()
        }
        (Some(name), Some(_)) => {
            cx.at(
                name.span(),
                format!("{key}.name"),
                "a group has either `name` (one VM) or `prefix` and `count`, not both",
            );
            Vec::new()
        }
        (None, None) => {
            cx.at(gspan, key, "a group needs `name` (one VM) or `prefix` and `count`");
            Vec::new()
        }
    }
}
