#!/usr/bin/env bash
# Installs the Debian packages kubenet's tests and benchmarks use. Idempotent: packages already
# present are skipped, so a rerun takes a second. Needs root (or sudo) and Debian's package lists.
#
#   dnsmasq-base     the server kubenet replaces; benchmarks compare against it (the binary only:
#                    the `dnsmasq` package would start a system daemon on port 53)
#   isc-dhcp-client  dhclient, a real DHCP client for the namespace tests
#   udhcpc           busybox's DHCP client, what small images carry
#   bind9-dnsutils   dig, for the DNS tests
#   iproute2         ip netns / veth / bridges for the namespace tests, tc for `kubenet net`
#   iputils-ping     ping, to see `kubenet net` partitions and delays between namespaces
#   kea-admin        perfdhcp, the DHCP load generator used by bench/run.sh
#   dnsperf          the DNS load generator used by bench/run.sh
#   qemu-system-x86  QEMU for the VM process tests (TCG here), with qemu-utils (qemu-img) pinned
#                    to the same release, see below
#   ovmf             UEFI firmware, the boot path kubenet uses on macOS and by default on Linux
#   qemu-system-arm, qemu-efi-aarch64
#                    qemu-system-aarch64 and AAVMF (edk2 for arm64): the end-to-end lab's arm64
#                    guest, booted the way an Apple Silicon Mac boots it, under TCG here
#   qemu-user-static scripts/build-test-image.sh arm64: the arm64 image's own programs configure it
#   file             the macOS build check: the linked binary is a Mach-O executable
#   genisoimage      isoinfo, a second reader for the cloud-init seed images kubenet writes
#   cloud-init       `cloud-init schema`, to validate the user-data kubenet renders
#   openssh-server   sshd, to check kubenet's host-key fetch against the real thing
#   openssh-client   ssh, ssh-keygen
#   tmux             the `kubenet tmux` layout test
#   nftables         nft, for `serve`'s NAT rule, tested inside a namespace of the test's own
#   systemd          systemd-analyze verify, for the unit `kubenet service install` writes
#   man-db           man -l, to render the man pages `kubenet man` writes
#   ruby             ruby -c, the Homebrew formula's syntax check
#   debootstrap, grub-efi-amd64-bin, grub-pc-bin, dosfstools, mtools, gdisk
#                    scripts/build-test-image.sh: the end-to-end test's Debian image, its UEFI and
#                    BIOS GRUB, its ESP and its GPT
set -euo pipefail

packages=(dnsmasq-base isc-dhcp-client udhcpc bind9-dnsutils iproute2 iputils-ping kea-admin dnsperf
    qemu-system-x86 ovmf qemu-system-arm qemu-efi-aarch64 qemu-user-static file genisoimage cloud-init openssh-server openssh-client tmux nftables systemd man-db ruby
    debootstrap grub-efi-amd64-bin grub-pc-bin dosfstools mtools gdisk)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "install-test-deps: all present (${packages[*]})"
    exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "install-test-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# QEMU's parts must come from one Debian release: a qemu-utils from elsewhere (a newer
# backport) would block qemu-system-x86, so pin qemu-utils to qemu-system-x86's version.
extra=()
if printf '%s\n' "${missing[@]}" | grep -qx 'qemu-system-x86\|qemu-system-arm\|qemu-user-static'; then
    ver=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
    extra=(--allow-downgrades "qemu-utils=$ver")
fi
$SUDO apt-get install -y -qq --no-install-recommends "${extra[@]}" "${missing[@]}" >/dev/null
echo "install-test-deps: done"
