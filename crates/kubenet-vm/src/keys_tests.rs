use std::os::unix::fs::PermissionsExt;

use super::*;

fn lab(state: &Path) -> Lab {
    kubenet_cluster::parse(kubenet_cluster::REFERENCE_CONFIG, kubenet_cluster::Source::Embedded, state).unwrap()
}

#[test]
fn host_keys_are_made_once_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w/ssh_host_ed25519_key");
    let a = load_or_create(&path, "worker0").unwrap();
    let b = load_or_create(&path, "ignored").unwrap();
    assert_eq!(a.public_key().key_data(), b.public_key().key_data(), "the second call reads the first key");
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let pub_text = std::fs::read_to_string(path.with_extension("pub")).unwrap();
    assert!(pub_text.starts_with("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5") && pub_text.trim_end().ends_with(" worker0"));
    assert_ne!(generate("x").unwrap().public_key().key_data(), a.public_key().key_data(), "keys are random");
}

#[test]
fn known_hosts_lists_name_fqdn_and_address() {
    let lab = lab(Path::new("/lab"));
    let key = generate("c").unwrap();
    let vm = lab.vm_by_name("worker0").unwrap();
    let text = known_hosts(&[(vm, key.public_key().clone())]).unwrap();
    let line = text.lines().find(|l| !l.starts_with('#')).unwrap();
    let (hosts, rest) = line.split_once(' ').unwrap();
    assert_eq!(hosts, "worker0,worker0.kubevms,192.168.1.14");
    assert_eq!(PublicKey::from_openssh(rest).unwrap().key_data(), key.public_key().key_data());
    assert_eq!(rest.split(' ').count(), 2, "no comment: {rest}");
}

#[test]
fn ssh_config_pins_the_lab_known_hosts() {
    let lab = lab(Path::new("/lab"));
    let text = ssh_config(&lab, Some(Path::new("/lab/id_ed25519")));
    assert!(
        text.contains(
            "\nHost worker0 worker0.kubevms 192.168.1.14\n    HostName 192.168.1.14\n    HostKeyAlias worker0\n"
        ),
        "{text}"
    );
    assert!(
        text.contains("    User kube\n    UserKnownHostsFile \"/lab/known_hosts\"\n    StrictHostKeyChecking yes\n"),
        "{text}"
    );
    assert!(text.contains("IdentityFile \"/lab/id_ed25519\"\n    IdentitiesOnly yes"));
    assert!(!ssh_config(&lab, None).contains("IdentityFile"));
}

// The hashed lines are what `ssh-keygen -H` made of plain lines for worker0, 192.168.1.14 and
// other; the malformed `|1|hash=|salt=` is kept as it is.
#[test]
fn rewriting_known_hosts_drops_only_the_labs_stale_lines() {
    let existing = "github.com ssh-ed25519 AAAAgh\n\
                    worker0 ssh-ed25519 AAAAold\n\
                    192.168.1.14,other ssh-rsa AAAAold2\n\
                    [worker0.kubevms]:22 ssh-ed25519 AAAAold3\n\
                    @cert-authority worker0 ssh-ed25519 AAAAca\n\
                    |1|hash=|salt= ssh-ed25519 AAAAhashed\n\
                    |1|0VDxr1O2tdpT8UV0Jndpa2g2VVo=|qWnaHoylzkblWsbwREDGfPXgZB0= ssh-ed25519 AAAAworker0\n\
                    |1|ckMZzheowWS3QzBS9RhH7NX/4RA=|PxIB46dAeno3/a3ZC6P9vbK4Xos= ssh-ed25519 AAAAip\n\
                    |1|tL9PaiY0xgHO+RNfj9fXPpOhb44=|snt8RB9MJB93cAMEHLDGDL8kZAE= ssh-ed25519 AAAAother\n\
                    # a comment about worker0\n\
                    worker01 ssh-ed25519 AAAAkeep\n";
    let names: Vec<String> = ["worker0", "worker0.kubevms", "192.168.1.14"].map(String::from).to_vec();
    let out =
        rewrite_known_hosts(existing, &names, "# header\nworker0,worker0.kubevms,192.168.1.14 ssh-ed25519 AAAAnew\n");
    assert_eq!(
        out,
        "github.com ssh-ed25519 AAAAgh\n\
         |1|hash=|salt= ssh-ed25519 AAAAhashed\n\
         |1|tL9PaiY0xgHO+RNfj9fXPpOhb44=|snt8RB9MJB93cAMEHLDGDL8kZAE= ssh-ed25519 AAAAother\n\
         # a comment about worker0\n\
         worker01 ssh-ed25519 AAAAkeep\n\
         worker0,worker0.kubevms,192.168.1.14 ssh-ed25519 AAAAnew\n"
    );
}

