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
use crate::raw::{RawDns, RawGroup, RawLab, RawLogin, RawNetwork};
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
    let text =
        crate::state::read_capped(&full, 16 << 10).map_err(|e| format!("cannot read {}: {e}", full.display()))?;
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

/// A DHCP relay agent's address: one host's IPv4 address, as its datagrams carry it.
fn parse_relay(s: &str) -> Result<Ipv4Addr, String> {
    let ip: Ipv4Addr = s.parse().map_err(|_| format!("`{s}` is not an IPv4 address: write \"a.b.c.d\""))?;
    if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
        return Err(format!("{ip} is not one host's address: name the relay agent's own address"));
    }
    Ok(ip)
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

/// The raw lab, resolved in named steps: the network, the extra host entries, DNS, the login,
/// the groups expanded into drafts of VMs, the subnet's capacity, the VMs' addresses, and the
/// names. Each step reports its problems and goes on where it can.
pub(crate) fn resolve(raw: RawLab, text: &str, source: String, base_dir: &Path) -> Result<Lab, Vec<Problem>> {
    let mut cx = Ctx { index: LineIndex::new(text), problems: Vec::new() };
    // Without a subnet nothing else about addresses can be judged; report what we have.
    let Some(mut network) = network(&mut cx, &raw.network) else { return Err(cx.problems) };
    let mut taken = Taken::default();
    taken.names.insert(network.host_name.clone(), "network.host_name".into());
    taken.addrs.insert(network.host_address, "network.host_address".into());
    network.hosts = hosts(&mut cx, &raw.network, &network.subnet, &mut taken);
    let dns = dns(&mut cx, &raw.dns, network.subnet);
    let login = login(&mut cx, &raw.login, base_dir);
    let drafts = expand_groups(&mut cx, &raw.groups)?;
    check_capacity(&mut cx, &raw, &network, &drafts)?;
    let vms = assign_addresses(&mut cx, drafts, &network, &mut taken);
    check_names(&mut cx, &vms, &taken);
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
        network,
        dns,
        login,
        vms: vms.into_iter().map(|(vm, _)| vm).collect(),
    })
}

/// Names and addresses already taken, each with the key that took it, for duplicate checks.
#[derive(Default)]
struct Taken {
    names: HashMap<String, String>,
    addrs: HashMap<Ipv4Addr, String>,
}

/// `[network]`, with defaults, the extra host entries left for [`hosts`]. None: no usable subnet.
fn network(cx: &mut Ctx, n: &RawNetwork) -> Option<Network> {
    let subnet = match &n.subnet {
        Some(v) => cx.parse(v, "network.subnet", parse_subnet),
        None => Some(SUBNET.parse().expect("default subnet")),
    }?;
    let host_address = match &n.host_address {
        Some(v) => {
            if let Some(m) = usable_message(&subnet, *v.get_ref()) {
                cx.at(v.span(), "network.host_address", m);
            }
            *v.get_ref()
        }
        None => subnet.hosts().next().expect("a /30 has hosts"),
    };
    let ip_offset = n.ip_offset.as_ref().map_or(IP_OFFSET, |v| *v.get_ref());
    if let Some(v) = &n.ip_offset
        && let Err(m) = check_ip_offset(ip_offset, &subnet)
    {
        cx.at(v.span(), "network.ip_offset", m);
    }
    Some(Network {
        subnet,
        host_name: opt(cx, &n.host_name, "network.host_name", |s| check_label(s, "host name"), HOST_NAME.into()),
        host_address,
        dhcp_range: dhcp_range(cx, n, &subnet, host_address),
        lease_time: match &n.lease_time {
            Some(v) => cx.parse(v, "network.lease_time", |s| s.parse::<LeaseTime>()),
            None => LEASE_TIME.parse().ok(),
        }
        .unwrap_or(LeaseTime::Infinite),
        domain: opt(cx, &n.domain, "network.domain", check_domain, DOMAIN.into()),
        ip_offset,
        mac_prefix: match &n.mac_prefix {
            Some(v) => cx.parse(v, "network.mac_prefix", check_mac_prefix).unwrap_or(MAC_PREFIX),
            None => MAC_PREFIX,
        },
        upstream: n
            .upstream
            .iter()
            .flatten()
            .enumerate()
            .filter_map(|(i, v)| cx.parse(v, &format!("network.upstream[{i}]"), parse_upstream))
            .collect(),
        bridge: opt(cx, &n.bridge, "network.bridge", check_bridge, BRIDGE.into()),
        nat: n.nat.unwrap_or(true),
        dhcp_relays: n
            .dhcp_relays
            .iter()
            .flatten()
            .enumerate()
            .filter_map(|(i, v)| cx.parse(v, &format!("network.dhcp_relays[{i}]"), parse_relay))
            .collect(),
        hosts: Vec::new(),
    })
}

