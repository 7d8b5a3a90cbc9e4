use std::path::Path;

use super::*;

fn lab() -> Lab {
    kubenet_cluster::parse(kubenet_cluster::REFERENCE_CONFIG, kubenet_cluster::Source::Embedded, Path::new("/lab"))
        .unwrap()
}

fn mac_profile() -> HostProfile {
    HostProfile {
        os: Os::MacOs,
        arch: Arch::Aarch64,
        accel: Accel::Hvf,
        firmware: Firmware::Uefi {
            code: "/opt/homebrew/share/qemu/edk2-aarch64-code.fd".into(),
            vars_template: "/opt/homebrew/share/qemu/edk2-arm-vars.fd".into(),
        },
        qemu: "qemu-system-aarch64".into(),
        drop_to: Some(DropTo::RunWith("alice".into())),
    }
}

fn linux_profile(accel: Accel, firmware: Firmware) -> HostProfile {
    HostProfile { os: Os::Linux, arch: Arch::X86_64, accel, firmware, qemu: "qemu-system-x86_64".into(), drop_to: None }
}

fn line(lab: &Lab, name: &str, p: &HostProfile) -> String {
    shell_line(&argv(lab, lab.vm_by_name(name).unwrap(), p))
}

#[test]
fn macos_worker_golden() {
    assert_eq!(
        line(&lab(), "worker0", &mac_profile()),
        "qemu-system-aarch64 -name worker0 -machine virt,accel=hvf,highmem=on -cpu host -smp 4 -m 8192M \
         -nodefaults -display none \
         -drive if=pflash,format=raw,unit=0,readonly=on,file=/opt/homebrew/share/qemu/edk2-aarch64-code.fd \
         -drive if=pflash,format=raw,unit=1,file=/lab/worker0/efi-vars.fd \
         -drive if=virtio,format=qcow2,file=/lab/worker0/disk.img \
         -drive if=virtio,format=raw,readonly=on,file=/lab/worker0/seed.iso \
         -nic vmnet-shared,start-address=192.168.1.1,end-address=192.168.1.20,subnet-mask=255.255.255.0,mac=52:52:52:00:00:04,model=virtio-net-pci \
         -device virtio-rng-pci \
         -chardev socket,id=serial0,server=on,wait=off,path=/lab/worker0/serial.sock,logfile=/lab/worker0/console.log,logappend=on \
         -serial chardev:serial0 -qmp unix:/lab/worker0/qmp.sock,server=on,wait=off -run-with user=alice \
         -pidfile /lab/worker0/qemu.pid -daemonize"
    );
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
         -netdev tap,id=net0,ifname=kubenet0-0,script=no,downscript=no \
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
        assert!(l.contains(&format!("ifname=kubenet0-{},", vm.id)), "{l}");
        assert!(l.contains(&format!("mac=52:52:52:00:00:{:02x} ", vm.id)), "{l}");
        // TCG has no host CPU to pass through; BIOS needs no pflash.
        assert!(l.contains("-machine q35,accel=tcg -cpu max "), "{l}");
        assert!(!l.contains("pflash"), "{l}");
    }
}

#[test]
fn linux_aarch64_uses_virt_without_highmem_flag() {
    let mut p = linux_profile(
        Accel::Kvm,
        Firmware::Uefi { code: "/usr/share/AAVMF/AAVMF_CODE.fd".into(), vars_template: "/x".into() },
    );
    p.arch = Arch::Aarch64;
    p.qemu = Arch::Aarch64.qemu_binary().into();
    let l = line(&lab(), "control1", &p);
    assert!(l.starts_with("qemu-system-aarch64 -name control1 -machine virt,accel=kvm -cpu host "), "{l}");
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
fn shell_quoting_survives_spaces_and_quotes() {
    let a: Vec<OsString> = vec!["qemu".into(), "a b".into(), "it's".into(), "".into()];
    assert_eq!(shell_line(&a), r"qemu 'a b' 'it'\''s' ''");
}
