//! The cloud-init NoCloud seed of a VM: `meta-data`, `user-data`, `network-config` and an ISO 9660
//! image with
//! volume id `cidata` that carries them (Rock Ridge and Joliet, as `genisoimage -J -r` made it
//! in the tutorial). The documents are built as YAML values and serialized, never templated as
//! text, so a name or key with odd characters cannot break them. [`documents`] and [`iso`] are
//! pure; [`write`] puts the image on disk.

use std::path::Path;
use std::sync::Arc;

use kubenet_cluster::{Lab, Vm};
use russh::keys::PrivateKey;
use russh::keys::ssh_key::LineEnding;
use serde_yaml_ng::Value;

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("user_data of {vm}: not a YAML mapping of cloud-config keys: {message}")]
    UserData { vm: String, message: String },
    #[error("network_config of {vm}: not a cloud-init network-config mapping: {message}")]
    NetworkConfig { vm: String, message: String },
    #[error("{0}")]
    Encode(String),
    #[error("{path}: {source}")]
    Io { path: std::path::PathBuf, source: std::io::Error },
}

/// The seed's files.
#[derive(Clone, Debug, PartialEq)]
pub struct Seed {
    pub meta_data: String,
    pub user_data: String,
    /// Written only when the group sets `network_config`.
    pub network_config: Option<String>,
}

