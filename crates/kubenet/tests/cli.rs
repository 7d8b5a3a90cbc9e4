//! The CLI as a user runs it: the real binary, a temporary directory, no network.

use std::path::Path;
use std::process::{Command, Output};

fn kubenet(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kubenet"))
        .args(args)
        .current_dir(dir)
        .env_remove("KUBENET_CONFIG")
        .env_remove("RUST_LOG")
        .output()
        .expect("run kubenet")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn config_with_no_file_shows_the_reference_lab() {
    let dir = tempfile::tempdir().unwrap();
    let o = kubenet(dir.path(), &["config"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let rows: Vec<Vec<&str>> =
        out.lines().skip_while(|l| !l.starts_with("NAME")).skip(1).map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows.len(), 7, "{out}");
    // Every guest is of the host's architecture (`arch = "auto"`).
    let arch = kubenet_cluster::Arch::HOST.to_string();
    let arch = arch.as_str();
    assert_eq!(
        rows[0],
        ["gateway", "0", "gateway", "52:52:52:00:00:00", "192.168.1.10", "gateway.kubevms", arch, "2", "2GiB", "20GiB"]
    );
    assert_eq!(
        rows[3],
        [
            "control2",
            "3",
            "control",
            "52:52:52:00:00:03",
            "192.168.1.13",
            "control2.kubevms",
            arch,
            "2",
            "2GiB",
            "20GiB"
        ]
    );
    assert_eq!(
        rows[6],
        ["worker2", "6", "worker", "52:52:52:00:00:06", "192.168.1.16", "worker2.kubevms", arch, "4", "8GiB", "20GiB"]
    );
    assert!(out.contains("<built-in reference lab>"));
}

#[test]
fn config_json_gives_the_same_lab() {
    let dir = tempfile::tempdir().unwrap();
    let o = kubenet(dir.path(), &["config", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let vms = v["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 7);
    for (i, vm) in vms.iter().enumerate() {
        assert_eq!(vm["id"], i);
        assert_eq!(vm["mac"], format!("52:52:52:00:00:{i:02x}"));
        assert_eq!(vm["ip"], format!("192.168.1.{}", 10 + i));
        assert_eq!(vm["fqdn"], format!("{}.kubevms", vm["name"].as_str().unwrap()));
        let worker = vm["role"] == "worker";
        assert_eq!(vm["vcpus"], if worker { 4 } else { 2 });
        assert_eq!(vm["memory"], if worker { 8u64 << 30 } else { 2u64 << 30 });
        assert_eq!(vm["disk"], 20u64 << 30);
    }
    assert_eq!(v["network"]["domain"], "kubevms");
    assert_eq!(v["network"]["host_address"], "192.168.1.1");
}

#[test]
fn init_writes_the_reference_lab_once_and_it_is_then_used() {
    let dir = tempfile::tempdir().unwrap();
    let o = kubenet(dir.path(), &["init"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let written = std::fs::read_to_string(dir.path().join("kubenet.toml")).unwrap();
    assert!(written.contains("domain = \"kubevms\""));

    // Edit it: ./kubenet.toml now wins over the built-in lab.
    std::fs::write(dir.path().join("kubenet.toml"), written.replace("domain = \"kubevms\"", "domain = \"lab.test\""))
        .unwrap();
    let o = kubenet(dir.path(), &["config"]);
    assert!(stdout(&o).contains("worker0.lab.test"), "{}", stdout(&o));

    // A second init refuses and leaves the edit alone.
    let o = kubenet(dir.path(), &["init", "."]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));
    assert!(std::fs::read_to_string(dir.path().join("kubenet.toml")).unwrap().contains("lab.test"));
}

#[test]
fn config_check_reports_file_line_and_key_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.toml"), "[network]\nlease_time = \"forever\"\n[[group]]\nname = \"a\"\n")
        .unwrap();
    let o = kubenet(dir.path(), &["config", "check", "bad.toml"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).starts_with("bad.toml:2:14: network.lease_time: `forever` is not a duration"), "{}", stderr(&o));

    std::fs::write(dir.path().join("good.toml"), "[[group]]\nname = \"a\"\n").unwrap();
    let o = kubenet(dir.path(), &["config", "check", "good.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "good.toml: ok, 1 VMs on 192.168.1.0/24\n");
}

#[test]
fn kubenet_config_env_is_second_in_the_lookup_order() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("env.toml"), "[[group]]\nname = \"fromenv\"\n").unwrap();
    std::fs::write(dir.path().join("flag.toml"), "[[group]]\nname = \"fromflag\"\n").unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_kubenet"))
            .args(args)
            .current_dir(dir.path())
            .env("KUBENET_CONFIG", "env.toml")
            .output()
            .unwrap()
    };
    assert!(stdout(&run(&["config"])).contains("fromenv"));
    assert!(stdout(&run(&["--config", "flag.toml", "config"])).contains("fromflag"));
}

#[test]
fn completions_and_version() {
    let dir = tempfile::tempdir().unwrap();
    let o = kubenet(dir.path(), &["completions", "bash"]);
    assert!(o.status.success());
    assert!(stdout(&o).contains("_clap_complete_kubenet()"), "not a bash completion script");
    let o = kubenet(dir.path(), &["--version"]);
    assert_eq!(stdout(&o).trim(), format!("kubenet {}", env!("CARGO_PKG_VERSION")));
}

/// `kubenet CMD | head` with head gone before kubenet writes: quiet success, as ripgrep does,
/// for the table commands and for the lifecycle ones (status) alike.
#[test]
fn a_closed_stdout_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    for args in [&["config"][..], &["config", "--json"], &["status"], &["status", "--json"], &["completions", "bash"]] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kubenet"))
            .args(args)
            .current_dir(dir.path())
            .env_remove("KUBENET_CONFIG")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The reader goes away before kubenet has started, so its first write finds no reader.
        drop(child.stdout.take());
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        // Nothing but status's note that this is the built-in lab.
        let err = stderr(&o);
        assert!(err.lines().all(|l| l.starts_with("(the built-in reference lab, state in ")), "{args:?}: {err}");
    }
}

/// Standard output that cannot be written (a full disk, /dev/full) is an error with exit 1,
/// never a panic, for completions too.
#[test]
fn a_full_stdout_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    for args in [&["config"][..], &["completions", "bash"], &["completions", "zsh"]] {
        let o = Command::new(env!("CARGO_BIN_EXE_kubenet"))
            .args(args)
            .current_dir(dir.path())
            .env_remove("KUBENET_CONFIG")
            .stdout(std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap())
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        let err = stderr(&o);
        assert!(
            err.contains("writing to standard output") && err.contains("No space left on device"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// `up --dry-run` prints the command lines and starts nothing; `firmware` picks what boots.
#[test]
fn dry_run_shows_the_firmware_the_config_asks_for() {
    if !(cfg!(target_os = "linux") && cfg!(target_arch = "x86_64")) {
        eprintln!("SKIP: the firmware files checked here are x86 Linux ones");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lab = |firmware: &str| {
        let text = reference_lab().replace("accelerator = \"auto\"", "accelerator = \"tcg\"");
        let text = text.replace("firmware = \"auto\"", &format!("firmware = \"{firmware}\""));
        assert!(text.contains(&format!("firmware = \"{firmware}\"")));
        std::fs::write(dir.path().join("kubenet.toml"), text).unwrap();
        kubenet(dir.path(), &["up", "--dry-run", "gateway"])
    };
    let o = lab("bios");
    assert!(o.status.success(), "{}", stderr(&o));
    let line = stdout(&o);
    // QEMU by the absolute path found in PATH: what root will run is what is shown.
    let (qemu, rest) = line.split_once(' ').unwrap();
    assert!(qemu.starts_with('/') && qemu.ends_with("/qemu-system-x86_64"), "{line}");
    assert!(rest.starts_with("-name gateway -machine q35,accel=tcg -cpu max"), "{line}");
    assert!(!line.contains("pflash"), "SeaBIOS needs no flash drives: {line}");
    let ovmf = Path::new("/usr/share/OVMF/OVMF_CODE_4M.fd");
    let o = lab("uefi");
    if ovmf.exists() {
        assert!(o.status.success(), "{}", stderr(&o));
        let line = stdout(&o);
        assert!(line.contains(&format!("-drive if=pflash,format=raw,unit=0,readonly=on,file={}", ovmf.display())));
        assert!(line.contains("if=pflash,format=raw,unit=1,file=") && line.contains("gateway/efi-vars.fd"), "{line}");
    } else {
        assert!(!o.status.success());
        assert!(stderr(&o).contains("apt install ovmf"), "{}", stderr(&o));
    }
    // Nothing was prepared or started.
    assert!(!dir.path().join("gateway").exists());
}

fn reference_lab() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/kubenet.toml")).unwrap()
}

/// What a new user meets first: the messages name the next command, not a puzzle.
#[test]
fn first_contact_messages_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // init DIR names the command that uses DIR's file (the plain one shows the built-in lab).
    let o = kubenet(d, &["init", "my lab"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let file = d.join("my lab/kubenet.toml");
    assert_eq!(
        stdout(&o),
        format!(
            "wrote my lab/kubenet.toml: edit it, then `kubenet --config 'my lab/kubenet.toml' config` shows the lab\n"
        )
    );
    assert!(file.is_file());
    let shown = kubenet(d, &["--config", "my lab/kubenet.toml", "config"]);
    assert!(stdout(&shown).contains(&format!("config       {}", "my lab/kubenet.toml")), "{}", stdout(&shown));
    let o = kubenet(&d.join("my lab"), &["init", "."]);
    assert!(!o.status.success(), "init never overwrites");
    let fresh = tempfile::tempdir().unwrap();
    let o = kubenet(fresh.path(), &["init", "."]);
    assert_eq!(stdout(&o), "wrote ./kubenet.toml: edit it, then `kubenet config` shows the lab\n");

    // Unknown VM names are usage errors: exit 2, naming the lab's VMs.
    for args in [
        &["reset", "worker9"][..],
        &["ssh", "worker9"],
        &["console", "nope"],
        &["down", "worker9"],
        &["image", "pull", "worker9"],
    ] {
        let o = kubenet(d, args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("no VM named") && stderr(&o).contains("its VMs: gateway"),
            "{args:?}: {}",
            stderr(&o)
        );
    }

    // ssh to a VM that is not running says so, as console does, before ssh tries the network.
    for args in [&["ssh", "worker0"][..], &["console", "worker0"]] {
        let o = kubenet(d, args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert_eq!(stderr(&o), "kubenet: worker0 is not running: start it with `kubenet up worker0`\n", "{args:?}");
    }

    // reset of a VM never set up says so instead of "reset".
    let o = kubenet(d, &["reset", "worker0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "worker0    nothing to reset: it was never set up (`kubenet up worker0` makes it)\n");

    // status says when what it shows is the built-in lab, and where its state is.
    let o = kubenet(d, &["status"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).starts_with(&format!("(the built-in reference lab, state in {}", d.display())),
        "{}",
        stderr(&o)
    );
    let o = kubenet(d, &["--config", "my lab/kubenet.toml", "status"]);
    assert_eq!(stderr(&o), "", "a lab from a file needs no note");
}

/// The bash script `kubenet completions bash` prints, sourced in a real bash with this kubenet
/// first in PATH: subcommands, and the lab's own VM names (from ./kubenet.toml, here a lab with
/// other names than the built-in one) where a VM is asked for.
#[test]
fn bash_completes_subcommands_and_the_labs_vm_names() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let lab = "[[group]]\nprefix = \"node\"\ncount = 3\n[[group]]\nname = \"nfs\"\n";
    std::fs::write(d.join("kubenet.toml"), lab).unwrap();
    let script = stdout(&kubenet(d, &["completions", "bash"]));
    std::fs::write(d.join("kubenet.bash"), &script).unwrap();
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_kubenet")).parent().unwrap();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let complete = |words: &[&str]| -> Vec<String> {
        let cword = words.len() - 1;
        let program = format!(
            "source kubenet.bash; COMP_WORDS=({}); COMP_CWORD={cword}; COMP_TYPE=9; _clap_complete_kubenet kubenet '{}' '{}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            words.iter().map(|w| format!("'{w}'")).collect::<Vec<_>>().join(" "),
            words[cword],
            words[cword - 1],
        );
        let o = Command::new("bash")
            .args(["-c", &program])
            .current_dir(d)
            .env("PATH", &path)
            .env_remove("KUBENET_CONFIG")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o).lines().map(|l| l.trim().to_owned()).filter(|l| !l.is_empty()).collect()
    };
    assert_eq!(complete(&["kubenet", "ssh", "no"]), ["node0", "node1", "node2"]);
    assert_eq!(complete(&["kubenet", "down", "n"]), ["node0", "node1", "node2", "nfs"]);
    assert_eq!(complete(&["kubenet", "snapshot", "save", "s1", "--vm", "nf"]), ["nfs"]);
    assert!(complete(&["kubenet", "snaps"]).contains(&"snapshot".to_owned()));
}
