//! SSH trust without trust-on-first-use. kubenet generates each VM's ed25519 host key before the
//! VM first boots and gives it to cloud-init, so the lab's `known_hosts` is right from the start;
//! after boot the live key is fetched over SSH (the tutorial's ssh-keyscan step) and compared.
//! Also: the login key put into the VM, the lab's `ssh_config`, and the user's own
//! `~/.ssh/known_hosts` rewritten under a lock. Key formats come from ssh-key (the copy russh
//! re-exports); rendering is pure, the file helpers do I/O.

use std::io::{self, Read};

use kubenet_cluster::state::write_atomic;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kubenet_cluster::{Lab, Vm};
use russh::keys::ssh_key::{LineEnding, private::Ed25519Keypair};
use russh::keys::{PrivateKey, PublicKey};

use crate::files::{LabFiles, VmFiles};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: not an OpenSSH key: {message}")]
    Format { path: PathBuf, message: String },
    #[error("{0}")]
    Encode(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> KeyError + '_ {
    move |source| KeyError::Io { path: path.to_path_buf(), source }
}

/// A new ed25519 key with `comment`.
pub fn generate(comment: &str) -> Result<PrivateKey, KeyError> {
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .map_err(io_err(Path::new("/dev/urandom")))?;
    let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    key.set_comment(comment);
    Ok(key)
}

/// The key at `path` (OpenSSH private key), made (with `path.pub`) if there is none. Either
/// way the private file is left readable by its owner only, as ssh insists.
pub fn load_or_create(path: &Path, comment: &str) -> Result<PrivateKey, KeyError> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let key = PrivateKey::from_openssh(text)
                .map_err(|e| KeyError::Format { path: path.to_path_buf(), message: e.to_string() })?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io_err(path))?;
            Ok(key)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let key = generate(comment)?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(io_err(dir))?;
            }
            let private = key.to_openssh(LineEnding::LF).map_err(|e| KeyError::Encode(e.to_string()))?;
            let public = public_line(key.public_key())?;
            let pub_path = path.with_extension("pub");
            write_atomic(&pub_path, format!("{public}\n").as_bytes(), 0o644).map_err(io_err(&pub_path))?;
            write_atomic(path, private.as_bytes(), 0o600).map_err(io_err(path))?;
            Ok(key)
        }
        Err(e) => Err(io_err(path)(e)),
    }
}

/// "ssh-ed25519 AAAA... comment".
pub fn public_line(key: &PublicKey) -> Result<String, KeyError> {
    key.to_openssh().map_err(|e| KeyError::Encode(e.to_string()))
}

/// The names a VM is reached by: name, FQDN, address.
pub fn host_names(vm: &Vm) -> [String; 3] {
    [vm.name.clone(), vm.fqdn.clone(), vm.ip.to_string()]
}

/// The lab's known_hosts: one line per VM, "name,fqdn,ip ssh-ed25519 AAAA...".
pub fn known_hosts(entries: &[(&Vm, PublicKey)]) -> Result<String, KeyError> {
    let mut out = String::from("# Written by kubenet: the host keys it generated for the lab's VMs.\n");
    for (vm, key) in entries {
        let mut key = key.clone();
        key.set_comment("");
        out.push_str(&format!("{} {}\n", host_names(vm).join(","), public_line(&key)?.trim_end()));
    }
    Ok(out)
}

/// The login key put into every VM: its public line, and the private key file `ssh` must use
/// when it is not one ssh finds by itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginKey {
    pub public: String,
    pub identity: Option<PathBuf>,
}

/// Where the login key comes from, in order: the config's `login.ssh_public_key`, then
/// ~/.ssh/id_ed25519.pub, ~/.ssh/id_rsa.pub; None: kubenet makes a lab key.
pub fn login_key_candidates(lab: &Lab, home: &Path) -> Vec<PathBuf> {
    let expand = |p: &Path| match p.strip_prefix("~") {
        Ok(rest) => home.join(rest),
        Err(_) => p.to_path_buf(),
    };
    match &lab.login.ssh_public_key {
        Some(p) => vec![expand(p)],
        None => vec![home.join(".ssh/id_ed25519.pub"), home.join(".ssh/id_rsa.pub")],
    }
}

