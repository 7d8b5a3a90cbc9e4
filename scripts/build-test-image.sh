#!/usr/bin/env bash
# Builds the small Debian cloud image kubenet's end-to-end test boots, and prints its path.
#
#   scripts/build-test-image.sh [amd64|arm64]      (default amd64)
#
# What it is: Debian 12 (bookworm) from debootstrap with the cloud kernel (linux-image-cloud-ARCH),
# systemd, cloud-init (NoCloud only), openssh-server, and the network stack a cloud image ships
# (systemd-networkd, systemd-resolved). Like Ubuntu's cloud images of the same architecture:
#   amd64 boots both ways:
#     UEFI  (OVMF; the path kubenet uses on macOS and by default on Linux): a standalone GRUB as
#           EFI/BOOT/BOOTX64.EFI on the EFI system partition;
#     BIOS  (SeaBIOS): GRUB's boot.img in the MBR, core.img in a BIOS boot partition.
#   arm64 boots by UEFI only (AAVMF/edk2, as on an Apple Silicon Mac): GRUB as
#         EFI/BOOT/BOOTAA64.EFI, made by this host's grub-mkstandalone from the arm64 modules of
#         the image's own grub-efi-arm64-bin.
# Every GRUB carries the same small config: find the root by its label, boot the kernel on the
# serial console (ttyS0 on x86, the PL011 ttyAMA0 on arm64).
# An arm64 image is bootstrapped in two stages: debootstrap --foreign unpacks it, then its own
# arm64 binaries configure it in a chroot through qemu-user-static. That needs the kernel's
# binfmt_misc entry for arm64 ELF files; when the host has none, the script adds Debian's
# (/usr/lib/binfmt.d/qemu-aarch64.conf) for the build and removes it again at the end.
# Nothing is mounted: the root file system is made from a folder with `mkfs.ext4 -d`, the ESP
# with mtools, and the pieces are written into a GPT disk at their partitions' offsets.
#
# The result is cached outside the repository, keyed by this script's hash, so a rerun with an
# unchanged script prints the cached path at once:
#   ${KUBENET_IMAGE_CACHE:-/var/cache/kubenet}/debian-12-kubenet-<arch>-<hash>.qcow2
# Needs root (debootstrap, chroot), Debian's mirror (KUBENET_DEBIAN_MIRROR, default
# http://deb.debian.org/debian) and the tools scripts/install-test-deps.sh installs (debootstrap,
# GRUB's EFI and BIOS images, mtools, dosfstools, gdisk, qemu-img, qemu-user-static).
set -euo pipefail

arch="${1:-amd64}"
case "$arch" in
    amd64 | arm64) ;;
    *) echo "build-test-image: unknown architecture \`$arch\`: use amd64 or arm64" >&2; exit 2 ;;
esac
script="$(readlink -f "$0")"
hash="$(sha256sum "$script" | cut -c1-12)"
cache="${KUBENET_IMAGE_CACHE:-/var/cache/kubenet}"
out="$cache/debian-12-kubenet-$arch-$hash.qcow2"
if [ -f "$out" ]; then
    echo "$out"
    exit 0
fi
[ "$(id -u)" -eq 0 ] || { echo "build-test-image: needs root (debootstrap and chroot)" >&2; exit 1; }

log() { echo "build-test-image: $*" >&2; }
start=$SECONDS

# The system tools live in sbin, which a user's PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"
tools=(debootstrap grub-mkstandalone mkfs.vfat mcopy sgdisk mkfs.ext4 qemu-img)
case "$arch" in
    amd64) tools+=(grub-mkimage) ;;
    arm64) tools+=(qemu-aarch64-static) ;;
esac
for t in "${tools[@]}"; do
    command -v "$t" >/dev/null || {
        log "$t is missing: run scripts/install-test-deps.sh"
        exit 1
    }
done
if [ "$arch" = amd64 ] && { [ ! -f /usr/lib/grub/i386-pc/boot.img ] || [ ! -d /usr/lib/grub/x86_64-efi ]; }; then
    log "GRUB's BIOS or EFI images are missing: run scripts/install-test-deps.sh"
    exit 1
fi

mkdir -p "$cache"
# One build per architecture at a time: the end-to-end tests ask for the images from parallel
# threads, and two arm64 builds at once would both mount and register binfmt_misc (the second
# fails) and the first to finish would unregister it under the other. A second caller waits here,
# then finds the first one's image in the cache.
exec 9>"$cache/build-$arch.lock"
flock 9
if [ -f "$out" ]; then
    echo "$out"
    exit 0