/// A checked string setting, or `default` when the file does not set it; a bad value is
/// reported and stands as empty (the lab is refused anyway).
fn opt(
    cx: &mut Ctx,
    v: &Option<Spanned<String>>,
    key: &str,
    check: impl FnOnce(&str) -> Result<String, String>,
    default: String,
) -> String {
    match v {
        Some(v) => cx.parse(v, key, check).unwrap_or_default(),
        None => default,
    }
}

/// `network.dhcp_range`, or the reference lab's .2-.20 scaled to the subnet: the first 19 host
/// addresses after the host's own.
fn dhcp_range(cx: &mut Ctx, n: &RawNetwork, subnet: &Ipv4Net, host_address: Ipv4Addr) -> DhcpRange {
    let Some(v) = &n.dhcp_range else {
        let mut hosts = subnet.hosts().skip(1);
        let start = hosts.next().unwrap_or(host_address);
        let end = hosts.take(18).last().unwrap_or(start);
        return DhcpRange { start, end };
    };
    let (start, end) = *v.get_ref();
    for ip in [start, end] {
        if let Some(m) = usable_message(subnet, ip) {
            cx.at(v.span(), "network.dhcp_range", m);
        }
    }
    if start > end {
        cx.at(v.span(), "network.dhcp_range", format!("the range is reversed: {start} comes after {end}"));
    }
    DhcpRange { start, end }
}

/// VM id 0 gets the subnet's address number `ip_offset`: it must be a host of the subnet.
fn check_ip_offset(ip_offset: u32, subnet: &Ipv4Net) -> Result<(), String> {
    let hosts = u32::from(subnet.broadcast()).saturating_sub(u32::from(subnet.network()));
    if ip_offset == 0 || ip_offset >= hosts {
        return Err(format!(
            "{ip_offset} puts the VMs outside {subnet}: VM id 0 gets the subnet's address number ip_offset, so use 1 to {}",
            hosts.saturating_sub(1)
        ));
    }
    Ok(())
}

/// Three bytes of a unicast MAC prefix.
fn check_mac_prefix(s: &str) -> Result<[u8; 3], String> {
    let b = parse_hex_bytes(s, 3)?;
    if b[0] & 1 == 1 {
        return Err(format!("`{s}` is a multicast prefix: the first byte must be even, e.g. 52:52:52"));
    }
    Ok([b[0], b[1], b[2]])
}

/// A Linux interface name: at most 15 bytes (IFNAMSIZ - 1), no '/', ':' or spaces.
fn check_bridge(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 15 || s.contains(['/', ' ', ':']) {
        Err(format!("`{s}` is not a valid interface name: use 1-15 characters without '/', ':' or spaces"))
    } else {
        Ok(s.to_string())
    }
}

/// `network.hosts`: extra names in the lab's domain, each a label and a free address.
fn hosts(cx: &mut Ctx, n: &RawNetwork, subnet: &Ipv4Net, taken: &mut Taken) -> Vec<HostEntry> {
    let mut hosts = Vec::new();
    for (name, addr) in &n.hosts {
        let key = format!("network.hosts.{name}");
        let ip = *addr.get_ref();
        let name = match check_label(name, "host name") {
            Ok(name) => name,
            Err(e) => {
                cx.at(addr.span(), &key, e);
                continue;
            }
        };
        if let Some(m) = usable_message(subnet, ip) {
            cx.at(addr.span(), &key, m);
        } else if let Some(prev) = taken.addrs.get(&ip) {
            cx.at(addr.span(), &key, format!("{ip} is already taken by {prev}"));
        }
        if let Some(prev) = taken.names.get(&name) {
            cx.at(addr.span(), &key, format!("the name `{name}` is already used by {prev}"));
        }
        taken.names.insert(name.clone(), key.clone());
        taken.addrs.insert(ip, key);
        hosts.push(HostEntry { name, address: ip });
    }
    hosts
}

