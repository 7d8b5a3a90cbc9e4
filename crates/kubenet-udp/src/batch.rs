//! Many datagrams per system call, for a server whose socket holds a queue when it wakes: a
//! saturated DNS server found about 16 queries per wake-up and paid one recvmsg and one sendmsg
//! for each (perf stat, README "Where the time goes"). [`Inbox::recv`] takes up to [`BATCH`]
//! with one recvmmsg and [`Outbox::send`] sends them with one sendmmsg, each reply with its own
//! source address (IP_PKTINFO), as [`crate::send`] does for one. Both address families.
//!
//! The DHCP server uses the same two types with each datagram's interface (IP_PKTINFO's
//! `ipi_ifindex`, in and out), so a reply leaves by the interface its request came in on.
//!
//! recvmmsg and sendmmsg are Linux's; elsewhere (macOS) the same two types loop over recvmsg
//! and sendmsg, so the server has one code path and only the number of system calls differs.
//! The buffers are allocated once; their untouched pages cost no memory.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::RawFd;

/// At most this many datagrams per call.
pub const BATCH: usize = 32;

/// One received datagram's envelope; its bytes are [`Inbox::bytes`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Envelope {
    pub len: usize,
    /// Larger than the buffer: the tail was cut off.
    pub truncated: bool,
    pub src: SocketAddr,
    /// The address it was sent to (IPv4 with IP_PKTINFO); unspecified when unknown.
    pub dst: Ipv4Addr,
    /// The interface it came in on (IPv4 with IP_PKTINFO); 0 when unknown.
    pub ifindex: u32,
}

/// Buffers for up to [`BATCH`] datagrams of at most `size` bytes each.
pub struct Inbox {
    data: Vec<u8>,
    size: usize,
    got: Vec<Envelope>,
}

impl Inbox {
    pub fn new(size: usize) -> Inbox {
        Inbox { data: vec![0; size * BATCH], size, got: Vec::with_capacity(BATCH) }
    }

    /// Takes what the socket holds, up to [`BATCH`] datagrams, without waiting: `WouldBlock`
    /// when there is none. Returns how many.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        self.got.clear();
        sys::recv(fd, &mut self.data, self.size, &mut self.got)?;
        Ok(self.got.len())
    }

    /// The `i`th datagram of the last [`Inbox::recv`].
    pub fn get(&self, i: usize) -> (Envelope, &[u8]) {
        let e = self.got[i];
        (e, &self.data[i * self.size..i * self.size + e.len])
    }
}

/// One reply waiting in an [`Outbox`].
#[derive(Clone, Copy, Debug)]
struct Letter {
    start: usize,
    len: usize,
    to: SocketAddr,
    from: Ipv4Addr,
    ifindex: u32,
}

/// Replies waiting to go out, in order.
#[derive(Default)]
pub struct Outbox {
    data: Vec<u8>,
    letters: Vec<Letter>,
    /// Letters before this one are gone.
    next: usize,
}

impl Outbox {
    /// Queues `bytes` for `to`, sent from `from` when `to` is IPv4 and `from` is specified
    /// (otherwise as routed).
    pub fn push(&mut self, bytes: &[u8], to: SocketAddr, from: Ipv4Addr) {
        self.push_via(bytes, to, 0, from);
    }

    /// As [`Outbox::push`], and out of interface `ifindex` when `to` is IPv4 and `ifindex` is
    /// not 0 (a broadcast reply must leave by the interface its request came in on).
    pub fn push_via(&mut self, bytes: &[u8], to: SocketAddr, ifindex: u32, from: Ipv4Addr) {
        self.letters.push(Letter { start: self.data.len(), len: bytes.len(), to, from, ifindex });
        self.data.extend_from_slice(bytes);
    }

    pub fn is_empty(&self) -> bool {
        self.next == self.letters.len()
    }

    /// How many letters wait.
    pub fn len(&self) -> usize {
        self.letters.len() - self.next
    }

    /// Where the next letter goes (`None` when empty).
    pub fn next_to(&self) -> Option<SocketAddr> {
        self.letters.get(self.next).map(|l| l.to)
    }

