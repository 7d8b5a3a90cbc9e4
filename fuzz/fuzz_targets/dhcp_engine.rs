//! Arbitrary bytes as a datagram on the DHCP port: the raw checks, dhcproto's decoder, the
//! engine against the reference lab, and the reply encoder must never panic.
#![no_main]

use std::cell::RefCell;
use std::net::{Ipv4Addr, SocketAddrV4};

use kubenet_dhcp::{Config, Engine, LeaseTable, Received, decode_request, wire::encode_reply};
use libfuzzer_sys::fuzz_target;

thread_local! {
    // One engine across inputs, so lease state built by earlier inputs meets later ones.
    static ENGINE: RefCell<Engine> = RefCell::new({
        let lab = kubenet_cluster::parse(kubenet_cluster::REFERENCE_CONFIG, kubenet_cluster::Source::Embedded, "/".as_ref()).unwrap();
        Engine::new(Config::from_lab(&lab), LeaseTable::default())
    });
}

fuzz_target!(|data: &[u8]| {
    let Ok(req) = decode_request(data) else { return };
    let now = 1_700_000_000 + u64::from(data.first().copied().unwrap_or(0)) * 3600;
    ENGINE.with(|e| {
        let mut e = e.borrow_mut();
        let out = e.handle(&req, Received { ifindex: 1, src: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68) }, now);
        if let Some(r) = out.reply {
            let again = encode_reply(&r.msg).expect("the engine's replies always encode");
            assert_eq!(r.bytes, again, "the bytes sent are the message's");
        }
        e.expire(now);
    });
});
