//! The lab definition as users write it: the reference lab, scaling, and errors located by key
//! and line.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::Path;

use kubenet_cluster::{Arch, Bytes, Choice, LeaseTime, REFERENCE_CONFIG, Source, parse};

fn lab(text: &str) -> kubenet_cluster::Lab {
    parse(text, Source::File("t.toml".into()), Path::new("/lab")).unwrap_or_else(|e| panic!("{e}"))
}

fn problems(text: &str) -> Vec<kubenet_cluster::Problem> {
    match parse(text, Source::File("t.toml".into()), Path::new("/lab")) {
        Ok(_) => panic!("config was accepted:\n{text}"),
        Err(e) => e.problems().to_vec(),
    }
}

#[test]
#[allow(clippy::type_complexity)]
fn reference_lab_matches_the_tutorial() {
    let lab = parse(REFERENCE_CONFIG, Source::Embedded, Path::new("/cwd")).unwrap();
    let n = &lab.network;
    assert_eq!(n.subnet.to_string(), "192.168.1.0/24");
    assert_eq!(n.host_name, "vmhost");
    assert_eq!(n.host_address, Ipv4Addr::new(192, 168, 1, 1));
    assert_eq!((n.dhcp_range.start, n.dhcp_range.end), (Ipv4Addr::new(192, 168, 1, 2), Ipv4Addr::new(192, 168, 1, 20)));
    assert_eq!(n.lease_time, LeaseTime::Finite(std::time::Duration::from_secs(12 * 3600)));
    assert_eq!(n.domain, "kubevms");
    assert!(n.dhcp_relays.is_empty(), "no relay is trusted unless listed");
    assert_eq!(lab.state_dir, Path::new("/cwd"));

    let rows: Vec<(u32, &str, &str, String, String, u32, Bytes, Bytes)> = lab
        .vms
        .iter()
        .map(|v| {
            (v.id, v.name.as_str(), v.role.as_str(), v.mac.to_string(), v.ip.to_string(), v.vcpus, v.memory, v.disk)
        })
        .collect();
    let g2 = Bytes(2 << 30);
    let g8 = Bytes(8 << 30);
    let g20 = Bytes(20 << 30);
    let expected = vec![
        (0, "gateway", "gateway", "52:52:52:00:00:00".to_string(), "192.168.1.10".to_string(), 2, g2, g20),
        (1, "control0", "control", "52:52:52:00:00:01".into(), "192.168.1.11".into(), 2, g2, g20),
        (2, "control1", "control", "52:52:52:00:00:02".into(), "192.168.1.12".into(), 2, g2, g20),
        (3, "control2", "control", "52:52:52:00:00:03".into(), "192.168.1.13".into(), 2, g2, g20),
        (4, "worker0", "worker", "52:52:52:00:00:04".into(), "192.168.1.14".into(), 4, g8, g20),
        (5, "worker1", "worker", "52:52:52:00:00:05".into(), "192.168.1.15".into(), 4, g8, g20),
        (6, "worker2", "worker", "52:52:52:00:00:06".into(), "192.168.1.16".into(), 4, g8, g20),
    ];
    assert_eq!(rows, expected);
    assert_eq!(lab.vm_by_name("worker0").unwrap().fqdn, "worker0.kubevms");
}

#[test]
fn an_empty_file_is_the_reference_network_with_no_vms_refused() {
    let p = problems("");
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].key, "group");
    assert!(p[0].message.contains("no VMs"), "{}", p[0].message);
}