/// Finds (or, with none configured or found, makes) the login key.
pub fn login_key(lab: &Lab, home: &Path) -> Result<LoginKey, KeyError> {
    let candidates = login_key_candidates(lab, home);
    for c in &candidates {
        match std::fs::read_to_string(c) {
            Ok(text) => {
                let public = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_owned();
                PublicKey::from_openssh(&public)
                    .map_err(|e| KeyError::Format { path: c.clone(), message: e.to_string() })?;
                return Ok(LoginKey { public, identity: None });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && lab.login.ssh_public_key.is_none() => continue,
            Err(e) => return Err(io_err(c)(e)),
        }
    }
    let path = LabFiles::new(lab).lab_key();
    let key = load_or_create(&path, &format!("kubenet lab key {}", lab.network.domain))?;
    Ok(LoginKey { public: public_line(key.public_key())?, identity: Some(path) })
}

fn quote(p: &Path) -> String {
    format!("\"{}\"", p.display())
}

/// The lab's ssh_config: one Host block per VM (name, FQDN and address), strict host-key
/// checking against the lab's known_hosts only.
pub fn ssh_config(lab: &Lab, identity: Option<&Path>) -> String {
    let files = LabFiles::new(lab);
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut out = format!(
        "# Written by kubenet for the lab in {}: `ssh -F {} NAME`.\n# Rewritten by `kubenet setup`; edits are lost.\n",
        lab.source,
        abs(&files.ssh_config()).display()
    );
    for vm in &lab.vms {
        let [name, fqdn, ip] = host_names(vm);
        out.push_str(&format!("\nHost {name} {fqdn} {ip}\n    HostName {ip}\n    HostKeyAlias {name}\n"));
    }
    let names: Vec<String> = lab.vms.iter().flat_map(host_names).collect();
    out.push_str(&format!("\nHost {}\n", names.join(" ")));
    out.push_str(&format!("    User {}\n", lab.login.user));
    out.push_str(&format!("    UserKnownHostsFile {}\n", quote(&abs(&files.known_hosts()))));
    out.push_str("    StrictHostKeyChecking yes\n    CheckHostIP no\n    UpdateHostKeys no\n");
    if let Some(id) = identity {
        out.push_str(&format!("    IdentityFile {}\n    IdentitiesOnly yes\n", quote(&abs(id))));
    }
    out
}

/// Whether a hashed known_hosts host field (`|1|salt|hash`, what `HashKnownHosts yes` and
/// `ssh-keygen -H` write: base64 of HMAC-SHA1 keyed by the salt over the host name) is one of
/// `names`.
pub fn hashed_host_matches(field: &str, names: &[String]) -> bool {
    use base64ct::{Base64, Encoding};
    use hmac::{KeyInit, Mac};
    let Some((salt, hash)) = field.strip_prefix("|1|").and_then(|rest| rest.split_once('|')) else { return false };
    let (Ok(salt), Ok(hash)) = (Base64::decode_vec(salt), Base64::decode_vec(hash)) else { return false };
    names.iter().any(|name| {
        let Ok(mut mac) = hmac::Hmac::<sha1::Sha1>::new_from_slice(&salt) else { return false };
        mac.update(name.to_ascii_lowercase().as_bytes());
        mac.verify_slice(&hash).is_ok()
    })
}

/// `existing` (a known_hosts file) without lines for any of `names`, plain or hashed, with
/// `new` appended.
pub fn rewrite_known_hosts(existing: &str, names: &[String], new: &str) -> String {
    let mentions = |line: &str| {
        let t = line.trim_start();
        if t.starts_with('#') {
            return false;
        }
        let field = t.split_whitespace().find(|f| !f.starts_with('@')).unwrap_or("");
        if field.starts_with('|') {
            return hashed_host_matches(field, names);
        }
        field.split(',').any(|h| {
            let h = h.strip_prefix('[').and_then(|h| h.split(']').next()).unwrap_or(h);
            names.iter().any(|n| n.eq_ignore_ascii_case(h))
        })
    };
    let mut out: String = existing.lines().filter(|l| !mentions(l)).flat_map(|l| [l, "\n"]).collect();
    for line in new.lines().filter(|l| !l.starts_with('#')) {
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Rewrites the user's known_hosts (`path`) with the lab's entries, holding an exclusive lock
/// on it meanwhile as the tutorial's `flock` did, and replacing it atomically.
pub fn update_known_hosts(path: &Path, names: &[String], new: &str) -> Result<(), KeyError> {
    edit_locked(path, |existing| Some(rewrite_known_hosts(existing, names, new))).map(|_| ())
}

/// The `Include` line that makes plain `ssh worker0` use the lab's ssh_config.
pub fn include_line(lab_ssh_config: &Path) -> String {
    format!("Include {}", quote(lab_ssh_config))
}

/// The comment above the line [`add_include`] adds.
const INCLUDE_COMMENT: &str = "# Added by `kubenet ssh-config --install`: the lab's VMs by name.";

/// `existing` (a ~/.ssh/config) with `line` added at the top, where an `Include` applies to
/// every host (further down, inside a `Host` or `Match` block, it would apply only there).
/// None: the line is there already.
pub fn add_include(existing: &str, line: &str) -> Option<String> {
    if existing.lines().any(|l| l.trim() == line) {
        return None;
    }
    Some(format!("{INCLUDE_COMMENT}\n{line}\n\n{existing}"))
}

/// `existing` without `line` and the comment `add_include` put above it. None: not there.
pub fn remove_include(existing: &str, line: &str) -> Option<String> {
    let lines: Vec<&str> = existing.lines().collect();
    let at = lines.iter().position(|l| l.trim() == line)?;
    let mut keep: Vec<&str> = Vec::with_capacity(lines.len());
    for (i, l) in lines.iter().enumerate() {
        let ours = i == at
            // (Before `ssh-config`, the comment named `setup --ssh-include`.)
            || (i + 1 == at && (*l == INCLUDE_COMMENT || l.starts_with("# Added by `kubenet setup --ssh-include`")))
            || (i == at + 1 && l.trim().is_empty());
        if !ours {
            keep.push(l);
        }
    }
    Some(keep.iter().flat_map(|l| [*l, "\n"]).collect())
}

/// Applies `change` to the file at `path` (missing: empty) under an exclusive lock, writing the
/// result atomically with the file's mode kept (0600 for a new one). Returns whether it changed.
pub fn edit_locked(path: &Path, change: impl FnOnce(&str) -> Option<String>) -> Result<bool, KeyError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    // A ~/.ssh/config that is a link (into a dotfiles repository) is edited where it leads: the
    // rename below would otherwise put a file in place of the link.
    let resolved = std::fs::canonicalize(path).ok();
    let path = resolved.as_deref().unwrap_or(path);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    lock.lock().map_err(io_err(path))?;
    let mode = lock.metadata().map_err(io_err(path))?.permissions().mode() & 0o7777;
    let existing = std::fs::read_to_string(path).map_err(io_err(path))?;
    match change(&existing) {
        Some(new) => write_atomic(path, new.as_bytes(), mode).map(|()| true).map_err(io_err(path)),
        None => Ok(false),
    }
}

/// The host keys of every VM of `lab` that has one (after `kubenet setup`).
pub fn lab_host_keys(lab: &Lab) -> Result<Vec<(&Vm, PublicKey)>, KeyError> {
    let mut out = Vec::new();
    for vm in &lab.vms {
        let path = VmFiles::new(lab, vm).host_key();
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let key = PrivateKey::from_openssh(text)
                    .map_err(|e| KeyError::Format { path: path.clone(), message: e.to_string() })?;
                out.push((vm, key.public_key().clone()));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
    }
    Ok(out)
}

struct Capture(Arc<Mutex<Option<PublicKey>>>);

impl russh::client::Handler for Capture {
    type Error = russh::Error;
    async fn check_server_key(&mut self, key: &russh::keys::PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        if let russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } = key {
            *self.0.lock().unwrap() = Some(key.clone());
        }
        // Refuse: all we wanted was the key.
        Ok(false)
    }
}

/// The ed25519 host key the SSH server at `addr` presents (ssh-keyscan -t ed25519).
pub async fn fetch_host_key(addr: SocketAddr, timeout: Duration) -> io::Result<PublicKey> {
    let seen = Arc::new(Mutex::new(None));
    let mut config = russh::client::Config::default();
    config.preferred.key = std::borrow::Cow::Owned(vec![russh::keys::Algorithm::Ed25519]);
    let attempt = russh::client::connect(Arc::new(config), addr, Capture(seen.clone()));
    let result = tokio::time::timeout(timeout, attempt).await;
    if let Some(key) = seen.lock().unwrap().take() {
        return Ok(key);
    }
    Err(match result {
        Err(_) => io::Error::new(io::ErrorKind::TimedOut, format!("{addr}: no SSH host key within {timeout:?}")),
        Ok(Err(e)) => io::Error::other(format!("{addr}: {e}")),
        Ok(Ok(_)) => io::Error::other(format!("{addr}: the server showed no host key")),
    })
}

#[cfg(test)]
#[path = "keys_tests.rs"]
mod tests;