/// `[dns]`: who may ask defaults to the lab's subnet and loopback.
fn dns(cx: &mut Ctx, raw: &RawDns, subnet: Ipv4Net) -> Dns {
    let allow = match &raw.allow {
        Some(list) => {
            list.iter().enumerate().filter_map(|(i, v)| cx.parse(v, &format!("dns.allow[{i}]"), parse_allow)).collect()
        }
        None => vec![
            ipnet::IpNet::V4(subnet),
            "127.0.0.0/8".parse().expect("loopback"),
            "::1/128".parse().expect("loopback"),
        ],
    };
    Dns { local_ttl: raw.local_ttl.unwrap_or(0), allow }
}

/// One `dns.allow` entry: a network in CIDR form, or one address.
fn parse_allow(s: &str) -> Result<ipnet::IpNet, String> {
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(ipnet::IpNet::from))
        .map(|n| n.trunc())
        .map_err(|_| format!("`{s}` is not an address or a network in CIDR form"))
}

/// `[login]`.
fn login(cx: &mut Ctx, raw: &RawLogin, base_dir: &Path) -> Login {
    let ssh_public_key = raw.ssh_public_key.as_ref().and_then(|v| {
        // Under sudo (`sudo kubenet serve`) `~` is not the user's home, and serve never reads
        // the key: only the user's own commands, which do, check a `~` path.
        if v.get_ref().starts_with("~/") && std::env::var_os("SUDO_USER").is_some() {
            return Some(PathBuf::from(v.get_ref()));
        }
        let home = std::env::var_os("HOME").map(PathBuf::from);
        cx.parse(v, "login.ssh_public_key", |s| check_public_key_file(s, home.as_deref(), base_dir))
    });
    Login {
        user: opt(cx, &raw.user, "login.user", check_user, USER.into()),
        password: raw.password.clone(),
        ssh_public_key,
    }
}

/// A user name by Debian's adduser rule, the strictest of the cloud images'.
fn check_user(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 32
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "`{s}` is not a valid user name: use lower-case letters, digits, '_' and '-', starting with a letter"
        ))
    }
}

/// A VM as its group describes it, before [`assign_addresses`] gives it an address, a MAC and
/// an FQDN.
struct Draft {
    id: u32,
    name: String,
    role: String,
    vcpus: u32,
    memory: Bytes,
    disk: Bytes,
    arch: Option<crate::Arch>,
    image: PathBuf,
    image_url: Option<String>,
    image_sha256: Option<String>,
    user_data: Option<String>,
    network_config: Option<String>,
    /// The address the file gives this VM, if it gives one.
    address: Option<Spanned<Ipv4Addr>>,
    /// The group that made the VM, to point at when a rule across VMs fails.
    group: Range<usize>,
}

/// The groups expanded into drafts of VMs; ids run in file order across groups. Stops at once
/// (Err) past the most VMs a lab can hold.
fn expand_groups(cx: &mut Ctx, groups: &[Spanned<RawGroup>]) -> Result<Vec<Draft>, Vec<Problem>> {
    let mut drafts: Vec<Draft> = Vec::new();
    for (gi, g) in groups.iter().enumerate() {
        let key = format!("group[{gi}]");
        let settings = group_settings(cx, g.get_ref(), &key);
        for (name, name_span, address) in expand_group(cx, g.get_ref(), g.span(), &key) {
            let id = drafts.len() as u32;
            if id >= MAX_VMS {
                cx.at(
                    name_span,
                    format!("{key}.count"),
                    format!("a lab holds at most {MAX_VMS} VMs (the MAC carries the id in 3 bytes)"),
                );
                return Err(std::mem::take(&mut cx.problems));
            }
            drafts.push(vm_draft(cx, g, &key, &settings, (id, name, address)));
        }
    }
    if drafts.is_empty() && groups.is_empty() {
        cx.at(0..0, "group", "the lab has no VMs: add a [[group]] with a `name` or a `prefix` and `count`");
    }
    Ok(drafts)
}