#[test]
fn forty_three_vms_get_unique_macs_and_addresses() {
    let lab = lab(r#"
[[group]]
prefix = "control"
count = 3
[[group]]
prefix = "worker"
count = 40
"#);
    assert_eq!(lab.vms.len(), 43);
    let macs: HashSet<_> = lab.vms.iter().map(|v| v.mac).collect();
    let ips: HashSet<_> = lab.vms.iter().map(|v| v.ip).collect();
    assert_eq!((macs.len(), ips.len()), (43, 43));
    let last = lab.vm_by_name("worker39").unwrap();
    assert_eq!((last.id, last.ip), (42, Ipv4Addr::new(192, 168, 1, 52)));
    assert_eq!(last.mac.to_string(), "52:52:52:00:00:2a");
}

#[test]
fn three_hundred_vms_in_a_larger_subnet_use_three_mac_bytes() {
    let lab = lab(r#"
[network]
subnet = "10.20.0.0/16"
host_address = "10.20.0.1"
dhcp_range = ["10.20.0.2", "10.20.0.9"]
[[group]]
prefix = "n"
count = 300
"#);
    let macs: HashSet<_> = lab.vms.iter().map(|v| v.mac).collect();
    assert_eq!(macs.len(), 300);
    assert_eq!(lab.vm_by_name("n299").unwrap().mac.to_string(), "52:52:52:00:01:2b");
    assert_eq!(lab.vm_by_name("n299").unwrap().ip, Ipv4Addr::new(10, 20, 1, 53));
}

#[test]
fn listed_dhcp_relays_are_kept_in_order() {
    let lab = lab("[network]\ndhcp_relays = [\"10.99.0.2\", \"172.16.5.1\"]\n[[group]]\nname = \"a\"\n");
    assert_eq!(lab.network.dhcp_relays, [Ipv4Addr::new(10, 99, 0, 2), Ipv4Addr::new(172, 16, 5, 1)]);
}

#[test]
fn three_hundred_vms_in_a_slash_24_say_how_many_addresses_are_free() {
    let p = problems("[[group]]\nprefix = \"worker\"\ncount = 300\n");
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].message.contains("300 VMs"), "{}", p[0].message);
    assert!(p[0].message.contains("only 245 free addresses from 192.168.1.10"), "{}", p[0].message);
}

