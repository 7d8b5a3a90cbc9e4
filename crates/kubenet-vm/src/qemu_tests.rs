use std::path::Path;

use super::*;

fn lab() -> Lab {
    kubenet_cluster::parse(kubenet_cluster::REFERENCE_CONFIG, kubenet_cluster::Source::Embedded, Path::new("/lab"))
        .unwrap()
}

fn uefi(code: &str, vars: &str) -> Firmware {
    Firmware::Uefi { code: code.into(), vars_template: vars.into() }
}

fn guest(arch: Arch, firmware: Firmware, drop_to: Option<DropTo>) -> (Arch, Result<Guest, ProfileError>) {
    (arch, Ok(Guest { qemu: arch.qemu_binary().into(), firmware, drop_to }))
}

/// An Apple Silicon Mac with Homebrew's QEMU: hvf for arm64 guests, TCG for x86 ones.
fn mac_profile() -> HostProfile {
    let alice = || Some(DropTo::RunWith("alice".into()));
    let share = "/opt/homebrew/share/qemu";
    HostProfile {
        os: Os::MacOs,
        arch: Arch::Aarch64,
        accel: Accel::Hvf,
        files_by_fd: true,
        guests: vec![
            guest(
                Arch::X86_64,
                uefi(&format!("{share}/edk2-x86_64-code.fd"), &format!("{share}/edk2-i386-vars.fd")),
                alice(),
            ),
            guest(
                Arch::Aarch64,
                uefi(&format!("{share}/edk2-aarch64-code.fd"), &format!("{share}/edk2-arm-vars.fd")),
                alice(),
            ),
        ],
    }
}

/// An x86 Linux host with `firmware` for x86 guests and AAVMF for arm64 ones.
fn linux_profile(accel: Accel, firmware: Firmware) -> HostProfile {
    HostProfile {
        os: Os::Linux,
        arch: Arch::X86_64,
        accel,
        files_by_fd: false,
        guests: vec![
            guest(Arch::X86_64, firmware, None),
            guest(Arch::Aarch64, uefi("/usr/share/AAVMF/AAVMF_CODE.fd", "/usr/share/AAVMF/AAVMF_VARS.fd"), None),
        ],
    }
}

fn line(lab: &Lab, name: &str, p: &HostProfile) -> String {
    shell_line(&argv(lab, lab.vm_by_name(name).unwrap(), p).unwrap())
}

/// The reference lab with `arch = ARCH` in the workers' group.
pub(crate) fn lab_with_workers(arch: &str) -> Lab {
    let text = kubenet_cluster::REFERENCE_CONFIG;
    let (head, workers) = text.split_at(text.find("prefix = \"worker\"\n").unwrap());
    let text = format!("{head}{}", workers.replacen("arch = \"auto\"", &format!("arch = \"{arch}\""), 1));
    kubenet_cluster::parse(&text, kubenet_cluster::Source::Embedded, Path::new("/lab")).unwrap()
}

/// macOS: QEMU starts as root, so every file of the owner's comes as a descriptor the agent
/// opened as the owner (the variables and the overlay twice, read-write and read-only), the
/// overlay's base too, with no backing of its own; the sockets come bound; only the firmware's
/// code (root's) and the pidfile (in root's runtime directory) are named by path.
#[test]
fn macos_worker_golden() {
    let id = crate::files::lab_id(Path::new("/lab"));
    assert_eq!(
        line(&lab(), "worker0", &mac_profile()),
        format!(
            "qemu-system-aarch64 -name worker0 -machine virt,accel=hvf,highmem=on -cpu host -smp 4 -m 8192M \
             -nodefaults -display none \
             -add-fd fd=4,set=1 -add-fd fd=5,set=1 -add-fd fd=6,set=2 -add-fd fd=7,set=2 -add-fd fd=8,set=3 \
             -add-fd fd=9,set=4 -add-fd fd=10,set=5 \
             -drive if=pflash,format=raw,unit=0,readonly=on,file=/opt/homebrew/share/qemu/edk2-aarch64-code.fd \
             -drive if=pflash,format=raw,unit=1,file=/dev/fdset/1 \
             -blockdev '{{\"driver\":\"qcow2\",\"node-name\":\"disk0\",\"file\":{{\"driver\":\"file\",\"filename\":\"/dev/fdset/2\"}},\
             \"backing\":{{\"driver\":\"qcow2\",\"file\":{{\"driver\":\"file\",\"filename\":\"/dev/fdset/3\"}},\"backing\":null}}}}' \
             -device virtio-blk-pci,drive=disk0 \
             -drive if=virtio,format=raw,readonly=on,file=/dev/fdset/4 \
             -nic vmnet-shared,start-address=192.168.1.1,end-address=192.168.1.20,subnet-mask=255.255.255.0,mac=52:52:52:00:00:04,model=virtio-net-pci \
             -device virtio-rng-pci \
             -chardev socket,id=serial0,fd=11,server=on,wait=off,logfile=/dev/fdset/5,logappend=on -serial chardev:serial0 \
             -chardev socket,id=qmp,fd=12,server=on,wait=off -mon chardev=qmp,mode=control -run-with user=alice \
             -pidfile /var/run/kubenet/{id}/worker0.pid -daemonize"
        )
    );
}

