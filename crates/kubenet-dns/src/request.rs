//! One DNS request's fate, without I/O: bytes off the wire and the client's address in, the
//! reply (or a forward, or nothing) out. The server counts and sends; the fuzz target calls
//! [`handle`] directly.

use std::net::IpAddr;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use ipnet::IpNet;

use crate::message::{allowed, response, udp_limit};
use crate::zone::{Decision, Zone};

/// What one request comes to. Each reply carries the most a UDP reply to the request may take.
#[derive(Debug)]
pub enum Handled {
    /// The zone's own answer (it may go in the answer cache).
    Local(Message, usize),
    /// The client is not on the access list.
    Refused(Message, usize),
    /// The bytes did not parse, but their header did: FORMERR, or NOTIMP when the header names
    /// an opcode this server does not implement (the body of such a message is not ours to
    /// judge: RFC 1035 4.1.1, RFC 6895 2.2).
    HeaderOnly(Message),
    /// Not the lab's: for the upstream resolvers.
    Forward(Message, usize),
    /// Not a query at all (a response, or less than a header): no reply.
    Drop,
}

/// Decides one request from `src`, as bytes off the wire: parse, access list, zone.
pub fn handle(zone: &Zone, allow: &[IpNet], src: IpAddr, bytes: &[u8]) -> Handled {
    let msg = match Message::from_vec(bytes) {
        Ok(m) => m,
        // A readable header earns a FORMERR (NOTIMP for an opcode other than QUERY); anything
        // shorter is dropped.
        Err(_) => {
            return match bytes.get(..12) {
                Some(h) if h[2] & 0x80 == 0 => {
                    let op_code = OpCode::from_u8((h[2] >> 3) & 0x0f);
                    let query = op_code == OpCode::Query;
                    let mut m = Message::new(u16::from_be_bytes([h[0], h[1]]), MessageType::Response, op_code);
                    m.metadata.response_code = if query { ResponseCode::FormErr } else { ResponseCode::NotImp };
                    // RA means something only for QUERY, as in `message::response`.
                    m.metadata.recursion_available = query;
                    Handled::HeaderOnly(m)
                }
                _ => Handled::Drop,
            };
        }
    };
    if msg.metadata.message_type != MessageType::Query {
        return Handled::Drop;
    }
    let limit = udp_limit(&msg);
    if !allowed(allow, src) {
        return Handled::Refused(response(&msg, ResponseCode::Refused, false), limit);
    }
    match zone.decide(&msg) {
        Decision::Answer(m) => Handled::Local(m, limit),
        Decision::Forward => Handled::Forward(msg, limit),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lab_zone() -> Zone {
        let lab =
            kubenet_cluster::parse(kubenet_cluster::REFERENCE_CONFIG, kubenet_cluster::Source::Embedded, "/".as_ref())
                .unwrap();
        Zone::from_lab(&lab, 0)
    }

    #[test]
    fn one_request_comes_to_one_fate() {
        let zone = lab_zone();
        let lab_net: Vec<IpNet> = vec!["192.168.1.0/24".parse().unwrap()];
        let inside: IpAddr = [192, 168, 1, 14].into();
        let query = |name: &str| {
            let mut q = Message::query();
            q.add_query(hickory_proto::op::Query::query(name.parse().unwrap(), hickory_proto::rr::RecordType::A));
            q.to_vec().unwrap()
        };
        assert!(matches!(handle(&zone, &lab_net, inside, &query("worker0.kubevms.")), Handled::Local(_, 512)));
        assert!(matches!(handle(&zone, &lab_net, inside, &query("example.org.")), Handled::Forward(_, 512)));
        match handle(&zone, &lab_net, [10, 0, 0, 1].into(), &query("worker0.kubevms.")) {
            Handled::Refused(m, _) => assert_eq!(m.metadata.response_code, ResponseCode::Refused),
            other => panic!("{other:?}"),
        }
        // An IPv4-mapped IPv6 client is its IPv4 address.
        let mapped: IpAddr = "::ffff:192.168.1.14".parse().unwrap();
        assert!(matches!(handle(&zone, &lab_net, mapped, &query("worker0.kubevms.")), Handled::Local(..)));
        // A header and garbage: FORMERR with the id; less than a header, or a response: nothing.
        match handle(&zone, &lab_net, inside, &[0x12, 0x34, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0xff]) {
            Handled::HeaderOnly(m) => {
                assert_eq!((m.metadata.id, m.metadata.response_code), (0x1234, ResponseCode::FormErr))
            }
            other => panic!("{other:?}"),
        }
        // The same garbage under an unknown opcode is NOTIMP, with that opcode and no RA.
        match handle(&zone, &lab_net, inside, &[0x12, 0x34, 15 << 3, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0xff]) {
            Handled::HeaderOnly(m) => {
                assert_eq!((m.metadata.response_code, m.metadata.op_code), (ResponseCode::NotImp, OpCode::Unknown(15)));
                assert!(!m.metadata.recursion_available);
            }
            other => panic!("{other:?}"),
        }
        // A bare header (no question) under an unknown opcode parses, and is NOTIMP too.
        match handle(&zone, &lab_net, inside, &[0x12, 0x34, 15 << 3, 0, 0, 0, 0, 0, 0, 0, 0, 0]) {
            Handled::Local(m, _) => assert_eq!(m.metadata.response_code, ResponseCode::NotImp),
            other => panic!("{other:?}"),
        }
        assert!(matches!(handle(&zone, &lab_net, inside, &[1, 2, 3]), Handled::Drop));
        let mut response = Message::from_vec(&query("worker0.kubevms.")).unwrap();
        response.metadata.message_type = MessageType::Response;
        assert!(matches!(handle(&zone, &lab_net, inside, &response.to_vec().unwrap()), Handled::Drop));
    }
}
