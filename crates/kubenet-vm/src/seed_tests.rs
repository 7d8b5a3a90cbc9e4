use std::path::Path;

use super::*;

fn lab() -> Lab {
    kubenet_cluster::parse(kubenet_cluster::REFERENCE_CONFIG, kubenet_cluster::Source::Embedded, Path::new("/lab"))
        .unwrap()
}

fn parse(doc: &str) -> Value {
    serde_yaml_ng::from_str(doc).unwrap()
}

#[test]
fn documents_parse_back_to_what_the_vm_needs() {
    let lab = lab();
    let vm = lab.vm_by_name("worker0").unwrap();
    let key = crate::keys::generate("worker0").unwrap();
    let seed = documents(&lab, vm, "ssh-ed25519 AAAAlogin me@host", &key).unwrap();

    assert_eq!(parse(&seed.meta_data), parse("instance-id: kubenet-worker0\nlocal-hostname: worker0\n"));
    assert!(seed.user_data.starts_with("#cloud-config\n"), "cloud-init reads only documents with this header");
    let u = parse(&seed.user_data);
    assert_eq!(u["hostname"], Value::from("worker0"));
    assert_eq!(u["fqdn"], Value::from("worker0.kubevms"));
    let user = &u["users"][0];
    assert_eq!(user["name"], Value::from("kube"));
    assert_eq!(user["ssh_authorized_keys"][0], Value::from("ssh-ed25519 AAAAlogin me@host"));
    assert_eq!(user["sudo"], Value::from("ALL=(ALL) NOPASSWD:ALL"));
    assert_eq!(user["lock_passwd"], Value::from(true), "no password configured");
    assert!(u.get("chpasswd").is_none());
    // The host key round-trips; the image's own keys are deleted.
    let private = u["ssh_keys"]["ed25519_private"].as_str().unwrap();
    assert_eq!(PrivateKey::from_openssh(private).unwrap().public_key().key_data(), key.public_key().key_data());
    assert!(u["ssh_keys"]["ed25519_public"].as_str().unwrap().starts_with("ssh-ed25519 "));
    assert_eq!(u["ssh_deletekeys"], Value::from(true));
    // The search domain for systemd-resolved guests.
    assert_eq!(u["write_files"][0]["path"], Value::from("/etc/systemd/resolved.conf.d/kubenet.conf"));
    assert_eq!(u["write_files"][0]["content"], Value::from("[Resolve]\nDomains=kubevms\nLLMNR=no\n"));
    assert_eq!(seed.network_config, None, "no network-config unless the group gives one");
}

#[test]
fn a_network_config_is_checked_and_passed_through() {
    let mut lab = lab();
    let key = crate::keys::generate("g").unwrap();
    let text = "version: 2\nethernets:\n  eth0:\n    dhcp4: true\n";
    lab.vms[0].network_config = Some(text.into());
    assert_eq!(documents(&lab, &lab.vms[0], "k", &key).unwrap().network_config.as_deref(), Some(text));
    for (bad, why) in [("ethernets: {}\n", "no `version` key"), ("- 2\n", "a list"), ("a: [x\n", "")] {
        lab.vms[0].network_config = Some(bad.into());
        let err = documents(&lab, &lab.vms[0], "k", &key).unwrap_err().to_string();
        assert!(err.contains("network_config of gateway") && err.contains(why), "{err}");
    }
}

#[test]
fn a_password_never_expires() {
    let mut lab = lab();
    lab.login.password = Some("kube".into());
    let key = crate::keys::generate("g").unwrap();
    let u = parse(&documents(&lab, &lab.vms[0], "ssh-ed25519 AAAA", &key).unwrap().user_data);
    assert_eq!(u["users"][0]["lock_passwd"], Value::from(false));
    assert_eq!(u["chpasswd"], parse("expire: false\nusers:\n- name: kube\n  password: kube\n  type: text\n"));
}

#[test]
fn extra_user_data_is_merged() {
    let mut lab = lab();
    lab.vms[0].user_data =
        Some("packages: [curl]\nruncmd:\n  - [touch, /x]\nssh_pwauth: true\nusers:\n  - name: extra\n".into());
    let key = crate::keys::generate("g").unwrap();
    let u = parse(&documents(&lab, &lab.vms[0], "ssh-ed25519 AAAA", &key).unwrap().user_data);
    assert_eq!(u["packages"], parse("[curl]"));
    assert_eq!(u["runcmd"], parse("[[systemctl, try-restart, systemd-resolved], [touch, /x]]"), "lists append");
    assert_eq!(u["ssh_pwauth"], Value::from(true), "the group's value wins for a scalar");
    let users: Vec<&str> = u["users"].as_sequence().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(users, ["kube", "extra"], "lists are appended");
    assert_eq!(u["hostname"], Value::from("gateway"), "kubenet's keys stay");

    lab.vms[0].user_data = Some("- not\n- a mapping\n".into());
    let err = documents(&lab, &lab.vms[0], "k", &key).unwrap_err().to_string();
    assert!(err.contains("user_data of gateway") && err.contains("a list"), "{err}");
    lab.vms[0].user_data = Some("a: [unclosed\n".into());
    assert!(documents(&lab, &lab.vms[0], "k", &key).unwrap_err().to_string().contains("user_data of gateway"));
}

#[test]
fn the_iso_has_the_cidata_volume_id_and_both_files() {
    let seed = Seed {
        meta_data: "instance-id: x\n".into(),
        user_data: "#cloud-config\nhostname: x\n".into(),
        network_config: Some("version: 2\n".into()),
    };
    let bytes = iso(&seed).unwrap();
    // The primary volume descriptor sits at sector 16: type 1, "CD001", volume id at offset 40.
    let pvd = &bytes[16 * 2048..17 * 2048];
    assert_eq!(&pvd[..6], b"\x01CD001");
    assert_eq!(std::str::from_utf8(&pvd[40..72]).unwrap().trim_end(), "cidata");
    let find = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    assert!(find(b"#cloud-config\nhostname: x\n") && find(b"instance-id: x\n") && find(b"version: 2\n"));
}
