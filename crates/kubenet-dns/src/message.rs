//! DNS messages without I/O: the response skeleton and OPT record every reply carries, the EDNS
//! size limits, the UDP encoding with truncation, the access list and the answer cache's key.
//! The zone, the request's decision and the server all use this; it uses none of them.

use std::net::IpAddr;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use ipnet::IpNet;

/// The EDNS payload kubenet offers and honours: the DNS flag day 2020 value, safe from IP
/// fragmentation.
pub const EDNS_PAYLOAD: u16 = 1232;
/// Without EDNS a UDP answer is at most 512 bytes (RFC 1035 4.2.1).
pub const PLAIN_UDP: usize = 512;

/// Whether `src` is on the access list (an IPv4-mapped IPv6 address counts as its IPv4 one).
pub fn allowed(allow: &[IpNet], src: IpAddr) -> bool {
    let src = match src {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(src, IpAddr::V4),
        v4 => v4,
    };
    allow.iter().any(|n| n.contains(&src))
}

/// The answer cache's key for a request that can be answered from the cache: a plain query
/// (QR 0, opcode QUERY, one question, no answer or authority records, at most the OPT record).
/// The key is the request after its id, RD cleared: two queries that differ only there get the
/// same answer.
pub fn answer_key(request: &[u8]) -> Option<Vec<u8>> {
    let h = request.get(..12)?;
    let plain = h[2] & 0xf8 == 0 && h[4..6] == [0, 1] && h[6..10] == [0, 0, 0, 0] && h[10] == 0 && h[11] <= 1;
    plain.then(|| {
        let mut k = Vec::with_capacity(request.len() - 2);
        k.push(h[2] & !1);
        k.extend_from_slice(&request[3..]);
        k
    })
}

/// A response skeleton for `msg`: id, opcode, question, RD copied; our own OPT record when the
/// query had one ([`reply_edns`]); RA set, since kubenet recurses for the lab's clients and
/// resolvers treat a missing RA as "this server does not". AA and RA mean something only for
/// QUERY (RFC 1035 4.1.1), so any other opcode gets neither.
pub fn response(msg: &Message, rcode: ResponseCode, authoritative: bool) -> Message {
    let query = msg.metadata.op_code == OpCode::Query;
    let mut m = Message::new(msg.metadata.id, MessageType::Response, msg.metadata.op_code);
    m.metadata.response_code = rcode;
    m.metadata.authoritative = authoritative && query;
    m.metadata.recursion_desired = msg.metadata.recursion_desired;
    m.metadata.recursion_available = query;
    m.add_queries(msg.queries.iter().cloned());
    if let Some(e) = &msg.edns {
        m.set_edns(reply_edns(e));
    }
    m
}

/// The OPT record of a reply to a query that carried `asked` (RFC 6891): version 0, our UDP
/// payload size (no more than theirs, no less than 512), DO copied (RFC 3225), every other flag
/// zero, and no options: options this server does not implement (cookies, RFC 7873 5.2, among
/// them) are ignored, never echoed.
pub fn reply_edns(asked: &hickory_proto::op::Edns) -> hickory_proto::op::Edns {
    let mut edns = hickory_proto::op::Edns::new();
    edns.set_max_payload(EDNS_PAYLOAD.min(asked.max_payload().max(512)));
    edns.set_dnssec_ok(asked.flags().dnssec_ok);
    edns
}

/// The most a UDP answer to this request may take: its EDNS size (up to ours), else 512.
pub fn udp_limit(request: &Message) -> usize {
    match &request.edns {
        Some(e) => usize::from(e.max_payload().clamp(PLAIN_UDP as u16, EDNS_PAYLOAD)),
        None => PLAIN_UDP,
    }
}

/// A reply encoded for UDP; one too large goes truncated (TC set, records dropped), and the
/// client retries over TCP.
pub fn encode_udp(m: &Message, limit: usize) -> Option<Vec<u8>> {
    let r = match m.to_vec() {
        Ok(b) if b.len() <= limit => Ok(b),
        Ok(_) => m.truncate().to_vec(),
        Err(e) => Err(e),
    };
    r.map_err(|e| tracing::warn!("DNS encode: {e}")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_queries_have_a_cache_key() {
        let mut q = Message::query();
        q.add_query(hickory_proto::op::Query::query("a.b.".parse().unwrap(), hickory_proto::rr::RecordType::A));
        let plain = q.to_vec().unwrap();
        assert!(answer_key(&plain).is_some());
        let mut update = plain.clone();
        update[2] |= 5 << 3; // opcode UPDATE
        assert!(answer_key(&update).is_none());
        let mut response = plain.clone();
        response[2] |= 0x80;
        assert!(answer_key(&response).is_none());
        // RD is not part of the key: the reply's RD is patched per request.
        let mut rd = plain.clone();
        rd[2] ^= 1;
        assert_eq!(answer_key(&rd), answer_key(&plain));
        assert!(answer_key(&plain[..11]).is_none());
    }

    #[test]
    fn an_answer_too_large_for_udp_is_truncated_for_a_tcp_retry() {
        let mut q = Message::query();
        q.add_query(hickory_proto::op::Query::query("big.example.".parse().unwrap(), hickory_proto::rr::RecordType::A));
        let mut big = response(&q, ResponseCode::NoError, false);
        for i in 0..60u8 {
            big.add_answer(hickory_proto::rr::Record::from_rdata(
                "big.example.".parse().unwrap(),
                60,
                hickory_proto::rr::RData::A(hickory_proto::rr::rdata::A::new(192, 0, 2, i)),
            ));
        }
        assert!(big.to_vec().unwrap().len() > PLAIN_UDP);
        let sent = encode_udp(&big, PLAIN_UDP).unwrap();
        assert!(sent.len() <= PLAIN_UDP);
        let back = Message::from_vec(&sent).unwrap();
        assert!(back.metadata.truncation && back.answers.is_empty());
        assert_eq!(back.queries, q.queries);
        // Within an EDNS client's 1232 bytes it goes whole.
        let whole = Message::from_vec(&encode_udp(&big, 1232).unwrap()).unwrap();
        assert!(!whole.metadata.truncation && whole.answers.len() == 60);
    }

    #[test]
    fn udp_limit_follows_edns() {
        let mut q = Message::query();
        q.add_query(hickory_proto::op::Query::query("a.b.".parse().unwrap(), hickory_proto::rr::RecordType::A));
        assert_eq!(udp_limit(&q), 512);
        let mut e = hickory_proto::op::Edns::new();
        e.set_max_payload(4096);
        q.set_edns(e);
        assert_eq!(udp_limit(&q), 1232);
    }
}