fn map(pairs: impl IntoIterator<Item = (&'static str, Value)>) -> Value {
    Value::Mapping(pairs.into_iter().map(|(k, v)| (Value::from(k), v)).collect())
}

fn list(items: impl IntoIterator<Item = Value>) -> Value {
    Value::Sequence(items.into_iter().collect())
}

/// Merges `extra` into `base`: mappings key by key, lists appended (runcmd, packages,
/// write_files add to what kubenet set), anything else replaced by `extra`.
pub fn merge(base: &mut Value, extra: Value) {
    match (base, extra) {
        (Value::Mapping(b), Value::Mapping(e)) => {
            for (k, v) in e {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (Value::Sequence(b), Value::Sequence(e)) => b.extend(e),
        (slot, e) => *slot = e,
    }
}

/// meta-data and user-data for `vm`: its hostname and FQDN, the login user with
/// `login_public_key` and passwordless sudo, the optional console password (never expiring),
/// the pre-generated host key (cloud-init generates none when `ssh_keys` is given, and
/// `ssh_deletekeys` removes the image's), then the group's extra user-data
/// merged in.
pub fn documents(lab: &Lab, vm: &Vm, login_public_key: &str, host_key: &PrivateKey) -> Result<Seed, SeedError> {
    let meta = map([
        ("instance-id", Value::from(format!("kubenet-{}", vm.name))),
        ("local-hostname", vm.name.as_str().into()),
    ]);

    let login = &lab.login;
    let mut user = map([
        ("name", login.user.as_str().into()),
        ("sudo", "ALL=(ALL) NOPASSWD:ALL".into()),
        ("shell", "/bin/bash".into()),
        ("lock_passwd", login.password.is_none().into()),
        ("ssh_authorized_keys", list([login_public_key.into()])),
    ]);
    if let Value::Mapping(u) = &mut user {
        u.insert("groups".into(), "sudo".into());
    }
    let private = host_key.to_openssh(LineEnding::LF).map_err(|e| SeedError::Encode(e.to_string()))?;
    let mut public = host_key.public_key().clone();
    public.set_comment("");
    let public = public.to_openssh().map_err(|e| SeedError::Encode(e.to_string()))?;
    let mut doc = map([
        ("hostname", vm.name.as_str().into()),
        ("fqdn", vm.fqdn.as_str().into()),
        ("prefer_fqdn_over_hostname", false.into()),
        ("manage_etc_hosts", true.into()),
        ("users", list([user])),
        ("ssh_pwauth", false.into()),
        ("ssh_deletekeys", true.into()),
        ("ssh_keys", map([("ed25519_private", private.as_str().into()), ("ed25519_public", public.into())])),
        // The lab's domain as the search domain, so `ssh worker0` works from VM to VM. DHCP
        // hands it out (option 15), but systemd-networkd, which Ubuntu's and Debian's cloud
        // images use, ignores it unless told (`UseDomains=no`), and cloud-init's networkd
        // renderer cannot say so without renaming the NIC. LLMNR off: otherwise resolved also
        // asks the link for single-label names and a VM answers with its IPv6 link-local
        // address, ahead of the lab's DNS. Guests without systemd-resolved (dhclient, udhcpc)
        // take the domain from DHCP and never read this file.
        (
            "write_files",
            list([map([
                ("path", "/etc/systemd/resolved.conf.d/kubenet.conf".into()),
                ("content", format!("[Resolve]\nDomains={}\nLLMNR=no\n", lab.network.domain).into()),
            ])]),
        ),
        ("runcmd", list([list(["systemctl".into(), "try-restart".into(), "systemd-resolved".into()])])),
    ]);
    if let (Some(pw), Value::Mapping(d)) = (&login.password, &mut doc) {
        d.insert(
            "chpasswd".into(),
            map([
                ("expire", false.into()),
                (
                    "users",
                    list([map([
                        ("name", login.user.as_str().into()),
                        ("password", pw.as_str().into()),
                        ("type", "text".into()),
                    ])]),
                ),
            ]),
        );
    }
    if let Some(extra) = &vm.user_data {
        let err = |message: String| SeedError::UserData { vm: vm.name.clone(), message };
        let extra: Value = serde_yaml_ng::from_str(extra).map_err(|e| err(e.to_string()))?;
        match extra {
            Value::Mapping(_) => merge(&mut doc, extra),
            Value::Null => {}
            other => return Err(err(format!("found {}", kind(&other)))),
        }
    }
    let yaml = |v: &Value| serde_yaml_ng::to_string(v).map_err(|e| SeedError::Encode(e.to_string()));
    Ok(Seed {
        meta_data: yaml(&meta)?,
        user_data: format!("#cloud-config\n{}", yaml(&doc)?),
        network_config: network_config(vm)?,
    })
}

/// The group's network-config, checked to be a YAML mapping so a typo fails at `setup`, not
/// silently in the guest (cloud-init ignores a network-config it cannot parse).
fn network_config(vm: &Vm) -> Result<Option<String>, SeedError> {
    let Some(text) = &vm.network_config else { return Ok(None) };
    let err = |message: String| SeedError::NetworkConfig { vm: vm.name.clone(), message };
    match serde_yaml_ng::from_str::<Value>(text).map_err(|e| err(e.to_string()))? {
        Value::Mapping(m) if m.contains_key("version") => Ok(Some(text.clone())),
        Value::Mapping(_) => Err(err("no `version` key (1 or 2)".into())),
        other => Err(err(format!("found {}", kind(&other)))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Sequence(_) => "a list",
        Value::String(_) => "a string",
        Value::Number(_) => "a number",
        Value::Bool(_) => "a boolean",
        _ => "something else",
    }
}

/// The seed as an ISO 9660 image, volume id `cidata`, with Rock Ridge and Joliet names.
pub fn iso(seed: &Seed) -> Result<Vec<u8>, SeedError> {
    use hadris_iso::read::PathSeparator;
    use hadris_iso::write::options::{CreationFeatures, FormatOptions};
    use hadris_iso::write::{File, InputFiles, IsoImageWriter};

    let file =
        |name: &str, text: &str| File::File { name: Arc::new(name.to_owned()), contents: text.as_bytes().to_vec() };
    let files = InputFiles {
        path_separator: PathSeparator::ForwardSlash,
        files: [("meta-data", Some(&seed.meta_data)), ("user-data", Some(&seed.user_data))]
            .into_iter()
            .chain([("network-config", seed.network_config.as_ref())])
            .filter_map(|(name, text)| Some(file(name, text?)))
            .collect(),
    };
    let options = FormatOptions {
        volume_name: "cidata".to_owned(),
        system_id: None,
        volume_set_id: None,
        publisher_id: None,
        preparer_id: None,
        application_id: Some("kubenet".to_owned()),
        sector_size: 2048,
        features: CreationFeatures::with_extensions(),
        path_separator: PathSeparator::ForwardSlash,
        strict_charset: false,
    };
    let size = hadris_iso::write::estimator::estimate(&files, &options).minimum_bytes() as usize;
    let mut out = std::io::Cursor::new(vec![0u8; size.max(64 * 2048) * 2]);
    IsoImageWriter::format_new(&mut out, files, options).map_err(|e| SeedError::Encode(format!("{e:?}")))?;
    let mut bytes = out.into_inner();
    zero_joliet_escape_padding(&mut bytes);
    Ok(bytes)
}

/// ECMA-119 8.5.6 leaves the unused bytes of a supplementary volume descriptor's escape
/// sequences field zero, as mkisofs writes them; hadris-iso 1.2 pads the Joliet "%/E" with
/// spaces, which `isoinfo` warns about. Descriptors start at sector 16 and end with type 255.
fn zero_joliet_escape_padding(image: &mut [u8]) {
    for sector in image[16 * 2048..].chunks_exact_mut(2048) {
        match sector[0] {
            255 => break,
            2 if sector[88..90] == *b"%/" => sector[91..120].iter_mut().filter(|b| **b == b' ').for_each(|b| *b = 0),
            _ => {}
        }
    }
}

/// Writes the seed image to `path` atomically, readable by its owner only: it carries the VM's
/// private host key.
pub fn write(path: &Path, seed: &Seed) -> Result<(), SeedError> {
    let bytes = iso(seed)?;
    kubenet_cluster::state::write_atomic(path, &bytes, 0o600)
        .map_err(|source| SeedError::Io { path: path.to_path_buf(), source })
}

#[cfg(test)]
#[path = "seed_tests.rs"]
mod tests;