    /// Sends what it can without waiting; `Ok` once empty. `WouldBlock`: the socket is full,
    /// try again when writable. Another error is the next letter's: [`Outbox::skip`] drops it.
    pub fn send(&mut self, fd: RawFd) -> io::Result<()> {
        while !self.is_empty() {
            let end = self.letters.len().min(self.next + BATCH);
            let sent = sys::send(fd, &self.data, &self.letters[self.next..end])?;
            self.next += sent;
        }
        self.clear();
        Ok(())
    }

    /// Drops the next letter (one the socket refused).
    pub fn skip(&mut self) {
        self.next = (self.next + 1).min(self.letters.len());
        if self.is_empty() {
            self.clear();
        }
    }

    /// Drops every letter waiting.
    pub fn clear(&mut self) {
        self.data.clear();
        self.letters.clear();
        self.next = 0;
    }
}

#[cfg(target_os = "linux")]
mod sys {
    use super::{BATCH, Envelope, Letter};
    use std::io;
    use std::mem::{size_of, zeroed};
    use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
    use std::os::fd::RawFd;

    /// Room for one IP_PKTINFO control message (CMSG_SPACE(12) is 32 on 64-bit Linux), aligned
    /// as a cmsghdr.
    type Control = [u64; 8];

    /// Fills `got` with what one recvmmsg returns into `data`, `size` bytes a datagram.
    pub fn recv(fd: RawFd, data: &mut [u8], size: usize, got: &mut Vec<Envelope>) -> io::Result<()> {
        // SAFETY: all-zero is a valid value of these plain C structs.
        let mut names: [libc::sockaddr_storage; BATCH] = unsafe { zeroed() };
        let mut controls = [[0u64; 8]; BATCH];
        // SAFETY: as above: plain C structs, whose null pointers are filled in below.
        let mut iovs: [libc::iovec; BATCH] = unsafe { zeroed() };
        // SAFETY: as above.
        let mut headers: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        let slots = data.chunks_exact_mut(size).zip(names.iter_mut()).zip(controls.iter_mut());
        for (((buf, name), control), (iov, h)) in slots.zip(iovs.iter_mut().zip(headers.iter_mut())) {
            *iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
            h.msg_hdr.msg_name = (name as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_iov = iov;
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = control.as_mut_ptr().cast();
            h.msg_hdr.msg_controllen = size_of::<Control>();
        }
        // SAFETY: every header points at a buffer, an address and a control area that live in
        // this frame or in `data` until the call returns, with their true lengths.
        let n = unsafe {
            libc::recvmmsg(fd, headers.as_mut_ptr(), BATCH as libc::c_uint, libc::MSG_DONTWAIT, std::ptr::null_mut())
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        for (h, name) in headers.iter().zip(&names).take(n as usize) {
            let Some(src) = address(name) else { continue };
            // SAFETY: the kernel filled this header's control area and set its length.
            let (dst, ifindex) = unsafe { destination(&h.msg_hdr) };
            got.push(Envelope {
                len: h.msg_len as usize,
                truncated: h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
                src,
                dst,
                ifindex,
            });
        }
        Ok(())
    }

    /// Sends `letters` (their bytes in `data`) with one sendmmsg; how many went.
    pub fn send(fd: RawFd, data: &[u8], letters: &[Letter]) -> io::Result<usize> {
        // SAFETY: all-zero is a valid value of these plain C structs.
        let mut names: [libc::sockaddr_storage; BATCH] = unsafe { zeroed() };
        let mut controls = [[0u64; 8]; BATCH];
        // SAFETY: as above: plain C structs, whose null pointers are filled in below.
        let mut iovs: [libc::iovec; BATCH] = unsafe { zeroed() };
        // SAFETY: as above.
        let mut headers: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        let count = letters.len().min(BATCH);
        for (i, l) in letters.iter().take(count).enumerate() {
            let bytes = &data[l.start..l.start + l.len];
            iovs[i] = libc::iovec { iov_base: bytes.as_ptr().cast_mut().cast(), iov_len: bytes.len() };
            let h = &mut headers[i].msg_hdr;
            h.msg_namelen = put_address(&mut names[i], l.to);
            h.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_iov = &mut iovs[i];
            h.msg_iovlen = 1;
            if let SocketAddr::V4(_) = l.to
                && (!l.from.is_unspecified() || l.ifindex != 0)
            {
                h.msg_control = controls[i].as_mut_ptr().cast();
                h.msg_controllen = size_of::<Control>();
                // SAFETY: the control area is as long as the header says, and aligned.
                unsafe { put_source(h, l.from, l.ifindex) };
            }
        }
        // SAFETY: as in `recv`; the kernel only reads the buffers.
        let n = unsafe { libc::sendmmsg(fd, headers.as_mut_ptr(), count as libc::c_uint, libc::MSG_DONTWAIT) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn address(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
        match s.ss_family as libc::c_int {
            libc::AF_INET => {
                // SAFETY: the family says this storage holds a sockaddr_in.
                let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
                let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
                Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(a.sin_port))))
            }
            libc::AF_INET6 => {
                // SAFETY: the family says this storage holds a sockaddr_in6.
                let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
                let ip = a.sin6_addr.s6_addr.into();
                Some(SocketAddr::V6(SocketAddrV6::new(ip, u16::from_be(a.sin6_port), a.sin6_flowinfo, a.sin6_scope_id)))
            }
            _ => None,
        }
    }

    fn put_address(s: &mut libc::sockaddr_storage, to: SocketAddr) -> libc::socklen_t {
        let storage = (s as *mut libc::sockaddr_storage).cast::<u8>();
        match to {
            SocketAddr::V4(to) => {
                let a = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: to.port().to_be(),
                    sin_addr: libc::in_addr { s_addr: u32::from(*to.ip()).to_be() },
                    sin_zero: [0; 8],
                };
                // SAFETY: a sockaddr_storage has room for any sockaddr.
                unsafe { storage.cast::<libc::sockaddr_in>().write_unaligned(a) };
                size_of::<libc::sockaddr_in>() as libc::socklen_t
            }
            SocketAddr::V6(to) => {
                // SAFETY: all-zero is a valid sockaddr_in6.
                let mut a: libc::sockaddr_in6 = unsafe { zeroed() };
                a.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                a.sin6_port = to.port().to_be();
                a.sin6_addr.s6_addr = to.ip().octets();
                a.sin6_flowinfo = to.flowinfo();
                a.sin6_scope_id = to.scope_id();
                // SAFETY: as above.
                unsafe { storage.cast::<libc::sockaddr_in6>().write_unaligned(a) };
                size_of::<libc::sockaddr_in6>() as libc::socklen_t
            }
        }
    }