/// What a group sets for all its VMs, checked once per group.
struct GroupSettings {
    image_url: Option<String>,
    user_data: Option<String>,
    network_config: Option<String>,
    /// None: "auto", decided on the host at launch.
    arch: Option<crate::Arch>,
}

fn group_settings(cx: &mut Ctx, g: &RawGroup, key: &str) -> GroupSettings {
    let yaml = |what: &'static str| move |s: &str| check_yaml_mapping(s, what);
    GroupSettings {
        image_url: g.image_url.as_ref().and_then(|v| cx.parse(v, &format!("{key}.image_url"), check_url)),
        user_data: g.user_data.as_ref().and_then(|v| cx.parse(v, &format!("{key}.user_data"), yaml("user_data"))),
        network_config: g
            .network_config
            .as_ref()
            .and_then(|v| cx.parse(v, &format!("{key}.network_config"), yaml("network_config"))),
        arch: match &g.arch {
            Some(v) if v.get_ref().eq_ignore_ascii_case("auto") => None,
            Some(v) => cx.parse(v, &format!("{key}.arch"), |s| s.parse::<crate::Arch>()),
            None => None,
        },
    }
}

/// The VM `(id, name, address override)` of group `g` (index `key`), its sizes, vCPUs, role and
/// image checked.
fn vm_draft(
    cx: &mut Ctx,
    g: &Spanned<RawGroup>,
    key: &str,
    settings: &GroupSettings,
    (id, name, address): (u32, String, Option<Spanned<Ipv4Addr>>),
) -> Draft {
    let gr = g.get_ref();
    let memory = size(cx, gr.memory.as_ref(), &format!("{key}.memory"), MEMORY);
    if let Some(m) = &gr.memory
        && let Err(e) = check_memory(memory)
    {
        cx.at(m.span(), format!("{key}.memory"), e);
    }
    let disk = size(cx, gr.disk.as_ref(), &format!("{key}.disk"), DISK);
    if let Some(d) = &gr.disk
        && disk == Bytes(0)
    {
        cx.at(d.span(), format!("{key}.disk"), "a disk of 0 bytes holds nothing: use e.g. \"20G\"");
    }
    let vcpus = gr.vcpus.as_ref().map_or(VCPUS, |v| *v.get_ref());
    if !(1..=255).contains(&vcpus) {
        let span = gr.vcpus.as_ref().map_or(g.span(), |v| v.span());
        cx.at(span, format!("{key}.vcpus"), format!("{vcpus} vCPUs: use 1 to 255"));
    }
    let role = match &gr.role {
        Some(v) => cx.parse(v, &format!("{key}.role"), |s| check_label(s, "role")),
        None => None,
    }
    .unwrap_or_else(|| {
        gr.name.as_ref().or(gr.prefix.as_ref()).map(|s| s.get_ref().to_ascii_lowercase()).unwrap_or_default()
    });
    let image = gr.image.as_deref().unwrap_or(IMAGE);
    Draft {
        id,
        name,
        role,
        vcpus,
        memory,
        disk,
        arch: settings.arch,
        image: PathBuf::from(image),
        // The default image comes from Ubuntu unless the group says otherwise.
        image_url: settings.image_url.clone().or_else(|| (image == IMAGE).then(|| IMAGE_URL.to_owned())),
        image_sha256: gr.image_sha256.as_ref().and_then(|v| cx.parse(v, &format!("{key}.image_sha256"), check_sha256)),
        user_data: settings.user_data.clone(),
        network_config: settings.network_config.clone(),
        address,
        group: g.span(),
    }
}

/// A VM's memory: at least what boots a cloud image, at most what is surely not a typo.
fn check_memory(memory: Bytes) -> Result<(), String> {
    if memory < MIN_MEMORY {
        Err(format!("{memory} is too little memory for a VM: use at least 64M"))
    } else if memory > MAX_MEMORY {
        Err(format!("{memory} is more memory than kubenet gives a VM: use at most {MAX_MEMORY}"))
    } else {
        Ok(())
    }
}

