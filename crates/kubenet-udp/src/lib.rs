//! The host's interfaces as kubenet's servers see them: [`addresses`] lists them, and UDP with
//! each datagram's receiving interface and destination address is what a server bound to
//! 0.0.0.0 needs to answer out of the interface a request came in on (DHCP: broadcast replies),
//! and from the address the client asked (DNS: a wildcard socket otherwise answers from whatever
//! source the routing table picks, and the client drops the reply; hickory#3401). I/O only.
//!
//! Linux and macOS: IP_PKTINFO on receive and send. XNU implements it as Linux does (receive:
//! `ipi_ifindex` and `ipi_addr`; send: `udp_check_pktinfo` turns `ipi_ifindex` into the bound
//! interface, the same path IP_BOUND_IF takes, and `ipi_spec_dst` into the source), so one code
//! path serves both and the macOS VM bridge (bridge100), which appears only while a VM runs, is
//! found per packet. Elsewhere: plain recvfrom/sendto, interface 0 and an unspecified destination,
//! so replies follow the routing table.

mod batch;

pub use batch::{BATCH, Envelope, Inbox, Outbox};

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, RawFd};

/// A server socket that would not bind, worded for the person who ran `kubenet serve`: which
/// port, and for a busy one who usually holds it and what to do (each server's own `advice`).
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("{proto} port {port} is already in use: {advice}")]
    InUse { port: u16, proto: &'static str, advice: String },
    #[error("binding {proto} port {port} needs root: run `sudo kubenet serve`")]
    Permission { port: u16, proto: &'static str },
    #[error("cannot open the {server} socket on {addr}: {source}")]
    Other { server: &'static str, addr: std::net::SocketAddr, source: io::Error },
}

/// Turns the errors of binding `server`'s `proto` socket on `addr` into [`BindError`]s; `advice`
/// says, for a busy port, who usually holds it and what to do.
pub fn bind_error(
    server: &'static str,
    proto: &'static str,
    addr: std::net::SocketAddr,
    advice: impl Fn(u16) -> String,
) -> impl Fn(io::Error) -> BindError {
    move |source| match source.kind() {
        io::ErrorKind::AddrInUse => BindError::InUse { port: addr.port(), proto, advice: advice(addr.port()) },
        io::ErrorKind::PermissionDenied => BindError::Permission { port: addr.port(), proto },
        _ => BindError::Other { server, addr, source },
    }
}

/// One address of one of the host's interfaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceAddress {
    pub interface: String,
    /// The interface's index (what IP_PKTINFO names a datagram's interface by); 0 if the
    /// interface went away while the list was read.
    pub index: u32,
    pub address: IpAddr,
    /// The prefix length, when the system gives the netmask.
    pub prefix: Option<u8>,
}

/// Every IPv4 and IPv6 address of the host's interfaces (empty if the list cannot be read).
pub fn addresses() -> Vec<InterfaceAddress> {
    let ip = |s: &nix::sys::socket::SockaddrStorage| {
        s.as_sockaddr_in().map(|v4| IpAddr::V4(v4.ip())).or_else(|| s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
    };
    let Ok(list) = nix::ifaddrs::getifaddrs() else { return Vec::new() };
    list.filter_map(|a| {
        let address = ip(a.address.as_ref()?)?;
        let prefix = a.netmask.as_ref().and_then(ip).map(|m| match m {
            IpAddr::V4(m) => u32::from(m).count_ones() as u8,
            IpAddr::V6(m) => u128::from(m).count_ones() as u8,
        });
        let index = nix::net::if_::if_nametoindex(a.interface_name.as_str()).unwrap_or(0);
        Some(InterfaceAddress { interface: a.interface_name, index, address, prefix })
    })
    .collect()
}

/// Asks the kernel for each datagram's interface and destination (IP_PKTINFO).
pub fn enable_pktinfo(socket: &impl AsFd) -> io::Result<()> {
    #[cfg(any(target_os = "linux", target_vendor = "apple"))]
    nix::sys::socket::setsockopt(socket, nix::sys::socket::sockopt::Ipv4PacketInfo, &true)?;
    #[cfg(not(any(target_os = "linux", target_vendor = "apple")))]
    let _ = socket;
    Ok(())
}

/// Sends one datagram out of interface `ifindex` (0: as routed) from address `from`
/// (unspecified: as routed).
#[cfg(any(target_os = "linux", target_vendor = "apple"))]
pub fn send(fd: RawFd, bytes: &[u8], to: SocketAddrV4, ifindex: u32, from: Ipv4Addr) -> io::Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, SockaddrIn, sendmsg};
    let info = libc::in_pktinfo {
        // c_int on Linux, c_uint on macOS.
        ipi_ifindex: ifindex as _,
        ipi_spec_dst: libc::in_addr { s_addr: u32::from(from).to_be() },
        ipi_addr: libc::in_addr { s_addr: 0 },
    };
    let cmsgs = [ControlMessage::Ipv4PacketInfo(&info)];
    let cm: &[ControlMessage] = if ifindex == 0 && from.is_unspecified() { &[] } else { &cmsgs };
    sendmsg(fd, &[io::IoSlice::new(bytes)], cm, MsgFlags::empty(), Some(&SockaddrIn::from(to)))?;
    Ok(())
}

#[cfg(not(any(target_os = "linux", target_vendor = "apple")))]
pub fn send(fd: RawFd, bytes: &[u8], to: SocketAddrV4, _ifindex: u32, _from: Ipv4Addr) -> io::Result<()> {
    use nix::sys::socket::{MsgFlags, SockaddrIn, sendto};
    sendto(fd, bytes, &SockaddrIn::from(to), MsgFlags::empty())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn the_interface_list_has_loopback_with_its_prefix() {
        let all = addresses();
        let lo = all.iter().find(|a| a.address == IpAddr::V4(Ipv4Addr::LOCALHOST)).expect("127.0.0.1 is listed");
        assert_eq!(lo.prefix, Some(8));
        assert!(!lo.interface.is_empty());
    }

    #[test]
    fn a_reply_leaves_from_the_address_and_by_the_interface_given() {
        let server = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        let std::net::SocketAddr::V4(to) = client.local_addr().unwrap() else { unreachable!() };
        let port = server.local_addr().unwrap().port();
        let lo = addresses().into_iter().find(|a| a.address == IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap().index;
        // From a wildcard socket: the source is the one given, not whatever the route picks.
        send(server.as_raw_fd(), b"pong", to, lo, Ipv4Addr::LOCALHOST).unwrap();
        let mut back = [0u8; 8];
        let (n, from) = client.recv_from(&mut back).unwrap();
        assert_eq!((&back[..n], from), (&b"pong"[..], (Ipv4Addr::LOCALHOST, port).into()));
        if cfg!(any(target_os = "linux", target_vendor = "apple")) {
            assert!(
                send(server.as_raw_fd(), b"lost", to, 999_999, Ipv4Addr::UNSPECIFIED).is_err(),
                "no such interface"
            );
        }
    }
}