    /// The IP_PKTINFO destination and interface in a received header; unspecified and 0 when
    /// absent.
    ///
    /// SAFETY: `h`'s control pointer and length describe a filled control area.
    unsafe fn destination(h: &libc::msghdr) -> (Ipv4Addr, u32) {
        // SAFETY: the caller vouches for the control area; CMSG_FIRSTHDR stays inside it.
        let mut c = unsafe { libc::CMSG_FIRSTHDR(h) };
        while !c.is_null() {
            // SAFETY: a non-null header CMSG_FIRSTHDR/NXTHDR returned lies inside the area.
            let m = unsafe { &*c };
            if m.cmsg_level == libc::IPPROTO_IP && m.cmsg_type == libc::IP_PKTINFO {
                // SAFETY: an IP_PKTINFO header carries an in_pktinfo, read unaligned.
                let info = unsafe { libc::CMSG_DATA(c).cast::<libc::in_pktinfo>().read_unaligned() };
                return (Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr)), info.ipi_ifindex as u32);
            }
            // SAFETY: `c` is a header of this area; CMSG_NXTHDR returns the next or null.
            c = unsafe { libc::CMSG_NXTHDR(h, c) };
        }
        (Ipv4Addr::UNSPECIFIED, 0)
    }

    /// Writes an IP_PKTINFO that sends from `from` (unspecified: as routed) out of interface
    /// `ifindex` (0: as routed), and sets the control length to it.
    ///
    /// SAFETY: `h`'s control pointer and length describe a zeroed, aligned area of at least
    /// CMSG_SPACE(sizeof(in_pktinfo)) bytes.
    unsafe fn put_source(h: &mut libc::msghdr, from: Ipv4Addr, ifindex: u32) {
        let info = libc::in_pktinfo {
            ipi_ifindex: ifindex as libc::c_int,
            ipi_spec_dst: libc::in_addr { s_addr: u32::from(from).to_be() },
            ipi_addr: libc::in_addr { s_addr: 0 },
        };
        let len = size_of::<libc::in_pktinfo>() as libc::c_uint;
        // SAFETY: the caller vouches for a zeroed, aligned area with room for one in_pktinfo.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(h);
            (*c).cmsg_level = libc::IPPROTO_IP;
            (*c).cmsg_type = libc::IP_PKTINFO;
            (*c).cmsg_len = libc::CMSG_LEN(len) as _;
            libc::CMSG_DATA(c).cast::<libc::in_pktinfo>().write_unaligned(info);
            h.msg_controllen = libc::CMSG_SPACE(len) as _;
        }
    }
}