/// A SHA-256 as 64 hex digits, lower-cased.
fn check_sha256(s: &str) -> Result<String, String> {
    let s = s.to_ascii_lowercase();
    if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(s)
    } else {
        Err(format!("`{s}` is not a SHA-256: use its 64 hex digits"))
    }
}

/// The first address VMs are numbered from, and how many the subnet has from there.
fn vm_addresses(network: &Network) -> (u32, u32) {
    let first = u32::from(network.subnet.network()).saturating_add(network.ip_offset);
    let last = u32::from(network.subnet.broadcast()) - 1;
    (first, if first > last { 0 } else { last - first + 1 })
}

/// Capacity before addresses: with too many VMs, per-VM errors would only repeat it hundreds of
/// times. Blames the subnet (or the offset) where the file sets it, else the last group.
fn check_capacity(cx: &mut Ctx, raw: &RawLab, network: &Network, drafts: &[Draft]) -> Result<(), Vec<Problem>> {
    let (first, free) = vm_addresses(network);
    let needed = drafts.iter().filter(|d| d.address.is_none()).count() as u32;
    if needed <= free {
        return Ok(());
    }
    let last = u32::from(network.subnet.broadcast()) - 1;
    let first_ip = Ipv4Addr::from(first.min(last + 1));
    let n = &raw.network;
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
            "the lab has {needed} VMs without an address override but {} has only {free} free addresses from {first_ip} (network.ip_offset = {}) to {}: use a larger subnet, a smaller ip_offset or fewer VMs",
            network.subnet,
            network.ip_offset,
            Ipv4Addr::from(last)
        ),
    );
    Err(std::mem::take(&mut cx.problems))
}

/// Each draft becomes a VM: its address (the file's, else subnet address `ip_offset + id`), its
/// MAC (prefix and id) and FQDN. An address outside the subnet or taken is reported at the
/// override, or else at the group. Returns each VM with its group's span.
fn assign_addresses(cx: &mut Ctx, drafts: Vec<Draft>, network: &Network, taken: &mut Taken) -> Vec<(Vm, Range<usize>)> {
    let (first, _) = vm_addresses(network);
    let p = network.mac_prefix;
    let mut vms = Vec::with_capacity(drafts.len());
    for d in drafts {
        let id = d.id.to_be_bytes();
        let vm = Vm {
            id: d.id,
            mac: crate::Mac([p[0], p[1], p[2], id[1], id[2], id[3]]),
            fqdn: format!("{}.{}", d.name, network.domain),
            ip: d.address.as_ref().map_or_else(|| Ipv4Addr::from(first + d.id), |a| *a.get_ref()),
            name: d.name,
            role: d.role,
            vcpus: d.vcpus,
            memory: d.memory,
            disk: d.disk,
            arch: d.arch,
            image: d.image,
            image_url: d.image_url,
            image_sha256: d.image_sha256,
            user_data: d.user_data,
            network_config: d.network_config,
        };
        let group = d.group;
        let at = d.address.map_or_else(|| group.clone(), |a| a.span());
        let key = format!("VM {}", vm.name);
        if let Some(m) = usable_message(&network.subnet, vm.ip) {
            cx.at(at, &key, m);
        } else if let Some(prev) = taken.addrs.get(&vm.ip) {
            cx.at(at, &key, format!("{} of {} is already taken by {prev}", vm.ip, vm.name));
        }
        taken.addrs.insert(vm.ip, key);
        vms.push((vm, group));
    }
    vms
}