/// Whatever the VM, the macOS command line names nothing in the lab's folder: a link there can
/// send no open of root's QEMU anywhere.
#[test]
fn macos_names_no_path_in_the_owners_folder() {
    for lab in [lab(), lab_with_workers("x86_64")] {
        for vm in &lab.vms {
            let l = line(&lab, &vm.name, &mac_profile());
            assert!(!l.contains("/lab"), "{l}");
            assert!(l.contains("-add-fd fd=6,set=2 ") && l.contains(" -mon chardev=qmp,mode=control "), "{l}");
        }
    }
}

/// The descriptors' numbers are the agent's, given at launch; a BIOS guest has no variables to
/// pass; a raw base image is described as raw.
#[test]
fn files_by_descriptor_take_the_agents_numbers() {
    let lab = lab();
    let mut p = linux_profile(Accel::Tcg, Firmware::Bios);
    p.files_by_fd = true;
    let vm = lab.vm_by_name("gateway").unwrap();
    let fds = FdNumbers {
        efi_vars: None,
        disk: (20, 21),
        base: 22,
        seed: 23,
        console_log: 24,
        serial: 25,
        qmp: 26,
        base_format: "raw",
    };
    let l = shell_line(&launch_argv(&lab, vm, &p.launch(vm).unwrap(), Some(&fds)));
    assert!(
        l.contains(
            "-display none -add-fd fd=20,set=2 -add-fd fd=21,set=2 -add-fd fd=22,set=3 -add-fd fd=23,set=4 \
             -add-fd fd=24,set=5 -blockdev "
        ),
        "{l}"
    );
    assert!(!l.contains("set=1") && !l.contains("pflash"), "{l}");
    assert!(l.contains(r#""backing":{"driver":"raw","file""#), "{l}");
    assert!(l.contains("socket,id=serial0,fd=25,") && l.contains("socket,id=qmp,fd=26,"), "{l}");
    // The tap stays at 3, and Linux keeps the pidfile in the VM's folder.
    assert!(l.contains("-netdev tap,id=net0,fd=3 ") && l.ends_with("-pidfile /lab/gateway/qemu.pid -daemonize"), "{l}");
    // Numbers given to a profile that passes files by path change nothing.
    p.files_by_fd = false;
    assert_eq!(launch_argv(&lab, vm, &p.launch(vm).unwrap(), Some(&fds)), argv(&lab, vm, &p).unwrap());
}

#[test]
fn linux_kvm_uefi_golden() {
    let p = linux_profile(
        Accel::Kvm,
        Firmware::Uefi {
            code: "/usr/share/OVMF/OVMF_CODE_4M.fd".into(),
            vars_template: "/usr/share/OVMF/OVMF_VARS_4M.fd".into(),
        },
    );
    assert_eq!(
        line(&lab(), "gateway", &p),
        "qemu-system-x86_64 -name gateway -machine q35,accel=kvm -cpu host -smp 2 -m 2048M -nodefaults -display none \
         -drive if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd \
         -drive if=pflash,format=raw,unit=1,file=/lab/gateway/efi-vars.fd \
         -drive if=virtio,format=qcow2,file=/lab/gateway/disk.img \
         -drive if=virtio,format=raw,readonly=on,file=/lab/gateway/seed.iso \
         -netdev tap,id=net0,fd=3 \
         -device virtio-net-pci,netdev=net0,mac=52:52:52:00:00:00 -device virtio-rng-pci \
         -chardev socket,id=serial0,server=on,wait=off,path=/lab/gateway/serial.sock,logfile=/lab/gateway/console.log,logappend=on \
         -serial chardev:serial0 -qmp unix:/lab/gateway/qmp.sock,server=on,wait=off \
         -pidfile /lab/gateway/qemu.pid -daemonize"
    );
}

#[test]
fn every_group_gets_its_size_mac_and_tap() {
    let lab = lab();
    let p = linux_profile(Accel::Tcg, Firmware::Bios);
    for vm in &lab.vms {
        let l = line(&lab, &vm.name, &p);
        let (smp, mem) = if vm.role == "worker" { ("4", "8192M") } else { ("2", "2048M") };
        assert!(l.contains(&format!("-smp {smp} -m {mem} ")), "{l}");
        // The tap is the agent's to open (kubenet0-ID on the lab's bridge), QEMU's at fd 3.
        assert!(l.contains("-netdev tap,id=net0,fd=3 "), "{l}");
        assert_eq!(tap_name(&lab, vm), format!("kubenet0-{}", vm.id));
        assert!(l.contains(&format!("mac=52:52:52:00:00:{:02x} ", vm.id)), "{l}");
        // TCG has no host CPU to pass through; BIOS needs no pflash.
        assert!(l.contains("-machine q35,accel=tcg -cpu max "), "{l}");
        assert!(!l.contains("pflash"), "{l}");
    }
}

/// An arm64 Linux host (a Raspberry Pi, an Ampere server) with KVM and Debian's AAVMF.
fn linux_arm_profile(drop_to: Option<DropTo>, files_by_fd: bool) -> HostProfile {
    HostProfile {
        os: Os::Linux,
        arch: Arch::Aarch64,
        accel: Accel::Kvm,
        files_by_fd,
        guests: vec![
            guest(
                Arch::X86_64,
                uefi("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
                drop_to.clone(),
            ),
            guest(Arch::Aarch64, uefi("/usr/share/AAVMF/AAVMF_CODE.fd", "/usr/share/AAVMF/AAVMF_VARS.fd"), drop_to),
        ],
    }
}

#[test]
fn linux_aarch64_uses_virt_like_the_mac() {
    let l = line(&lab(), "control1", &linux_arm_profile(None, false));
    assert!(l.starts_with("qemu-system-aarch64 -name control1 -machine virt,accel=kvm,highmem=on -cpu host "), "{l}");
}

/// The same VM on an Apple Silicon Mac and on an arm64 Linux host that passes files by
/// descriptor too: the command lines differ in the accelerator, the NIC, the firmware's paths
/// and where the pidfile is, and in nothing else.
#[test]
fn macos_and_linux_aarch64_differ_only_in_accelerator_nic_and_firmware_paths() {
    let lab = lab();
    let vm = lab.vm_by_name("worker0").unwrap();
    let mac = argv(&lab, vm, &mac_profile()).unwrap();
    let linux = argv(&lab, vm, &linux_arm_profile(Some(DropTo::RunWith("alice".into())), true)).unwrap();
    let text = |a: &[OsString]| a.iter().map(|s| s.to_string_lossy().into_owned()).collect::<Vec<_>>();
    let (mac, linux) = (text(&mac), text(&linux));
    // The NIC: one `-nic` pair on macOS, a `-netdev` and a `-device` pair on Linux.
    let nic_at = |a: &[String], flag: &str| a.iter().position(|s| s == flag).unwrap();
    let (m, l) = (nic_at(&mac, "-nic"), nic_at(&linux, "-netdev"));
    assert_eq!(m, l, "the NIC sits at the same place");
    assert_eq!(
        mac[m + 1],
        "vmnet-shared,start-address=192.168.1.1,end-address=192.168.1.20,subnet-mask=255.255.255.0,mac=52:52:52:00:00:04,model=virtio-net-pci"
    );
    assert_eq!(
        linux[l..l + 4],
        ["-netdev", "tap,id=net0,fd=3", "-device", "virtio-net-pci,netdev=net0,mac=52:52:52:00:00:04"]
    );
    let mac_rest: Vec<&String> = mac[..m].iter().chain(&mac[m + 2..]).collect();
    let linux_rest: Vec<&String> = linux[..l].iter().chain(&linux[l + 4..]).collect();
    assert_eq!(mac_rest.len(), linux_rest.len());
    let differ: Vec<(&str, &str)> =
        mac_rest.iter().zip(&linux_rest).filter(|(a, b)| a != b).map(|(a, b)| (a.as_str(), b.as_str())).collect();
    assert_eq!(
        differ,
        [
            ("virt,accel=hvf,highmem=on", "virt,accel=kvm,highmem=on"),
            (
                "if=pflash,format=raw,unit=0,readonly=on,file=/opt/homebrew/share/qemu/edk2-aarch64-code.fd",
                "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/AAVMF/AAVMF_CODE.fd"
            ),
            (
                &format!("/var/run/kubenet/{}/worker0.pid", crate::files::lab_id(Path::new("/lab"))),
                "/lab/worker0/qemu.pid"
            ),
        ]
    );
}

#[test]
fn a_foreign_guest_runs_under_tcg_with_its_own_qemu_and_firmware() {
    let lab = lab_with_workers("aarch64");
    let p = linux_profile(Accel::Kvm, uefi("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"));
    // x86 guests keep KVM and OVMF; the arm64 workers get TCG, the aarch64 QEMU and AAVMF.
    let gw = line(&lab, "gateway", &p);
    assert!(gw.starts_with("qemu-system-x86_64 -name gateway -machine q35,accel=kvm -cpu host "), "{gw}");
    let w = line(&lab, "worker2", &p);
    assert!(
        w.starts_with("qemu-system-aarch64 -name worker2 -machine virt,accel=tcg,highmem=on -cpu max,pauth-impdef=on "),
        "{w}"
    );
    assert!(w.contains("file=/usr/share/AAVMF/AAVMF_CODE.fd "), "{w}");
    assert!(w.contains("tap,id=net0,fd=3 ") && w.contains("mac=52:52:52:00:00:06 "), "{w}");
    let launch = p.launch(lab.vm_by_name("worker2").unwrap()).unwrap();
    assert_eq!((launch.arch, launch.accel), (Arch::Aarch64, Accel::Tcg));
    assert_eq!(launch.guest.firmware, uefi("/usr/share/AAVMF/AAVMF_CODE.fd", "/usr/share/AAVMF/AAVMF_VARS.fd"));
    // One warning line per emulated VM, none for the native ones.
    let warn = emulation_warning(lab.vm_by_name("worker2").unwrap(), Arch::X86_64).unwrap();
    assert_eq!(
        warn,
        "worker2: an aarch64 guest on an x86_64 host runs under TCG (software emulation), many times slower than a native one"
    );
    assert_eq!(emulation_warning(lab.vm_by_name("gateway").unwrap(), Arch::X86_64), None);
    // On the Mac the same workers are native (hvf), and an x86 group would be the emulated one.
    let w = line(&lab, "worker2", &mac_profile());
    assert!(w.contains("-machine virt,accel=hvf,highmem=on -cpu host "), "{w}");
    assert_eq!(emulation_warning(lab.vm_by_name("worker2").unwrap(), Arch::Aarch64), None);
    let x86 = lab_with_workers("x86_64");
    let w = line(&x86, "worker0", &mac_profile());
    assert!(w.starts_with("qemu-system-x86_64 -name worker0 -machine q35,accel=tcg -cpu max "), "{w}");
    assert!(w.contains("edk2-x86_64-code.fd") && w.contains("-nic vmnet-shared,"), "{w}");
}

#[test]
fn a_guest_whose_architecture_cannot_run_here_says_what_to_install() {
    let lab = lab_with_workers("aarch64");
    let mut p = linux_profile(Accel::Tcg, Firmware::Bios);
    let arm = firmware_candidates(Os::Linux, Arch::Aarch64, None);
    p.guests[1].1 = Err(pick_firmware(FirmwareChoice::Auto, Os::Linux, Arch::Aarch64, &arm, |_| false).unwrap_err());
    let err = argv(&lab, lab.vm_by_name("worker0").unwrap(), &p).unwrap_err().to_string();
    assert!(err.contains("no UEFI firmware for aarch64 guests"), "{err}");
    assert!(err.contains("apt install qemu-efi-aarch64") && err.contains("dnf install edk2-aarch64"), "{err}");
    assert!(err.contains("Homebrew's qemu"), "{err}");
    // The x86 guests of the same lab still run.
    assert!(argv(&lab, lab.vm_by_name("gateway").unwrap(), &p).is_ok());
    p.guests.truncate(1);
    let err = argv(&lab, lab.vm_by_name("worker0").unwrap(), &p).unwrap_err().to_string();
    assert!(err.contains("qemu-system-aarch64 is not in PATH") && err.contains("apt install qemu-system-arm"), "{err}");
}

#[test]
fn accelerator_choice_per_host() {
    let no = || Err("Permission denied".to_string());
    assert_eq!(resolve_accel(Accelerator::Auto, Os::MacOs, no()), Ok((Accel::Hvf, None)));
    assert_eq!(resolve_accel(Accelerator::Auto, Os::Linux, Ok(())), Ok((Accel::Kvm, None)));
    let (a, warn) = resolve_accel(Accelerator::Auto, Os::Linux, no()).unwrap();
    assert_eq!(a, Accel::Tcg);
    assert!(warn.unwrap().contains("Permission denied"));
    assert_eq!(resolve_accel(Accelerator::Tcg, Os::MacOs, Ok(())), Ok((Accel::Tcg, None)));
    assert!(matches!(resolve_accel(Accelerator::Kvm, Os::Linux, no()), Err(ProfileError::NoKvm(_))));
    assert!(matches!(resolve_accel(Accelerator::Hvf, Os::Linux, Ok(())), Err(ProfileError::AccelUnavailable(..))));
    assert!(matches!(resolve_accel(Accelerator::Kvm, Os::MacOs, Ok(())), Err(ProfileError::AccelUnavailable(..))));
}

#[test]
fn firmware_lookup_order() {
    let linux = firmware_candidates(Os::Linux, Arch::X86_64, None);
    assert_eq!(linux[0].0, Path::new("/usr/share/OVMF/OVMF_CODE_4M.fd"));
    assert_eq!(linux[1].0, Path::new("/usr/share/OVMF/OVMF_CODE.fd"));
    assert!(linux.iter().any(|(c, _)| c == Path::new("/usr/share/qemu/edk2-x86_64-code.fd")));
    // The share folder beside the QEMU in PATH comes before the usual prefixes.
    let mac = firmware_candidates(Os::MacOs, Arch::Aarch64, Some(Path::new("/Users/a/qemu/share/qemu")));
    assert_eq!(mac[0].0, Path::new("/Users/a/qemu/share/qemu/edk2-aarch64-code.fd"));
    assert_eq!(mac[1].0, Path::new("/opt/homebrew/share/qemu/edk2-aarch64-code.fd"));
    assert_eq!(mac[1].1, Path::new("/opt/homebrew/share/qemu/edk2-arm-vars.fd"));

    // The first pair with both files wins; the code file alone is not enough.
    let have = ["/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"];
    let exists = |p: &Path| have.iter().any(|h| Path::new(h) == p);
    assert_eq!(
        pick_firmware(FirmwareChoice::Auto, Os::Linux, Arch::X86_64, &linux, exists),
        Ok(Firmware::Uefi {
            code: "/usr/share/OVMF/OVMF_CODE.fd".into(),
            vars_template: "/usr/share/OVMF/OVMF_VARS.fd".into()
        })
    );
    assert_eq!(pick_firmware(FirmwareChoice::Auto, Os::Linux, Arch::X86_64, &linux, |_| false), Ok(Firmware::Bios));
    let arm = firmware_candidates(Os::Linux, Arch::Aarch64, None);
    let err = pick_firmware(FirmwareChoice::Auto, Os::Linux, Arch::Aarch64, &arm, |_| false).unwrap_err().to_string();
    assert!(err.contains("qemu-efi-aarch64") && err.contains("/usr/share/AAVMF/AAVMF_CODE.fd"), "{err}");
    // Asked for by name: BIOS even with UEFI there; UEFI or an error, never BIOS behind the back.
    assert_eq!(pick_firmware(FirmwareChoice::Bios, Os::Linux, Arch::X86_64, &linux, exists), Ok(Firmware::Bios));
    let err = pick_firmware(FirmwareChoice::Uefi, Os::Linux, Arch::X86_64, &linux, |_| false).unwrap_err().to_string();
    assert!(err.contains("apt install ovmf") && err.contains("/usr/share/OVMF/OVMF_CODE_4M.fd"), "{err}");
    assert_eq!(
        pick_firmware(FirmwareChoice::Uefi, Os::Linux, Arch::X86_64, &linux, exists),
        pick_firmware(FirmwareChoice::Auto, Os::Linux, Arch::X86_64, &linux, exists)
    );
    let err = pick_firmware(FirmwareChoice::Bios, Os::MacOs, Arch::Aarch64, &arm, exists).unwrap_err().to_string();
    assert!(err.contains("firmware = \"bios\"") && err.contains("UEFI only"), "{err}");
}

#[test]
fn qemu_version_decides_how_root_is_dropped() {
    assert_eq!(parse_version("QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u16)\n"), Some((7, 2)));
    assert_eq!(parse_version("QEMU emulator version 10.0.2\n"), Some((10, 0)));
    assert_eq!(parse_version("nonsense"), None);
    assert_eq!(DropTo::for_version((7, 2), "bob"), DropTo::Runas("bob".into()));
    assert_eq!(DropTo::for_version((9, 1), "bob"), DropTo::RunWith("bob".into()));
}

#[test]
fn tap_names_fit_the_kernel_limit() {
    let mut lab = lab();
    lab.network.bridge = "averyveryverylongbridge".into();
    let vm = lab.vms[6].clone();
    let t = tap_name(&lab, &vm);
    assert_eq!(t, "averyveryvery-6");
    assert!(t.len() <= 15);
}

#[test]
fn commas_in_paths_are_doubled_inside_option_lists() {
    let mut lab = lab();
    lab.state_dir = "/Users/a/labs/k8s, the hard way".into();
    let p = linux_profile(Accel::Kvm, uefi("/opt/q,emu/OVMF_CODE.fd", "/opt/q,emu/OVMF_VARS.fd"));
    let a = argv(&lab, lab.vm_by_name("worker0").unwrap(), &p).unwrap();
    let a: Vec<String> = a.iter().map(|s| s.to_string_lossy().into_owned()).collect();
    let dir = "/Users/a/labs/k8s,, the hard way/worker0";
    for want in [
        "if=pflash,format=raw,unit=0,readonly=on,file=/opt/q,,emu/OVMF_CODE.fd".to_string(),
        format!("if=pflash,format=raw,unit=1,file={dir}/efi-vars.fd"),
        format!("if=virtio,format=qcow2,file={dir}/disk.img"),
        format!("if=virtio,format=raw,readonly=on,file={dir}/seed.iso"),
        format!("socket,id=serial0,server=on,wait=off,path={dir}/serial.sock,logfile={dir}/console.log,logappend=on"),
        format!("unix:{dir}/qmp.sock,server=on,wait=off"),
    ] {
        assert!(a.contains(&want), "{want} not in {a:?}");
    }
    // -pidfile takes a plain path, not an option list: no doubling there.
    assert!(a.contains(&"/Users/a/labs/k8s, the hard way/worker0/qemu.pid".to_string()), "{a:?}");
    assert_eq!(option_value("a,b,,c".as_ref()), "a,,b,,,,c");
}

#[test]
fn shell_quoting_survives_spaces_and_quotes() {
    let a: Vec<OsString> = vec!["qemu".into(), "a b".into(), "it's".into(), "".into()];
    assert_eq!(shell_line(&a), r"qemu 'a b' 'it'\''s' ''");
}
