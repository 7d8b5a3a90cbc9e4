//! A VM's tap device on Linux, opened by the agent and handed to QEMU as a descriptor
//! (`-netdev tap,fd=3`, [`crate::qemu::TAP_FD`]), the way libvirt hands them: QEMU, running as the lab's owner, then
//! needs neither /dev/net/tun (root-only on some hosts) nor any right over the host's links.
//! I/O, Linux only.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

/// Attaches to the tap `name` (made on the lab's bridge by `serve`; under `--no-bridge` the
/// tun driver makes it for as long as QEMU holds it) with `flags` beyond IFF_TAP|IFF_NO_PI.
pub fn open(name: &str, flags: libc::c_int) -> io::Result<OwnedFd> {
    let tun = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun")?;
    // SAFETY: ifreq is plain old data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.is_empty() || name.len() >= req.ifr_name.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("`{name}` is not 1 to 15 bytes")));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | flags) as libc::c_short;
    // SAFETY: a valid descriptor and a fully initialised ifreq, as the tun driver expects.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(tun.into())
}

/// The tap for QEMU: with virtio-net headers, as QEMU asks for when it opens one itself.
pub fn for_qemu(name: &str) -> io::Result<OwnedFd> {
    open(name, libc::IFF_VNET_HDR)
}