/// One recvmsg and one sendmsg per datagram, through nix (macOS and the rest).
#[cfg(not(target_os = "linux"))]
mod sys {
    use super::{BATCH, Envelope, Letter};
    use nix::sys::socket::{MsgFlags, SockaddrStorage};
    use std::io;
    use std::net::{Ipv4Addr, SocketAddr};
    use std::os::fd::RawFd;

    pub fn recv(fd: RawFd, data: &mut [u8], size: usize, got: &mut Vec<Envelope>) -> io::Result<()> {
        for buf in data.chunks_exact_mut(size).take(BATCH) {
            let mut iov = [io::IoSliceMut::new(buf)];
            let mut cmsg = nix::cmsg_space!(libc::in_pktinfo);
            let m = match nix::sys::socket::recvmsg::<SockaddrStorage>(
                fd,
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(m) => m,
                Err(nix::errno::Errno::EAGAIN) if !got.is_empty() => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            let (mut dst, mut ifindex) = (Ipv4Addr::UNSPECIFIED, 0);
            #[cfg(target_vendor = "apple")]
            for c in m.cmsgs()? {
                if let nix::sys::socket::ControlMessageOwned::Ipv4PacketInfo(info) = c {
                    dst = Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr));
                    ifindex = info.ipi_ifindex;
                }
            }
            let src = m.address.as_ref().and_then(|a| {
                a.as_sockaddr_in()
                    .map(|v4| SocketAddr::new(v4.ip().into(), v4.port()))
                    .or_else(|| a.as_sockaddr_in6().map(|v6| SocketAddr::new(v6.ip().into(), v6.port())))
            });
            let Some(src) = src else { continue };
            got.push(Envelope { len: m.bytes, truncated: m.flags.contains(MsgFlags::MSG_TRUNC), src, dst, ifindex });
        }
        Ok(())
    }

    pub fn send(fd: RawFd, data: &[u8], letters: &[Letter]) -> io::Result<usize> {
        let Some(l) = letters.first() else { return Ok(0) };
        let bytes = &data[l.start..l.start + l.len];
        match l.to {
            SocketAddr::V4(to) => crate::send(fd, bytes, to, l.ifindex, l.from)?,
            SocketAddr::V6(_) => {
                let to = SockaddrStorage::from(l.to);
                nix::sys::socket::sendmsg(fd, &[io::IoSlice::new(bytes)], &[], MsgFlags::MSG_DONTWAIT, Some(&to))?;
            }
        }
        Ok(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn pair(ip: &str) -> (std::net::UdpSocket, std::net::UdpSocket) {
        let server = std::net::UdpSocket::bind((ip, 0)).unwrap();
        if server.local_addr().unwrap().is_ipv4() {
            crate::enable_pktinfo(&server).unwrap();
        }
        let client = std::net::UdpSocket::bind((ip, 0)).unwrap();
        client.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        (server, client)
    }

    #[test]
    fn an_empty_socket_would_block() {
        let (server, _) = pair("127.0.0.1");
        let mut inbox = Inbox::new(512);
        assert_eq!(inbox.recv(server.as_raw_fd()).unwrap_err().kind(), io::ErrorKind::WouldBlock);
    }

    /// 40 datagrams (more than one batch) in, each answered with its own bytes reversed,
    /// from the address it was sent to.
    fn round_trip(ip: &str) {
        let (server, client) = pair(ip);
        let to = server.local_addr().unwrap();
        let sent: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 1 + usize::from(i)]).collect();
        for d in &sent {
            client.send_to(d, to).unwrap();
        }
        client.send_to(&[9; 100], to).unwrap();
        let (mut inbox, mut outbox) = (Inbox::new(64), Outbox::default());
        let mut seen = Vec::new();
        while seen.len() < sent.len() + 1 {
            let n = inbox.recv(server.as_raw_fd()).unwrap();
            assert!((1..=BATCH).contains(&n), "{n}");
            for i in 0..n {
                let (e, bytes) = inbox.get(i);
                assert_eq!(e.src, client.local_addr().unwrap());
                if to.is_ipv4() {
                    assert_eq!(e.dst.to_string(), ip, "IP_PKTINFO gives the address asked");
                    assert_eq!(e.ifindex, loopback_index(), "and the interface");
                }
                let mut reply = bytes.to_vec();
                reply.reverse();
                outbox.push(&reply, e.src, e.dst);
                seen.push((e.len, e.truncated));
            }
        }
        assert_eq!(seen[40], (64, true), "100 bytes into 64: cut, and said so");
        assert!(seen[..40].iter().enumerate().all(|(i, &(len, cut))| len == i + 1 && !cut), "{seen:?}");
        assert_eq!(outbox.next_to(), Some(client.local_addr().unwrap()));
        outbox.send(server.as_raw_fd()).unwrap();
        assert!(outbox.is_empty());
        let mut buf = [0u8; 128];
        for d in &sent {
            let (n, from) = client.recv_from(&mut buf).unwrap();
            assert_eq!((&buf[..n], from), (&d[..], to), "in order, from the server's address");
        }
    }

    #[test]
    fn a_batch_goes_in_and_out_in_order_over_ipv4() {
        round_trip("127.0.0.1");
    }

    #[test]
    fn a_batch_goes_in_and_out_in_order_over_ipv6() {
        if std::net::UdpSocket::bind("[::1]:0").is_err() {
            eprintln!("skipped: this host has no ::1");
            return;
        }
        round_trip("::1");
    }

    /// The index of the interface that holds 127.0.0.1.
    fn loopback_index() -> u32 {
        crate::addresses().into_iter().find(|a| a.address == Ipv4Addr::LOCALHOST).expect("a loopback").index
    }

    #[test]
    fn a_letter_leaves_by_the_interface_it_names() {
        let (server, client) = pair("127.0.0.1");
        let to = client.local_addr().unwrap();
        let mut outbox = Outbox::default();
        outbox.push_via(b"via lo", to, loopback_index(), Ipv4Addr::UNSPECIFIED);
        outbox.send(server.as_raw_fd()).unwrap();
        let mut buf = [0u8; 8];
        let n = client.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"via lo");
        // An interface that does not exist: the kernel refuses the letter, so the index was
        // passed on and not dropped.
        outbox.push_via(b"nowhere", to, 999_999, Ipv4Addr::UNSPECIFIED);
        assert_ne!(outbox.send(server.as_raw_fd()).unwrap_err().kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn a_refused_letter_is_skipped_and_the_rest_still_go() {
        let (server, client) = pair("127.0.0.1");
        let mut outbox = Outbox::default();
        // An IPv6 destination on an IPv4 socket: the kernel refuses this one letter.
        outbox.push(b"lost", "[::1]:9".parse().unwrap(), Ipv4Addr::UNSPECIFIED);
        outbox.push(b"kept", client.local_addr().unwrap(), Ipv4Addr::LOCALHOST);
        assert_eq!(outbox.len(), 2);
        let err = outbox.send(server.as_raw_fd()).unwrap_err();
        assert_ne!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
        outbox.skip();
        outbox.send(server.as_raw_fd()).unwrap();
        let mut buf = [0u8; 8];
        let n = client.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"kept");
    }
}