fi
work="$(mktemp -d "$cache/build-$arch-$hash.XXXXXX")"
binfmt=/proc/sys/fs/binfmt_misc
added_binfmt=""
root="$work/rootfs"
cleanup() {
    [ -z "$added_binfmt" ] || echo -1 >"$binfmt/qemu-aarch64" || true
    # debootstrap mounts proc and sys inside the root while it configures it, and unmounts them
    # only when it finishes: a build cut short (a failure, Ctrl-C) leaves them mounted.
    for m in "$root/proc" "$root/sys"; do
        ! mountpoint -q "$m" 2>/dev/null || umount -l "$m" || true
    done
    rm -rf --one-file-system "$work"
}
trap cleanup EXIT

# arm64 binaries run here through qemu-user-static, by the kernel's binfmt_misc.
if [ "$arch" = arm64 ] && [ "$(uname -m)" != aarch64 ] && [ ! -e "$binfmt/qemu-aarch64" ]; then
    [ -e "$binfmt/register" ] || mount -t binfmt_misc binfmt_misc "$binfmt"
    conf=/usr/lib/binfmt.d/qemu-aarch64.conf
    [ -f "$conf" ] || { log "$conf is missing: run scripts/install-test-deps.sh (qemu-user-static)"; exit 1; }
    log "registering qemu-aarch64 with binfmt_misc for this build"
    cat "$conf" >"$binfmt/register"
    added_binfmt=yes
fi

# The packages of a cloud image. debootstrap does not resolve virtual packages, so what provides
# one (python3-cffi-backend, for python3-cryptography) is named here. On arm64 the image's own
# grub-efi-arm64-bin provides the GRUB modules its bootloader is built from.
packages=(
    systemd systemd-sysv systemd-resolved udev dbus
    "linux-image-cloud-$arch" initramfs-tools
    cloud-init python3-cffi-backend openssh-server sudo
    iproute2 iputils-ping netbase ca-certificates locales
)
[ "$arch" != arm64 ] || packages+=(grub-efi-arm64-bin)
mirror="${KUBENET_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
log "debootstrap bookworm ($arch) from $mirror"
bootstrap_failed() {
    tail -30 "$work/debootstrap.log" >&2
    [ ! -f "$root/debootstrap/debootstrap.log" ] || tail -40 "$root/debootstrap/debootstrap.log" >&2
    exit 1
}
if [ "$arch" = amd64 ]; then
    debootstrap --variant=minbase --include="$(IFS=,; echo "${packages[*]}")" \
        bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 || bootstrap_failed
else
    debootstrap --arch=arm64 --foreign --variant=minbase --include="$(IFS=,; echo "${packages[*]}")" \
        bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 || bootstrap_failed
    log "second stage (arm64 binaries under qemu-user-static)"
    chroot "$root" /debootstrap/debootstrap --second-stage >>"$work/debootstrap.log" 2>&1 || bootstrap_failed
fi

label=kubenet-root
kernel="$(cd "$root/boot" && ls vmlinuz-* | sort -V | tail -1)"
initrd="initrd.img-${kernel#vmlinuz-}"
[ -f "$root/boot/$initrd" ] || { log "no $initrd in the image"; exit 1; }

cat >"$root/etc/fstab" <<EOF
LABEL=$label / ext4 rw,discard,errors=remount-ro 0 1
EOF
# A fresh identity on first boot: systemd makes the machine id, cloud-init the name and host keys.
: >"$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id" "$root"/etc/ssh/ssh_host_*
echo localhost >"$root/etc/hostname"
# Networking as a cloud image has it: networkd configured by cloud-init, resolved as the stub.
chroot "$root" systemctl enable systemd-networkd systemd-resolved ssh >/dev/null 2>&1
ln -sf ../run/systemd/resolve/stub-resolv.conf "$root/etc/resolv.conf"
# cloud-init sets LANG=en_US.UTF-8, which update-locale accepts only once it is generated
# (Debian's locale-gen builds what /etc/locale.gen lists and ignores its arguments).
sed -i 's/^# *\(en_US.UTF-8 UTF-8\)/\1/' "$root/etc/locale.gen"
chroot "$root" locale-gen >/dev/null
cat >"$root/etc/cloud/cloud.cfg.d/90-kubenet.cfg" <<'EOF'
# kubenet's test image: the seed ISO is the only data source; no waiting for cloud metadata.
datasource_list: [ NoCloud, None ]
EOF
# apt's lists are not needed to boot; they are most of the size after the kernel.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb

# no_timer_check (x86): the kernel checks at boot that the timer interrupt arrives within a few
# ticks, and panics ("IO-APIC + timer doesn't work!") when it does not. Under TCG on a loaded host
# (five guests on two cores in the end-to-end test) it sometimes does not, though the timer works.
case "$arch" in
    amd64) console="console=tty0 console=ttyS0,115200 no_timer_check" ;;
    arm64) console="console=ttyAMA0,115200" ;;
esac
cat >"$work/grub.cfg" <<EOF
search --no-floppy --label $label --set=root
set timeout=0
linux (\$root)/boot/$kernel root=LABEL=$label ro $console
initrd (\$root)/boot/$initrd
boot
EOF
mkdir -p "$root/boot/grub"
cp "$work/grub.cfg" "$root/boot/grub/grub.cfg"

