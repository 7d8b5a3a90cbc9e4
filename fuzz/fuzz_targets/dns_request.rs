//! Arbitrary bytes as a DNS request: the parse, the zone's decision and the reply's encoding
//! must never panic, and a decision must always encode.
#![no_main]

use std::sync::OnceLock;

use hickory_proto::op::Message;
use kubenet_dns::{Decision, Zone};
use libfuzzer_sys::fuzz_target;

fn zone() -> &'static Zone {
    static ZONE: OnceLock<Zone> = OnceLock::new();
    ZONE.get_or_init(|| {
        let lab = kubenet_cluster::parse(kubenet_cluster::REFERENCE_CONFIG, kubenet_cluster::Source::Embedded, "/".as_ref()).unwrap();
        Zone::from_lab(&lab, 0)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = Message::from_vec(data) else { return };
    if let Decision::Answer(reply) = zone().decide(&msg) {
        let bytes = reply.to_vec().expect("the zone's replies always encode");
        let _ = reply.truncate().to_vec();
        assert!(Message::from_vec(&bytes).is_ok(), "a reply we encoded does not parse back");
    }
});
