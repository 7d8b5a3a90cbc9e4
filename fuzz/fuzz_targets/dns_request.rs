//! Arbitrary bytes as a DNS request, through the server's own decision (`request::handle`:
//! parse, access list, zone) and its UDP encoding: nothing may panic, every reply must encode
//! within the request's UDP limit and parse back.
#![no_main]

use std::net::IpAddr;
use std::sync::OnceLock;

use hickory_proto::op::Message;
use kubenet_dns::Zone;
use kubenet_dns::message::{PLAIN_UDP, encode_udp};
use kubenet_dns::request::{Handled, handle};
use libfuzzer_sys::fuzz_target;

fn zone() -> &'static Zone {
    static ZONE: OnceLock<Zone> = OnceLock::new();
    ZONE.get_or_init(|| {
        let lab = kubenet_cluster::parse(kubenet_cluster::REFERENCE_CONFIG, kubenet_cluster::Source::Embedded, "/".as_ref()).unwrap();
        Zone::from_lab(&lab, 0)
    })
}

fuzz_target!(|data: &[u8]| {
    let allow = ["192.168.1.0/24".parse().unwrap()];
    // The first byte picks the client: inside the lab or not, so both paths are fuzzed.
    let (Some(&pick), Some(request)) = (data.first(), data.get(1..)) else { return };
    let src: IpAddr = if pick & 1 == 0 { [192, 168, 1, 14].into() } else { [10, 0, 0, 1].into() };
    let (reply, limit) = match handle(zone(), &allow, src, request) {
        Handled::Local(m, limit) | Handled::Refused(m, limit) => (m, limit),
        Handled::HeaderOnly(m) => (m, PLAIN_UDP),
        Handled::Forward(..) | Handled::Drop => return,
    };
    let bytes = encode_udp(&reply, limit).expect("every reply encodes for UDP");
    assert!(bytes.len() <= limit, "a UDP reply larger than the request allows");
    assert!(Message::from_vec(&bytes).is_ok(), "a reply we encoded does not parse back");
});
