//! Bytes to DHCP messages and back. Pure.
//!
//! dhcproto 0.15 decodes without checking the op code or the magic cookie, and panics in
//! `Message::chaddr()` (and so in `Display`) when hlen > 16. Every datagram therefore passes
//! [`decode_request`] first, which checks the fixed header by hand before dhcproto sees it.

use dhcproto::v4::{HType, Message, MessageType};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};

/// The fixed BOOTP header (236 bytes) plus the magic cookie.
pub const MIN_LEN: usize = 240;
/// Larger datagrams are refused: RFC 2131 clients send at most their option 57, and no Ethernet
/// client needs more than 1500.
pub const MAX_LEN: usize = 1500;
/// RFC 2131 section 3: replies are padded to the BOOTP minimum of 300 bytes, which some relays and
/// old clients need.
pub const MIN_REPLY_LEN: usize = 300;
/// RFC 2131 section 2: every client must accept 576-byte messages, whatever its option 57 says.
pub const MIN_MAX_MESSAGE: usize = 576;
const MAGIC_COOKIE: [u8; 4] = [99, 130, 83, 99];

/// Why a datagram was dropped. Each kind has its own counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Malformed {
    #[error("shorter than the {MIN_LEN}-byte header")]
    Truncated,
    #[error("longer than {MAX_LEN} bytes")]
    Oversized,
    #[error("not a BOOTREQUEST")]
    NotRequest,
    #[error("not Ethernet (htype 1, hlen 6)")]
    NotEthernet,
    #[error("bad magic cookie")]
    BadCookie,
    #[error("options do not decode")]
    BadOptions,
    #[error("no DHCP message type (option 53)")]
    NoMessageType,
}

/// A request that passed every check: safe to hand to the engine and to log.
#[derive(Clone, Debug)]
pub struct Request {
    pub msg: Message,
    pub kind: MessageType,
    pub mac: kubenet_cluster::Mac,
}

pub fn decode_request(buf: &[u8]) -> Result<Request, Malformed> {
    if buf.len() < MIN_LEN {
        return Err(Malformed::Truncated);
    }
    if buf.len() > MAX_LEN {
        return Err(Malformed::Oversized);
    }
    if buf[0] != 1 {
        return Err(Malformed::NotRequest);
    }
    // The lab serves Ethernet only; this also keeps hlen <= 16 for dhcproto.
    if buf[1] != 1 || buf[2] != 6 {
        return Err(Malformed::NotEthernet);
    }
    if buf[236..240] != MAGIC_COOKIE {
        return Err(Malformed::BadCookie);
    }
    check_options(&buf[MIN_LEN..])?;
    let msg = Message::decode(&mut Decoder::new(buf)).map_err(|_| Malformed::BadOptions)?;
    if msg.htype() != HType::Eth {
        return Err(Malformed::NotEthernet);
    }
    let kind = msg.opts().msg_type().ok_or(Malformed::NoMessageType)?;
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&buf[28..34]);
    Ok(Request { msg, kind, mac: kubenet_cluster::Mac(mac) })
}

/// Walks the options' code-length-value triples before dhcproto does. Every option must lie
/// inside the datagram, and options whose length dhcproto trusts must have the length their RFC
/// gives: for some it only `debug_assert`s the length (a panic in debug builds) or subtracts from
/// it (an underflow); for fixed-width ones it reads the width whatever the length says, and every
/// option after is then misread.
fn check_options(opts: &[u8]) -> Result<(), Malformed> {
    let mut i = 0;
    while i < opts.len() {
        let code = opts[i];
        match code {
            0 => {
                i += 1;
                continue;
            }
            255 => return Ok(()),
            _ => {}
        }
        let len = usize::from(*opts.get(i + 1).ok_or(Malformed::BadOptions)?);
        if i + 2 + len > opts.len() {
            return Err(Malformed::BadOptions);
        }
        let ok = match code {
            // Message type (53), overload (52).
            52 | 53 => len == 1,
            // Max message size (57).
            57 => len == 2,
            // Requested address (50), lease time (51), server id (54), RFC 6926 times.
            50 | 51 | 54 | 152..=155 => len == 4,
            // Rapid commit (RFC 4039).
            80 => len == 0,
            // Client FQDN (RFC 4702): flags and two rcodes before the name.
            81 => len >= 3,
            // Client network interface (RFC 4578).
            94 => len == 3,
            // RFC 6926 status code: the code before the message.
            151 => len >= 1,
            _ => true,
        };
        if !ok {
            return Err(Malformed::BadOptions);
        }
        i += 2 + len;
    }
    // Options must end with option 255 (RFC 2131 4.1); a request without is cut short.
    Err(Malformed::BadOptions)
}