#[test]
fn user_known_hosts_is_rewritten_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(".ssh/known_hosts");
    update_known_hosts(&path, &["a".into()], "a ssh-ed25519 AAAA1\n").unwrap();
    update_known_hosts(&path, &["a".into()], "a ssh-ed25519 AAAA2\n").unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "a ssh-ed25519 AAAA2\n");
}

#[test]
fn login_key_prefers_the_users_then_makes_a_lab_key() {
    let home = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let lab = lab(state.path());
    // No key at all: a lab key, used with IdentityFile.
    let made = login_key(&lab, home.path()).unwrap();
    assert_eq!(made.identity.as_deref(), Some(state.path().join("id_ed25519").as_path()));
    assert!(made.public.starts_with("ssh-ed25519 "));
    assert_eq!(login_key(&lab, home.path()).unwrap(), made, "made once");
    // The user's own key wins once it exists.
    std::fs::create_dir_all(home.path().join(".ssh")).unwrap();
    let mine = generate("me@laptop").unwrap();
    std::fs::write(home.path().join(".ssh/id_rsa.pub"), public_line(mine.public_key()).unwrap() + "\n").unwrap();
    let got = login_key(&lab, home.path()).unwrap();
    assert_eq!(got.identity, None);
    assert!(got.public.ends_with(" me@laptop"));
    // A configured key that is missing is an error, not a silent fallback.
    let mut lab2 = lab.clone();
    lab2.login.ssh_public_key = Some("~/.ssh/nope.pub".into());
    let err = login_key(&lab2, home.path()).unwrap_err().to_string();
    assert!(err.contains(".ssh/nope.pub"), "{err}");
    // A file that is not a key says which file.
    std::fs::write(home.path().join(".ssh/id_ed25519.pub"), "not a key\n").unwrap();
    let err = login_key(&lab, home.path()).unwrap_err().to_string();
    assert!(err.contains("id_ed25519.pub: not an OpenSSH key"), "{err}");
}

#[test]
fn the_include_line_goes_on_top_once_and_comes_out_cleanly() {
    let line = include_line(Path::new("/lab/ssh_config"));
    assert_eq!(line, "Include \"/lab/ssh_config\"");
    let user = "Host github.com\n    User git\n";
    let with = add_include(user, &line).unwrap();
    assert!(with.starts_with("# Added by"), "{with}");
    let first_host = with.find("Host github.com").unwrap();
    assert!(with.find(&line).unwrap() < first_host, "before any Host block:\n{with}");
    assert_eq!(add_include(&with, &line), None, "only once");
    assert_eq!(remove_include(&with, &line).as_deref(), Some(user));
    assert_eq!(remove_include(user, &line), None);
}

#[test]
fn a_locked_edit_keeps_the_mode_and_makes_new_files_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(".ssh/config");
    assert!(edit_locked(&path, |old| add_include(old, "Include x")).unwrap());
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(!edit_locked(&path, |old| add_include(old, "Include x")).unwrap(), "nothing to do");
    assert!(edit_locked(&path, |old| remove_include(old, "Include x")).unwrap());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o644);
}

#[test]
fn a_config_that_is_a_link_is_edited_where_it_leads() {
    let dir = tempfile::tempdir().unwrap();
    let dotfiles = dir.path().join("dotfiles/ssh_config");
    std::fs::create_dir_all(dotfiles.parent().unwrap()).unwrap();
    std::fs::write(&dotfiles, "Host example\n").unwrap();
    let link = dir.path().join(".ssh/config");
    std::fs::create_dir_all(link.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(&dotfiles, &link).unwrap();
    assert!(edit_locked(&link, |old| add_include(old, "Include x")).unwrap());
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the link stays a link");
    assert!(std::fs::read_to_string(&dotfiles).unwrap().contains("Include x\n\nHost example\n"));
}