/// Names: VMs against each other, the host and the extra entries.
fn check_names(cx: &mut Ctx, vms: &[(Vm, Range<usize>)], taken: &Taken) {
    let mut vm_names: HashMap<&str, u32> = HashMap::new();
    for (vm, group) in vms {
        let key = format!("VM {}", vm.name);
        if let Some(prev) = vm_names.insert(&vm.name, vm.id) {
            cx.at(group.clone(), key, format!("the name `{}` is used by VM ids {prev} and {}", vm.name, vm.id));
        } else if let Some(prev) = taken.names.get(&vm.name) {
            cx.at(group.clone(), key, format!("the name `{}` is already used by {prev}", vm.name));
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_value_check_says_what_is_wrong() {
        let net: Ipv4Net = "192.168.1.0/24".parse().unwrap();
        assert!(check_ip_offset(10, &net).is_ok() && check_ip_offset(254, &net).is_ok());
        for bad in [0, 255, 300] {
            let e = check_ip_offset(bad, &net).unwrap_err();
            assert!(e.contains("so use 1 to 254"), "{bad}: {e}");
        }
        assert_eq!(check_mac_prefix("52:52:52"), Ok([0x52, 0x52, 0x52]));
        assert!(check_mac_prefix("53:00:00").unwrap_err().contains("multicast"));
        assert!(check_mac_prefix("52:52").is_err());
        assert_eq!(check_bridge("kubenet0").as_deref(), Ok("kubenet0"));
        for bad in ["", "a-name-of-16-chr", "br/0", "br 0", "br:0"] {
            assert!(check_bridge(bad).unwrap_err().contains("not a valid interface name"), "{bad}");
        }
        assert_eq!(parse_allow("10.1.2.3/8"), Ok("10.0.0.0/8".parse().unwrap()));
        assert_eq!(parse_allow("::1"), Ok("::1/128".parse().unwrap()));
        assert!(parse_allow("lab").is_err());
        assert_eq!(check_user("kube").as_deref(), Ok("kube"));
        for bad in ["", "Kube", "1kube", "ku be", "a-very-long-user-name-of-33-chars"] {
            assert!(check_user(bad).unwrap_err().contains("not a valid user name"), "{bad}");
        }
        assert!(check_memory(Bytes(2 * Bytes::GIB)).is_ok());
        assert!(check_memory(Bytes(Bytes::MIB)).unwrap_err().contains("at least 64M"));
        assert!(check_memory(Bytes(5 << 40)).unwrap_err().contains("at most"));
        assert_eq!(check_sha256(&"AB".repeat(32)), Ok("ab".repeat(32)));
        assert!(check_sha256("abc").unwrap_err().contains("64 hex digits"));
    }

    /// A lab resolved from `text`, or its problems as "line:key: message".
    fn resolved(text: &str) -> Result<Lab, Vec<String>> {
        let raw: RawLab = toml::from_str(text).unwrap();
        resolve(raw, text, "test".into(), Path::new("/lab"))
            .map_err(|ps| ps.iter().map(|p| format!("{}:{}: {}", p.line, p.key, p.message)).collect())
    }

    #[test]
    fn addresses_macs_and_names_come_from_ids_unless_the_file_gives_an_address() {
        let lab = resolved(
            "[[group]]\nname = \"gw\"\n[[group]]\nprefix = \"w\"\ncount = 2\naddresses = { w1 = \"192.168.1.99\" }\n",
        )
        .unwrap();
        let vms: Vec<(String, String, Ipv4Addr, String)> =
            lab.vms.iter().map(|v| (v.name.clone(), v.mac.to_string(), v.ip, v.fqdn.clone())).collect();
        assert_eq!(
            vms,
            [
                ("gw".into(), "52:52:52:00:00:00".into(), Ipv4Addr::new(192, 168, 1, 10), "gw.kubevms".into()),
                ("w0".into(), "52:52:52:00:00:01".into(), Ipv4Addr::new(192, 168, 1, 11), "w0.kubevms".into()),
                ("w1".into(), "52:52:52:00:00:02".into(), Ipv4Addr::new(192, 168, 1, 99), "w1.kubevms".into()),
            ]
        );
    }

    #[test]
    fn rules_across_vms_point_at_the_later_group_or_the_override() {
        let problems = resolved(
            "[network]\nhosts = { nas = \"192.168.1.11\" }\n[[group]]\nname = \"a\"\n[[group]]\nname = \"b\"\n[[group]]\nname = \"a\"\naddress = \"192.168.1.10\"\n",
        )
        .unwrap_err();
        assert_eq!(
            problems,
            [
                "5:VM b: 192.168.1.11 of b is already taken by network.hosts.nas",
                "7:VM a: the name `a` is used by VM ids 0 and 2",
                "9:VM a: 192.168.1.10 of a is already taken by VM a",
            ]
        );
    }
}