/// Encodes a reply, padded to 300 bytes. Fails only if dhcproto cannot encode an option, which
/// for the options the engine sets means a bug.
///
/// The fixed header is written here and only the options by dhcproto: its `Message::encode`
/// writes the 192 zero bytes of `sname` and `file` one at a time, which was a tenth of the DHCP
/// server's CPU (README, "Where the time goes"). The bytes are the same as dhcproto's; a test
/// holds them to it. chaddr past hlen is written as zeros, its padding by RFC 2131.
pub fn encode_reply(msg: &Message) -> Result<Vec<u8>, dhcproto::error::EncodeError> {
    use dhcproto::error::EncodeError;
    let mut header = [0u8; MIN_LEN];
    header[0] = msg.opcode().into();
    header[1] = msg.htype().into();
    header[2] = msg.hlen();
    header[3] = msg.hops();
    header[4..8].copy_from_slice(&msg.xid().to_be_bytes());
    header[8..10].copy_from_slice(&msg.secs().to_be_bytes());
    header[10..12].copy_from_slice(&u16::from(msg.flags()).to_be_bytes());
    for (at, a) in [(12, msg.ciaddr()), (16, msg.yiaddr()), (20, msg.siaddr()), (24, msg.giaddr())] {
        header[at..at + 4].copy_from_slice(&a.octets());
    }
    // chaddr() panics when hlen > 16: the engine only builds Ethernet replies (hlen 6).
    let chaddr = msg.chaddr();
    header[28..28 + chaddr.len()].copy_from_slice(chaddr);
    for (field, at, room) in [(msg.sname(), 44, 64), (msg.fname(), 108, 128)] {
        let field = field.unwrap_or_default();
        // dhcproto's setters assert these lengths already: an error here, never a panic.
        if field.len() > room {
            return Err(EncodeError::StringSizeTooBig { len: field.len() });
        }
        header[at..at + field.len()].copy_from_slice(field);
    }
    header[236..].copy_from_slice(&MAGIC_COOKIE);
    let mut out = Vec::with_capacity(MIN_MAX_MESSAGE);
    // The encoder writes from the start of the buffer: header first, then the options after it.
    let mut e = Encoder::new(&mut out);
    e.write_slice(&header)?;
    msg.opts().encode(&mut e)?;
    if out.len() < MIN_REPLY_LEN {
        out.resize(MIN_REPLY_LEN, 0);
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use dhcproto::v4::{DhcpOption, Opcode};
    use std::net::Ipv4Addr;

    pub(crate) fn discover_bytes(mac: [u8; 6]) -> Vec<u8> {
        let mut m = Message::new(
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &mac,
        );
        m.set_opcode(Opcode::BootRequest);
        m.opts_mut().insert(DhcpOption::MessageType(MessageType::Discover));
        m.to_vec().unwrap()
    }

    #[test]
    fn a_real_discover_decodes() {
        let r = decode_request(&discover_bytes([0x52, 0x52, 0x52, 0, 0, 4])).unwrap();
        assert_eq!(r.kind, MessageType::Discover);
        assert_eq!(r.mac.to_string(), "52:52:52:00:00:04");
    }

    #[test]
    fn hostile_headers_are_refused_before_dhcproto_sees_them() {
        let good = discover_bytes([2, 0, 0, 0, 0, 1]);
        let with = |i: usize, v: u8| {
            let mut b = good.clone();
            b[i] = v;
            b
        };
        assert_eq!(decode_request(&good[..239]).unwrap_err(), Malformed::Truncated);
        assert_eq!(decode_request(&vec![0u8; 2000]).unwrap_err(), Malformed::Oversized);
        assert_eq!(decode_request(&with(0, 2)).unwrap_err(), Malformed::NotRequest);
        // hlen 255 is what makes dhcproto's chaddr() panic.
        assert_eq!(decode_request(&with(2, 255)).unwrap_err(), Malformed::NotEthernet);
        assert_eq!(decode_request(&with(1, 6)).unwrap_err(), Malformed::NotEthernet);
        assert_eq!(decode_request(&with(236, 0)).unwrap_err(), Malformed::BadCookie);
        // Option 53 with a length running past the end.
        let mut b = good.clone();
        b.truncate(240);
        b.extend_from_slice(&[53, 200, 1]);
        assert!(decode_request(&b).is_err());
        // No option 53 at all.
        let mut b = good[..240].to_vec();
        b.push(255);
        assert_eq!(decode_request(&b).unwrap_err(), Malformed::NoMessageType);
    }

    #[test]
    fn option_lengths_dhcproto_trusts_are_checked() {
        let good = discover_bytes([2, 0, 0, 0, 0, 1]);
        let with_opts = |opts: &[u8]| {
            let mut b = good[..240].to_vec();
            b.extend_from_slice(&[53, 1, 1]);
            b.extend_from_slice(opts);
            b
        };
        assert!(decode_request(&with_opts(&[255])).is_ok());
        assert!(decode_request(&with_opts(&[0, 0, 255])).is_ok(), "pad options are skipped");
        for bad in [
            &[94, 2, 0, 0, 255][..], // dhcproto debug_asserts len == 3
            &[81, 1, 0, 255],        // len - 3 underflows
            &[151, 0, 255],          // len - 1 underflows
            &[80, 1, 0, 255],        // rapid commit carries no data
            &[51, 2, 0, 0, 255],     // a u32 read from two bytes
            &[12, 9, b'a', 255],     // runs past the end
            &[12, 1, b'a'],          // no end option
        ] {
            assert_eq!(decode_request(&with_opts(bad)).unwrap_err(), Malformed::BadOptions, "{bad:?}");
        }
    }

    /// What dhcproto's own encoder makes of `msg`, padded as `encode_reply` pads.
    fn dhcproto_bytes(msg: &Message) -> Vec<u8> {
        let mut b = msg.to_vec().unwrap();
        b.resize(b.len().max(MIN_REPLY_LEN), 0);
        b
    }

    #[test]
    fn replies_are_the_bytes_dhcproto_would_write() {
        let mut m = Message::new_with_id(
            0xdead_beef,
            Ipv4Addr::new(192, 168, 1, 13),
            Ipv4Addr::new(192, 168, 1, 14),
            Ipv4Addr::new(192, 168, 1, 1),
            Ipv4Addr::new(192, 168, 1, 254),
            &[0x52, 0x52, 0x52, 0, 0, 4],
        );
        m.set_opcode(Opcode::BootReply).set_flags(dhcproto::v4::Flags::default().set_broadcast());
        m.set_secs(0x1234).set_hops(3);
        assert_eq!(encode_reply(&m).unwrap(), dhcproto_bytes(&m), "no options, padded");
        m.opts_mut().insert(DhcpOption::MessageType(MessageType::Ack));
        m.opts_mut().insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(192, 168, 1, 1)));
        m.opts_mut().insert(DhcpOption::AddressLeaseTime(43_200));
        m.opts_mut().insert(DhcpOption::DomainName("kubevms".into()));
        m.opts_mut().insert(DhcpOption::Hostname("worker0".into()));
        m.opts_mut().insert(DhcpOption::Router(vec![Ipv4Addr::new(192, 168, 1, 1)]));
        assert_eq!(encode_reply(&m).unwrap(), dhcproto_bytes(&m), "options");
        m.set_sname(b"vmhost").set_fname(b"pxelinux.0");
        assert_eq!(encode_reply(&m).unwrap(), dhcproto_bytes(&m), "sname and file");
        // Longer than 300 bytes: no padding, and still the same.
        m.opts_mut().insert(DhcpOption::Message("x".repeat(200)));
        let long = encode_reply(&m).unwrap();
        assert!(long.len() > MIN_REPLY_LEN);
        assert_eq!(long, dhcproto_bytes(&m), "a long reply");
    }

    #[test]
    fn replies_are_padded_to_300_bytes() {
        let r = decode_request(&discover_bytes([2, 0, 0, 0, 0, 1])).unwrap();
        assert_eq!(encode_reply(&r.msg).unwrap().len(), MIN_REPLY_LEN);
    }
}