#[test]
fn address_overrides_and_extra_hosts() {
    let lab = lab(r#"
[network.hosts]
registry = "192.168.1.5"
[[group]]
name = "gateway"
address = "192.168.1.100"
[[group]]
prefix = "worker"
count = 2
addresses = { worker1 = "192.168.1.101" }
"#);
    assert_eq!(lab.vm_by_name("gateway").unwrap().ip, Ipv4Addr::new(192, 168, 1, 100));
    assert_eq!(lab.vm_by_name("worker0").unwrap().ip, Ipv4Addr::new(192, 168, 1, 11));
    assert_eq!(lab.vm_by_name("worker1").unwrap().ip, Ipv4Addr::new(192, 168, 1, 101));
    let names: Vec<_> = lab.names().map(|(n, _)| n).collect();
    assert_eq!(names, ["vmhost", "gateway", "worker0", "worker1", "registry"]);
}

#[test]
fn lookup_order() {
    let flag = Path::new("/a.toml");
    let env = std::ffi::OsStr::new("/b.toml");
    assert_eq!(kubenet_cluster::choose(Some(flag), Some(env), true), Choice::File("/a.toml".into()));
    assert_eq!(kubenet_cluster::choose(None, Some(env), true), Choice::File("/b.toml".into()));
    assert_eq!(kubenet_cluster::choose(None, Some("".as_ref()), true), Choice::File("kubenet.toml".into()));
    assert_eq!(kubenet_cluster::choose(None, None, false), Choice::Embedded);
}

#[test]
fn load_takes_the_state_dir_from_the_file_location() {
    let dir = std::env::temp_dir().join(format!("kubenet-cluster-test-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("sub/lab.toml"), "state_dir = \"state\"\n[[group]]\nname = \"a\"\n").unwrap();
    let lab = kubenet_cluster::load(&Choice::File("sub/lab.toml".into()), &dir).unwrap();
    assert_eq!(lab.state_dir, dir.join("sub/state"));
    let missing = kubenet_cluster::load(&Choice::File("nope.toml".into()), &dir).unwrap_err();
    assert!(missing.to_string().contains("cannot read config nope.toml"), "{missing}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Each broken config, the key its first problem must name, the line it must point at, and a
/// phrase from the message.
const BROKEN: &[(&str, &str, usize, &str)] = &[
    ("[network]\nsubnet = \"192.168.1.0/33\"\n[[group]]\nname = \"a\"\n", "network.subnet", 2, "not an IPv4 network"),
    (
        "[network]\nsubnet = \"192.168.1.7/24\"\n[[group]]\nname = \"a\"\n",
        "network.subnet",
        2,
        "did you mean \"192.168.1.0/24\"",
    ),
    (
        "[network]\nhost_address = \"10.0.0.1\"\n[[group]]\nname = \"a\"\n",
        "network.host_address",
        2,
        "outside the subnet",
    ),
    ("[network]\nhost_address = \"192.168.1.300\"\n", "network.host_address", 2, "invalid IPv4 address"),
    (
        "[network]\ndhcp_range = [\"192.168.1.20\", \"192.168.1.2\"]\n[[group]]\nname = \"a\"\n",
        "network.dhcp_range",
        2,
        "reversed",
    ),
    (
        "[network]\ndhcp_range = [\"192.168.1.2\", \"192.168.2.20\"]\n[[group]]\nname = \"a\"\n",
        "network.dhcp_range",
        2,
        "outside the subnet",
    ),
    ("[network]\nlease_time = \"12 parsecs\"\n[[group]]\nname = \"a\"\n", "network.lease_time", 2, "not a duration"),
    ("[network]\ndomain = \"kube_vms\"\n[[group]]\nname = \"a\"\n", "network.domain", 2, "not a valid domain"),
    ("[network]\nmac_prefix = \"53:52:52\"\n[[group]]\nname = \"a\"\n", "network.mac_prefix", 2, "multicast"),
    ("[network]\nupstream = [\"dns.example\"]\n[[group]]\nname = \"a\"\n", "network.upstream[0]", 2, "not an address"),
    (
        "[network]\ndhcp_relays = [\"10.0.0.1\", \"10.0.0.300\"]\n[[group]]\nname = \"a\"\n",
        "network.dhcp_relays[1]",
        2,
        "`10.0.0.300` is not an IPv4 address",
    ),
    (
        "[network]\ndhcp_relays = [\"255.255.255.255\"]\n[[group]]\nname = \"a\"\n",
        "network.dhcp_relays[0]",
        2,
        "not one host's address",
    ),
    ("[network]\nsubnett = \"192.168.1.0/24\"\n", "network.subnett", 2, "unknown field"),
    ("colour = \"blue\"\n", "colour", 1, "unknown field"),
    ("[[group]]\nname = \"worker_0\"\n", "group[0].name", 2, "not a valid VM name"),
    (
        "[[group]]\nname = \"a\"\n\n[[group]]\nname = \"b\"\nmemory = \"2X\"\n",
        "group[1].memory",
        6,
        "unknown size unit",
    ),
    ("[[group]]\nname = \"a\"\ndisk = \"lots\"\n", "group[0].disk", 3, "not a size"),
    ("[[group]]\nname = \"a\"\ndisk = \"0\"\n", "group[0].disk", 3, "has no unit"),
    ("[[group]]\nname = \"a\"\ndisk = \"0G\"\n", "group[0].disk", 3, "a disk of 0 bytes holds nothing"),
    (
        "[[group]]\nname = \"a\"\nmemory = \"2048\"\n",
        "group[0].memory",
        3,
        "`2048` has no unit: write e.g. \"2048M\" or \"2048G\" (QEMU's -m 2048 would mean MiB",
    ),
    ("[[group]]\nname = \"a\"\nmemory = \"999999T\"\n", "group[0].memory", 3, "use at most 4TiB"),
    ("[[group]]\nname = \"a\"\nmemory = \"32M\"\n", "group[0].memory", 3, "use at least 64M"),
    ("[[group]]\nname = \"a\"\nvcpus = \"two\"\n", "group[0].vcpus", 3, "invalid type"),
    ("[[group]]\nname = \"a\"\nvcpus = 0\n", "group[0].vcpus", 3, "use 1 to 255"),
    ("[[group]]\nname = \"a\"\nimage_sha256 = \"abc\"\n", "group[0].image_sha256", 3, "not a SHA-256"),
    ("[[group]]\nprefix = \"w\"\n", "group[0].count", 2, "needs `count`"),
    ("[[group]]\nname = \"a\"\nprefix = \"w\"\ncount = 2\n", "group[0].name", 2, "not both"),
    ("[[group]]\nname = \"a\"\naddress = \"192.168.1.1\"\n", "VM a", 3, "already taken by network.host_address"),
    // Rules across VMs point at the group that made the later VM.
    (
        "[[group]]\nname = \"a\"\naddress = \"192.168.1.11\"\n[[group]]\nname = \"b\"\n",
        "VM b",
        4,
        "already taken by VM a",
    ),
    ("[[group]]\nname = \"vmhost\"\n", "VM vmhost", 1, "already used by network.host_name"),
    ("[[group]]\nprefix = \"w\"\ncount = 2\n[[group]]\nname = \"w1\"\n", "VM w1", 4, "used by VM ids 1 and 2"),
    ("# nothing\n", "group", 1, "the lab has no VMs"),
    // What `setup` would refuse later, refused here.
    (
        "[[group]]\nname = \"a\"\nimage_url = \"ftp://mirror/x.img\"\n",
        "group[0].image_url",
        3,
        "not an http:// or https:// address",
    ),
    (
        "[[group]]\nname = \"a\"\nuser_data = \"[1, 2]\"\n",
        "group[0].user_data",
        3,
        "must be a YAML mapping (`key: value` lines), but this is a list",
    ),
    (
        "[[group]]\nname = \"a\"\nnetwork_config = \"dhcp please\"\n",
        "group[0].network_config",
        3,
        "but this is a string",
    ),
    ("[[group]]\nname = \"a\"\nuser_data = \"a: [\"\n", "group[0].user_data", 3, "user_data is not YAML"),
    (
        "[login]\nssh_public_key = \"/nonexistent/key.pub\"\n[[group]]\nname = \"a\"\n",
        "login.ssh_public_key",
        2,
        "cannot read /nonexistent/key.pub",
    ),
    // A device, not a key file: refused at once, never read to its end.
    (
        "[login]\nssh_public_key = \"/dev/zero\"\n[[group]]\nname = \"a\"\n",
        "login.ssh_public_key",
        2,
        "cannot read /dev/zero: not a regular file",
    ),
    (
        "[network]\nip_offset = 0\n[[group]]\nname = \"a\"\n",
        "network.ip_offset",
        2,
        "0 puts the VMs outside 192.168.1.0/24",
    ),
    ("[network]\nip_offset = 255\n[[group]]\nname = \"a\"\n", "network.ip_offset", 2, "use 1 to 254"),
    (
        "[network.hosts]\nregistry = \"192.168.9.5\"\n[[group]]\nname = \"a\"\n",
        "network.hosts.registry",
        2,
        "outside the subnet",
    ),
    (
        "[[group]]\nprefix = \"w\"\ncount = 2\naddresses = { w7 = \"192.168.1.50\" }\n",
        "group[0].addresses.w7",
        4,
        "not a VM of this group",
    ),
    ("[[group]]\nname = \"a\"\nmemory = \"2G\"\nmemory = \"4G\"\n", "memory", 4, "duplicate key"),
    ("accelerator = \"xen\"\n", "accelerator", 1, "unknown variant"),
    (
        "[[group]]\nprefix = \"w\"\ncount = 3\narch = \"riscv64\"\n",
        "group[0].arch",
        4,
        "`riscv64` is not a supported architecture: use \"auto\" (the host's), \"x86_64\" or \"aarch64\"",
    ),
    ("[[group]]\nname = \"a\"\narch = \"aarch46\"\n", "group[0].arch", 3, "not a supported architecture"),
    ("[[group]]\nname = \"a\"\narch = 64\n", "group[0].arch", 3, "invalid type"),
    ("accelerator = \"tcg\"\nfirmware = \"efi\"\n", "firmware", 2, "unknown variant"),
    (
        "[dns]\nallow = [\"127.0.0.0/8\", \"the lab\"]\n[[group]]\nname = \"a\"\n",
        "dns.allow[1]",
        2,
        "not an address or a network",
    ),
    (
        "[dns]\nlocal_ttl = -1\n",
        "dns.local_ttl",
        2,
        "invalid value: integer `-1`, expected a whole number from 0 to 4294967295",
    ),
    (
        "[[group]]\nname = \"a\"\nvcpus = \"two\"\n",
        "group[0].vcpus",
        3,
        "invalid type: string \"two\", expected a whole number from 0",
    ),
    (
        "[network]\nip_offset = 250\n[[group]]\nprefix = \"w\"\ncount = 6\n",
        "network.ip_offset",
        2,
        "6 VMs without an address override but 192.168.1.0/24 has only 5 free addresses",
    ),
];

#[test]
fn broken_configs_name_the_key_and_the_line() {
    assert!(BROKEN.len() >= 15);
    for (text, key, line, phrase) in BROKEN {
        let p = problems(text);
        let first = &p[0];
        assert_eq!((first.key.as_str(), first.line), (*key, *line), "for config:\n{text}\ngot {p:?}");
        assert!(first.message.contains(phrase), "for config:\n{text}\nmessage {:?} lacks {phrase:?}", first.message);
        if first.line > 0 {
            assert!(first.column > 0);
        }
    }
}

#[test]
fn every_problem_is_reported_in_one_pass() {
    let p = problems("[network]\ndomain = \"a_b\"\nlease_time = \"x\"\n[[group]]\nname = \"a\"\nmemory = \"1Q\"\n");
    let keys: Vec<_> = p.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, ["network.domain", "network.lease_time", "group[0].memory"]);
}

#[test]
fn the_error_text_has_the_file_line_column_form() {
    let e = parse("[network]\nsubnet = \"x\"\n", Source::File("lab.toml".into()), Path::new("/")).unwrap_err();
    assert_eq!(
        e.to_string().lines().next().unwrap(),
        "lab.toml:2:10: network.subnet: `x` is not an IPv4 network in CIDR form, e.g. \"192.168.1.0/24\""
    );
}

#[test]
fn guest_architecture_per_group() {
    let lab = lab("[[group]]\nname = \"gw\"\n[[group]]\nprefix = \"arm\"\ncount = 2\narch = \"arm64\"\n\
         [[group]]\nname = \"x\"\narch = \"x86_64\"\n[[group]]\nname = \"a\"\narch = \"AUTO\"\n");
    let arch = |n: &str| lab.vm_by_name(n).unwrap().arch;
    assert_eq!(
        [arch("gw"), arch("arm0"), arch("arm1"), arch("x"), arch("a")],
        [None, Some(Arch::Aarch64), Some(Arch::Aarch64), Some(Arch::X86_64), None]
    );
    // The default image names the guest's architecture, as Ubuntu's file names do.
    let arm0 = lab.vm_by_name("arm0").unwrap();
    assert_eq!(arm0.image_for(Arch::X86_64), Path::new("images/ubuntu-24.04-server-cloudimg-arm64.img"));
    assert!(arm0.image_url_for(Arch::X86_64).unwrap().ends_with("/noble-server-cloudimg-arm64.img"));
    let gw = lab.vm_by_name("gw").unwrap();
    assert_eq!(gw.image_for(Arch::X86_64), Path::new("images/ubuntu-24.04-server-cloudimg-amd64.img"));
    assert_eq!(gw.image_for(Arch::Aarch64), Path::new("images/ubuntu-24.04-server-cloudimg-arm64.img"));
    // A group's wrong arch is reported once, not once per VM.
    let p = problems("[[group]]\nprefix = \"w\"\ncount = 3\narch = \"sparc\"\n");
    assert_eq!(p.len(), 1, "{p:?}");
    // `kubenet config --json` shows it, "auto" included.
    let json = serde_json::to_value(&lab).unwrap();
    assert_eq!(json["vms"][0]["arch"], "auto");
    assert_eq!(json["vms"][1]["arch"], "aarch64");
}

#[test]
fn dns_access_list_and_ttl() {
    let default = parse(REFERENCE_CONFIG, Source::Embedded, Path::new("/")).unwrap();
    let allow: Vec<String> = default.dns.allow.iter().map(ToString::to_string).collect();
    assert_eq!(allow, ["192.168.1.0/24", "127.0.0.0/8", "::1/128"]);
    assert_eq!(default.dns.local_ttl, 0);
    let custom = lab("[dns]\nlocal_ttl = 30\nallow = [\"10.1.2.3\", \"172.16.5.0/24\"]\n[[group]]\nname = \"a\"\n");
    let allow: Vec<String> = custom.dns.allow.iter().map(ToString::to_string).collect();
    assert_eq!(allow, ["10.1.2.3/32", "172.16.5.0/24"]);
    assert_eq!(custom.dns.local_ttl, 30);
}

/// `login.ssh_public_key` is read at `config check`, as `setup` reads it: a relative path is the
/// config folder's, a private key is named as such.
#[test]
fn the_login_key_is_checked_where_the_config_lives() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let text = "[login]\nssh_public_key = \"keys/me.pub\"\n[[group]]\nname = \"a\"\n";
    std::fs::create_dir(d.join("keys")).unwrap();
    std::fs::write(
        d.join("keys/me.pub"),
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl me@laptop\n",
    )
    .unwrap();
    let lab = kubenet_cluster::parse(text, Source::Embedded, d).unwrap();
    assert_eq!(lab.login.ssh_public_key, Some(d.join("keys/me.pub")));
    std::fs::write(
        d.join("keys/me.pub"),
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n",
    )
    .unwrap();
    let err = kubenet_cluster::parse(text, Source::Embedded, d).unwrap_err();
    let p = &err.problems()[0];
    assert_eq!((p.key.as_str(), p.line), ("login.ssh_public_key", 2));
    assert!(p.message.ends_with("is a private key: name the public one (usually the same path with .pub)"), "{p:?}");
}

/// Every value of the wrong type in one pass, in file order, in words a TOML writer knows.
#[test]
fn every_type_error_comes_at_once() {
    let text = "[network]\nnat = \"yes\"\nip_offset = -3\n[[group]]\nname = \"a\"\nvcpus = \"two\"\n[[group]]\nprefix = \"w\"\ncount = \"x\"\nmemory = 4\ncolour = \"red\"\n";
    let p = problems(text);
    let got: Vec<(&str, usize)> = p.iter().map(|p| (p.key.as_str(), p.line)).collect();
    assert_eq!(
        got,
        [
            ("network.nat", 2),
            ("network.ip_offset", 3),
            ("group[0].vcpus", 6),
            ("group[1].count", 9),
            ("group[1].memory", 10),
            ("group[1].colour", 11),
        ],
        "{p:?}"
    );
    assert!(p.iter().all(|p| !p.message.contains("u32")), "{p:?}");
    assert!(p[5].message.starts_with("unknown field `colour`"), "{p:?}");
}