# Partitions (512-byte sectors): 1 BIOS boot (core.img), 2 ESP, 3 root.
root_mib=1536
esp_mib=32
bios_start=2048
esp_start=$((bios_start + 2048))
root_start=$((esp_start + esp_mib * 2048))
disk_mib=$(((root_start / 2048) + root_mib + 1))

log "root file system ($root_mib MiB ext4, from the folder)"
mkfs.ext4 -q -L "$label" -d "$root" "$work/root.img" "${root_mib}M" >&2

case "$arch" in
    amd64) efi_format=x86_64-efi efi_name=BOOTX64.EFI grub_dir=/usr/lib/grub/x86_64-efi ;;
    arm64) efi_format=arm64-efi efi_name=BOOTAA64.EFI grub_dir="$root/usr/lib/grub/arm64-efi" ;;
esac
log "GRUB ($efi_name$([ "$arch" != amd64 ] || echo ", and for BIOS"))"
grub-mkstandalone -O "$efi_format" -d "$grub_dir" -o "$work/$efi_name" \
    --modules="part_gpt ext2 search search_label linux normal configfile" \
    "boot/grub/grub.cfg=$work/grub.cfg"
mkfs.vfat -n ESP -C "$work/esp.img" $((esp_mib * 1024)) >/dev/null
mmd -i "$work/esp.img" ::/EFI ::/EFI/BOOT
mcopy -i "$work/esp.img" "$work/$efi_name" "::/EFI/BOOT/$efi_name"
[ "$arch" != amd64 ] || grub-mkimage -O i386-pc -o "$work/core.img" -p /boot/grub -c "$work/grub.cfg" \
    biosdisk part_gpt ext2 search search_label linux normal configfile echo test

log "disk ($disk_mib MiB, GPT)"
disk="$work/disk.raw"
truncate -s "${disk_mib}M" "$disk"
# (sgdisk's -q would also skip writing the table: its output goes to the log instead.)
sgdisk \
    -n 1:$bios_start:$((esp_start - 1)) -t 1:EF02 -c 1:bios \
    -n 2:$esp_start:$((root_start - 1)) -t 2:EF00 -c 2:esp \
    -n 3:$root_start:0 -t 3:8300 -c 3:root \
    "$disk" >"$work/sgdisk.log" 2>&1 || { cat "$work/sgdisk.log" >&2; exit 1; }
sgdisk -v "$disk" | grep -q "No problems found" || { log "the partition table did not verify"; exit 1; }
dd if="$work/esp.img" of="$disk" bs=512 seek=$esp_start conv=notrunc,sparse status=none
dd if="$work/root.img" of="$disk" bs=512 seek=$root_start conv=notrunc,sparse status=none

if [ "$arch" = amd64 ]; then
# BIOS: what grub-bios-setup does to a device, done to the file. The MBR gets boot.img's code
# (the protective MBR's partition table after byte 440 stays), pointed at core.img's first
# sector; core.img's first sector (diskboot) gets the block list of the rest of core.img.
core_sectors=$(( ($(stat -c %s "$work/core.img") + 511) / 512 ))
[ "$core_sectors" -le 2048 ] || { log "core.img does not fit the BIOS boot partition"; exit 1; }
dd if=/usr/lib/grub/i386-pc/boot.img of="$disk" bs=440 count=1 conv=notrunc status=none
python3 - "$disk" "$work/core.img" "$bios_start" "$core_sectors" <<'PYEOF'
import struct, sys
disk, core, start, sectors = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
img = bytearray(open(core, "rb").read())
img += bytes(sectors * 512 - len(img))
# diskboot's block list, the last 12 bytes of its sector: start LBA, sector count, load segment.
struct.pack_into("<QHH", img, 512 - 12, start + 1, sectors - 1, 0x820)
with open(disk, "r+b") as f:
    f.seek(0x5C)                       # boot.img: LBA of core.img
    f.write(struct.pack("<Q", start))
    f.seek(0x66)                       # boot.img: trust the BIOS's boot drive (a hard disk)
    f.write(b"\x90\x90")
    f.seek(start * 512)
    f.write(img)
PYEOF
fi

log "qcow2"
qemu-img convert -q -O qcow2 "$disk" "$work/image.qcow2"
mv "$work/image.qcow2" "$out"
# Older builds of this architecture (of other versions of this script) are of no more use.
# (Builds from before the architecture was in the name have a 12-digit hash right after "kubenet-".)
find "$cache" -maxdepth 1 \( -name "debian-12-kubenet-$arch-*.qcow2" -o -name 'debian-12-kubenet-????????????.qcow2' \) \
    ! -name "$(basename "$out")" -delete
log "built $out in $((SECONDS - start)) s ($kernel)"
echo "$out"
