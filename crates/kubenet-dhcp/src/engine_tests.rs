//! The engine against the reference lab, one RFC 2131 case per test. No sockets.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;

use dhcproto::Encodable;
use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use kubenet_cluster::Mac;

use crate::engine::{Config, Destination, Engine, Foreign, Outcome, Received};
use crate::lease::LeaseTable;
use crate::wire::{Request, decode_request};

const NOW: u64 = 1_700_000_000;
const HOST: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 1);
const WORKER0: Mac = Mac([0x52, 0x52, 0x52, 0, 0, 4]);
const STRAY: Mac = Mac([0x02, 0xaa, 0, 0, 0, 1]);
const STRAY2: Mac = Mac([0x02, 0xaa, 0, 0, 0, 2]);
const RX: Received = Received { ifindex: 3, src: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68) };

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 1, last)
}

fn engine() -> Engine {
    let lab =
        kubenet_cluster::parse(kubenet_cluster::REFERENCE_CONFIG, kubenet_cluster::Source::Embedded, Path::new("/"))
            .unwrap();
    Engine::new(Config::from_lab(&lab), LeaseTable::default())
}

/// A request as a client would put it on the wire, passed through the same decoder the server
/// uses.
fn msg(kind: MessageType, mac: Mac, f: impl FnOnce(&mut Message)) -> Request {
    let mut m = Message::new(
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &mac.0,
    );
    m.set_opcode(Opcode::BootRequest).set_xid(0x1234);
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    f(&mut m);
    decode_request(&m.to_vec().unwrap()).unwrap()
}

fn opt(m: &Message, c: OptionCode) -> Option<&DhcpOption> {
    m.opts().get(c)
}

fn kind(o: &Outcome) -> Option<MessageType> {
    o.reply.as_ref().and_then(|r| r.msg.opts().msg_type())
}

fn requesting(mac: Mac, want: Ipv4Addr) -> Request {
    msg(MessageType::Request, mac, |m| {
        m.opts_mut().insert(DhcpOption::ServerIdentifier(HOST));
        m.opts_mut().insert(DhcpOption::RequestedIpAddress(want));
    })
}

/// DISCOVER then REQUEST, as a client in INIT does; returns the ACKed address.
fn dora(e: &mut Engine, mac: Mac) -> Ipv4Addr {
    let offer = e.handle(&msg(MessageType::Discover, mac, |_| {}), RX, NOW);
    let yiaddr = offer.reply.expect("offer").msg.yiaddr();
    let ack = e.handle(&requesting(mac, yiaddr), RX, NOW);
    assert_eq!(kind(&ack), Some(MessageType::Ack));
    yiaddr
}

#[test]
fn vm_discover_gets_its_fixed_address_and_every_option() {
    let mut e = engine();
    let o = e.handle(&msg(MessageType::Discover, WORKER0, |_| {}), RX, NOW);
    assert!(!o.leases_changed, "an offer is not a lease");
    let r = o.reply.unwrap();
    let m = &r.msg;
    assert_eq!(m.opts().msg_type(), Some(MessageType::Offer));
    assert_eq!(m.opcode(), Opcode::BootReply);
    assert_eq!((m.xid(), m.yiaddr(), m.chaddr()), (0x1234, ip(14), &WORKER0.0[..]));
    assert_eq!(opt(m, OptionCode::ServerIdentifier), Some(&DhcpOption::ServerIdentifier(HOST)));
    assert_eq!(opt(m, OptionCode::AddressLeaseTime), Some(&DhcpOption::AddressLeaseTime(43200)));
    assert_eq!(opt(m, OptionCode::Renewal), Some(&DhcpOption::Renewal(21600)));
    assert_eq!(opt(m, OptionCode::Rebinding), Some(&DhcpOption::Rebinding(37800)));
    assert_eq!(opt(m, OptionCode::SubnetMask), Some(&DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0))));
    assert_eq!(opt(m, OptionCode::BroadcastAddr), Some(&DhcpOption::BroadcastAddr(ip(255))));
    assert_eq!(opt(m, OptionCode::Router), Some(&DhcpOption::Router(vec![HOST])));
    assert_eq!(opt(m, OptionCode::DomainNameServer), Some(&DhcpOption::DomainNameServer(vec![HOST])));
    assert_eq!(opt(m, OptionCode::DomainName), Some(&DhcpOption::DomainName("kubevms".into())));
    assert_eq!(opt(m, OptionCode::Hostname), Some(&DhcpOption::Hostname("worker0".into())));
    // No broadcast bit, no ciaddr: unicast to the offered address at the client's MAC.
    assert_eq!(r.dest, Destination::Direct { ip: ip(14), mac: WORKER0 });
    assert_eq!(r.ifindex, 3);
    assert!(r.bytes.len() >= 300);
    assert_eq!(decode_reply(&r.bytes), *m, "the bytes are the message");
}

/// What a client makes of a reply's bytes.
fn decode_reply(bytes: &[u8]) -> Message {
    use dhcproto::{Decodable, Decoder};
    Message::decode(&mut Decoder::new(bytes)).unwrap()
}

#[test]
fn a_reply_too_long_for_the_client_drops_the_host_name_then_the_domain() {
    let mut e = engine();
    let mut cfg = e.config().clone();
    // 296 bytes of header and other options, then the two names: 252 + 63 is over 576.
    cfg.domain = format!("{}.lab", "d".repeat(248));
    cfg.statics.insert(WORKER0, (ip(14), "w".repeat(63)));
    e.set_config(cfg);
    let discover = |max: Option<u16>| {
        msg(MessageType::Discover, WORKER0, |m| {
            if let Some(n) = max {
                m.opts_mut().insert(DhcpOption::MaxMessageSize(n));
            }
        })
    };
    let r = e.handle(&discover(None), RX, NOW).reply.unwrap();
    assert!(r.bytes.len() <= 576, "{} bytes", r.bytes.len());
    assert!(opt(&r.msg, OptionCode::Hostname).is_none(), "the host name goes first");
    assert!(opt(&r.msg, OptionCode::DomainName).is_some(), "and the domain then fits");
    assert_eq!(decode_reply(&r.bytes), r.msg);
    // Option 57 below 576 counts as 576 (RFC 2131 2): the same reply.
    assert_eq!(e.handle(&discover(Some(300)), RX, NOW).reply.unwrap().bytes.len(), r.bytes.len());
    // A client that takes 1500 bytes gets both names.
    let big = e.handle(&discover(Some(1500)), RX, NOW).reply.unwrap();
    assert!(big.bytes.len() > 576);
    assert!(opt(&big.msg, OptionCode::Hostname).is_some() && opt(&big.msg, OptionCode::DomainName).is_some());
}

#[test]
fn option_55_limits_the_optional_options() {
    let mut e = engine();
    let d = msg(MessageType::Discover, WORKER0, |m| {
        m.opts_mut().insert(DhcpOption::ParameterRequestList(vec![OptionCode::SubnetMask, OptionCode::Router]));
    });
    let m = e.handle(&d, RX, NOW).reply.unwrap().msg;
    assert!(opt(&m, OptionCode::Router).is_some());
    for absent in [OptionCode::DomainNameServer, OptionCode::DomainName, OptionCode::Hostname] {
        assert!(opt(&m, absent).is_none(), "{absent:?} was not asked for");
    }
    // Always there whatever the list says.
    for present in
        [OptionCode::ServerIdentifier, OptionCode::AddressLeaseTime, OptionCode::SubnetMask, OptionCode::BroadcastAddr]
    {
        assert!(opt(&m, present).is_some(), "{present:?}");
    }
}

#[test]
fn broadcast_flag_and_relay_pick_the_destination() {
    let mut e = engine();
    let d = msg(MessageType::Discover, WORKER0, |m| {
        m.set_flags(Flags::default().set_broadcast());
    });
    assert_eq!(e.handle(&d, RX, NOW).reply.unwrap().dest, Destination::Broadcast);
    let relayed = msg(MessageType::Discover, WORKER0, |m| {
        m.set_giaddr(ip(254));
    });
    let r = e.handle(&relayed, RX, NOW).reply.unwrap();
    assert_eq!(r.dest, Destination::Relay(SocketAddrV4::new(ip(254), 67)));
    assert_eq!(r.msg.giaddr(), ip(254));
    let foreign = msg(MessageType::Discover, WORKER0, |m| {
        m.set_giaddr(Ipv4Addr::new(10, 0, 0, 1));
    });
    assert!(e.handle(&foreign, RX, NOW).reply.is_none(), "a relay on another subnet is not ours");
}

#[test]
fn selecting_request_is_acked_and_leased() {
    let mut e = engine();
    let o = e.handle(&requesting(WORKER0, ip(14)), RX, NOW);
    assert_eq!(kind(&o), Some(MessageType::Ack));
    assert!(o.leases_changed);
    let l = e.leases().by_mac(WORKER0).unwrap();
    assert_eq!((l.ip, l.expires, l.hostname.as_deref()), (ip(14), Some(NOW + 43200), Some("worker0")));
}

#[test]
fn request_for_another_server_is_ignored_and_frees_our_offer() {
    let mut e = engine();
    let offered = e.handle(&msg(MessageType::Discover, STRAY, |_| {}), RX, NOW).reply.unwrap().msg.yiaddr();
    let other = msg(MessageType::Request, STRAY, |m| {
        m.opts_mut().insert(DhcpOption::ServerIdentifier(ip(99)));
        m.opts_mut().insert(DhcpOption::RequestedIpAddress(ip(7)));
    });
    let o = e.handle(&other, RX, NOW);
    assert!(o.reply.is_none() && !o.leases_changed);
    // The held address goes to the next client.
    let next = e.handle(&msg(MessageType::Discover, STRAY2, |_| {}), RX, NOW).reply.unwrap().msg.yiaddr();
    assert_eq!(next, offered);
}

#[test]
fn vm_asking_for_a_wrong_address_gets_a_broadcast_nak() {
    let mut e = engine();
    for wrong in [ip(15), ip(3), Ipv4Addr::new(10, 0, 0, 5)] {
        let o = e.handle(&requesting(WORKER0, wrong), RX, NOW);
        assert_eq!(kind(&o), Some(MessageType::Nak), "{wrong}");
        let r = o.reply.unwrap();
        assert_eq!(r.dest, Destination::Broadcast);
        assert_eq!(r.msg.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(opt(&r.msg, OptionCode::ServerIdentifier), Some(&DhcpOption::ServerIdentifier(HOST)));
        assert!(matches!(opt(&r.msg, OptionCode::Message), Some(DhcpOption::Message(_))));
        assert!(opt(&r.msg, OptionCode::AddressLeaseTime).is_none());
    }
    assert!(e.leases().is_empty());
}

#[test]
fn init_reboot_is_granted_what_the_client_may_have_even_without_a_record() {
    let mut e = engine();
    let reboot = |mac, want| {
        msg(MessageType::Request, mac, |m| {
            m.opts_mut().insert(DhcpOption::RequestedIpAddress(want));
        })
    };
    // Server lost its leases: the VM still gets its address back, and so does a stray client
    // asking for a free pool address.
    assert_eq!(kind(&e.handle(&reboot(WORKER0, ip(14)), RX, NOW)), Some(MessageType::Ack));
    assert_eq!(kind(&e.handle(&reboot(STRAY, ip(5)), RX, NOW)), Some(MessageType::Ack));
    // Wrong network, a VM's address, someone else's lease: NAK.
    assert_eq!(kind(&e.handle(&reboot(STRAY2, Ipv4Addr::new(10, 1, 1, 1)), RX, NOW)), Some(MessageType::Nak));
    assert_eq!(kind(&e.handle(&reboot(STRAY2, ip(14)), RX, NOW)), Some(MessageType::Nak));
    assert_eq!(kind(&e.handle(&reboot(STRAY2, ip(5)), RX, NOW)), Some(MessageType::Nak));
}

#[test]
fn non_authoritative_init_reboot_without_a_record_is_silent() {
    let mut e = engine();
    let mut cfg = e.config().clone();
    cfg.authoritative = false;
    e.set_config(cfg);
    let r = msg(MessageType::Request, STRAY, |m| {
        m.opts_mut().insert(DhcpOption::RequestedIpAddress(ip(14)));
    });
    let o = e.handle(&r, RX, NOW);
    assert!(o.reply.is_none());
    assert_eq!(e.stats.ignored, 1);
}

#[test]
fn a_renewal_that_changes_nothing_asks_for_no_write() {
    let mut e = engine();
    let got = dora(&mut e, STRAY);
    let renew = msg(MessageType::Request, STRAY, |m| {
        m.set_ciaddr(got);
    });
    // The same second: the lease on file is already this one.
    let o = e.handle(&renew, RX, NOW);
    assert_eq!(kind(&o), Some(MessageType::Ack));
    assert!(!o.leases_changed, "nothing changed, nothing to write");
    // A second later the expiry moves, and the file must follow before the ACK.
    let o = e.handle(&renew, RX, NOW + 1);
    assert!(o.leases_changed);
    assert_eq!(e.leases().by_mac(STRAY).unwrap().expires, Some(NOW + 1 + 43200));
    // A new client-chosen name changes the lease too.
    let named = msg(MessageType::Request, STRAY, |m| {
        m.set_ciaddr(got);
        m.opts_mut().insert(DhcpOption::Hostname("stray".into()));
    });
    assert!(e.handle(&named, RX, NOW + 1).leases_changed);
    assert_eq!(e.leases().by_mac(STRAY).unwrap().hostname.as_deref(), Some("stray"));
}

#[test]
fn renewing_and_rebinding_extend_the_lease_by_unicast() {
    let mut e = engine();
    let got = dora(&mut e, STRAY);
    let renew = msg(MessageType::Request, STRAY, |m| {
        m.set_ciaddr(got);
    });
    let later = NOW + 3600;
    let o = e.handle(&renew, RX, later);
    assert_eq!(kind(&o), Some(MessageType::Ack));
    assert!(o.leases_changed);
    let r = o.reply.unwrap();
    assert_eq!((r.msg.yiaddr(), r.msg.ciaddr()), (got, got));
    assert_eq!(r.dest, Destination::Unicast(SocketAddrV4::new(got, 68)));
    assert_eq!(e.leases().by_mac(STRAY).unwrap().expires, Some(later + 43200));
    // Another client renewing an address it does not hold is refused.
    let bogus = msg(MessageType::Request, STRAY2, |m| {
        m.set_ciaddr(got);
    });
    assert_eq!(kind(&e.handle(&bogus, RX, later)), Some(MessageType::Nak));
}

#[test]
fn pool_never_hands_out_host_vm_or_reserved_addresses_and_runs_dry() {
    let mut e = engine();
    let mut got = Vec::new();
    for i in 0..40u8 {
        let o = e.handle(&msg(MessageType::Discover, Mac([2, 0xbb, 0, 0, 0, i]), |_| {}), RX, NOW);
        match o.reply {
            Some(r) => {
                let a = r.msg.yiaddr();
                e.handle(&requesting(Mac([2, 0xbb, 0, 0, 0, i]), a), RX, NOW);
                got.push(a);
            }
            None => break,
        }
    }
    // .2-.20 minus the VMs' .10-.16: 12 addresses.
    let expected: Vec<Ipv4Addr> = (2..=9).chain(17..=20).map(ip).collect();
    got.sort();
    assert_eq!(got, expected);
    assert_eq!(e.stats.ignored, 1, "the 13th client found the pool empty");
    // A VM still gets its address with the pool full.
    assert_eq!(dora(&mut e, WORKER0), ip(14));
}

#[test]
fn a_returning_client_gets_its_address_back_and_expired_leases_are_reused() {
    let mut e = engine();
    let first = dora(&mut e, STRAY);
    assert_eq!(dora(&mut e, STRAY), first);
    // After expiry, another client may get it, but only once the pool has nothing never-leased.
    let after = NOW + 43200 + 1;
    let o = e.handle(&msg(MessageType::Discover, STRAY2, |_| {}), RX, after);
    assert_ne!(o.reply.unwrap().msg.yiaddr(), first);
    assert!(e.expire(after));
    assert!(e.leases().is_empty());
}

#[test]
fn requested_address_in_discover_is_honoured_when_free() {
    let mut e = engine();
    let d = msg(MessageType::Discover, STRAY, |m| {
        m.opts_mut().insert(DhcpOption::RequestedIpAddress(ip(18)));
    });
    assert_eq!(e.handle(&d, RX, NOW).reply.unwrap().msg.yiaddr(), ip(18));
    let vm_addr = msg(MessageType::Discover, STRAY2, |m| {
        m.opts_mut().insert(DhcpOption::RequestedIpAddress(ip(14)));
    });
    assert_ne!(e.handle(&vm_addr, RX, NOW).reply.unwrap().msg.yiaddr(), ip(14));
}

#[test]
fn decline_quarantines_the_address() {
    let mut e = engine();
    let got = dora(&mut e, STRAY);
    let d = msg(MessageType::Decline, STRAY, |m| {
        m.opts_mut().insert(DhcpOption::ServerIdentifier(HOST));
        m.opts_mut().insert(DhcpOption::RequestedIpAddress(got));
    });
    let o = e.handle(&d, RX, NOW);
    assert!(o.reply.is_none() && o.leases_changed);
    assert!(e.leases().is_empty());
    let next = e.handle(&msg(MessageType::Discover, STRAY, |_| {}), RX, NOW + 1).reply.unwrap().msg.yiaddr();
    assert_ne!(next, got, "declined address offered again within 10 minutes");
    // A decline for another server changes nothing.
    let got2 = dora(&mut e, STRAY2);
    let foreign = msg(MessageType::Decline, STRAY2, |m| {
        m.opts_mut().insert(DhcpOption::ServerIdentifier(ip(99)));
        m.opts_mut().insert(DhcpOption::RequestedIpAddress(got2));
    });
    assert!(!e.handle(&foreign, RX, NOW).leases_changed);
    assert!(e.leases().by_mac(STRAY2).is_some());
}

#[test]
fn release_frees_only_the_clients_own_lease() {
    let mut e = engine();
    let got = dora(&mut e, STRAY);
    let by_other = msg(MessageType::Release, STRAY2, |m| {
        m.set_ciaddr(got);
        m.opts_mut().insert(DhcpOption::ServerIdentifier(HOST));
    });
    assert!(!e.handle(&by_other, RX, NOW).leases_changed);
    let foreign = msg(MessageType::Release, STRAY, |m| {
        m.set_ciaddr(got);
        m.opts_mut().insert(DhcpOption::ServerIdentifier(ip(99)));
    });
    assert!(!e.handle(&foreign, RX, NOW).leases_changed);
    let own = msg(MessageType::Release, STRAY, |m| {
        m.set_ciaddr(got);
        m.opts_mut().insert(DhcpOption::ServerIdentifier(HOST));
    });
    let o = e.handle(&own, RX, NOW);
    assert!(o.reply.is_none() && o.leases_changed);
    assert!(e.leases().is_empty());
}

#[test]
fn inform_gets_options_without_a_lease() {
    let mut e = engine();
    let i = msg(MessageType::Inform, STRAY, |m| {
        m.set_ciaddr(ip(50));
    });
    let o = e.handle(&i, RX, NOW);
    assert!(!o.leases_changed);
    let r = o.reply.unwrap();
    assert_eq!(r.msg.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(r.msg.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert!(opt(&r.msg, OptionCode::AddressLeaseTime).is_none());
    assert!(opt(&r.msg, OptionCode::Renewal).is_none());
    assert_eq!(opt(&r.msg, OptionCode::DomainName), Some(&DhcpOption::DomainName("kubevms".into())));
    assert_eq!(r.dest, Destination::Unicast(SocketAddrV4::new(ip(50), 68)));
}

#[test]
fn infinite_leases_carry_no_renewal_times() {
    let mut e = engine();
    let mut cfg = e.config().clone();
    cfg.lease = kubenet_cluster::LeaseTime::Infinite;
    e.set_config(cfg);
    let o = e.handle(&requesting(WORKER0, ip(14)), RX, NOW);
    let m = o.reply.unwrap().msg;
    assert_eq!(opt(&m, OptionCode::AddressLeaseTime), Some(&DhcpOption::AddressLeaseTime(u32::MAX)));
    assert!(opt(&m, OptionCode::Renewal).is_none() && opt(&m, OptionCode::Rebinding).is_none());
    assert_eq!(e.leases().by_mac(WORKER0).unwrap().expires, None);
}

#[test]
fn leases_survive_a_restart_through_the_file_format() {
    let mut e = engine();
    let got = dora(&mut e, STRAY);
    dora(&mut e, WORKER0);
    let text = e.leases().to_text();
    let (table, bad) = LeaseTable::from_text(&text, NOW + 10);
    assert_eq!(bad, 0);
    let lab =
        kubenet_cluster::parse(kubenet_cluster::REFERENCE_CONFIG, kubenet_cluster::Source::Embedded, Path::new("/"))
            .unwrap();
    let mut restarted = Engine::new(Config::from_lab(&lab), table);
    let renew = msg(MessageType::Request, STRAY, |m| {
        m.set_ciaddr(got);
    });
    assert_eq!(kind(&restarted.handle(&renew, RX, NOW + 20)), Some(MessageType::Ack));
    // The restarted server still knows .got is taken.
    let o = restarted.handle(&msg(MessageType::Discover, STRAY2, |_| {}), RX, NOW + 20);
    assert_ne!(o.reply.unwrap().msg.yiaddr(), got);
}

/// The fuzz target's path on stable Rust, as a regression test: the committed seed corpus,
/// mutated from a fixed seed, plus random datagrams, through decode, engine and encode. A panic
/// anywhere fails it.
#[test]
fn mutated_and_random_datagrams_never_panic() {
    let seeds: Vec<Vec<u8>> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/corpus/dhcp_engine"))
        .expect("the seed corpus is committed")
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert!(seeds.len() >= 9);
    let mut e = engine();
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rand = move || {
        // xorshift64: deterministic, so a failure reproduces.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mut decoded, mut replied) = (0, 0);
    for i in 0..20_000u64 {
        let mut p = if i % 5 == 4 {
            (0..rand() % 700).map(|_| rand() as u8).collect()
        } else {
            seeds[(rand() % seeds.len() as u64) as usize].clone()
        };
        for _ in 0..(rand() % 8) {
            if p.is_empty() {
                break;
            }
            let at = (rand() % p.len() as u64) as usize;
            match rand() % 4 {
                0 => p[at] = rand() as u8,
                1 => p.truncate(at),
                2 => p.insert(at, rand() as u8),
                _ => p[at] ^= 1 << (rand() % 8),
            }
        }
        if let Ok(req) = decode_request(&p) {
            decoded += 1;
            let out = e.handle(&req, RX, NOW + i);
            if let Some(r) = out.reply {
                crate::wire::encode_reply(&r.msg).unwrap();
                replied += 1;
            }
        }
    }
    // The mutations must leave enough valid packets to reach the engine's every branch.
    assert!(decoded > 2_000 && replied > 1_000, "decoded {decoded}, replied {replied}");
}

#[test]
fn the_lowest_free_address_is_offered_even_after_the_pool_filled_past_it() {
    let mut e = engine();
    let clients: Vec<Mac> = (0..5).map(|i| Mac([0x02, 0xbb, 0, 0, 0, i])).collect();
    let got: Vec<Ipv4Addr> = clients.iter().map(|m| dora(&mut e, *m)).collect();
    assert_eq!(got, [ip(2), ip(3), ip(4), ip(5), ip(6)], "the pool is handed out from its bottom");
    // A release below the search's starting point: the next new client gets that address.
    let release = msg(MessageType::Release, clients[1], |m| {
        m.set_ciaddr(ip(3));
    });
    e.handle(&release, RX, NOW);
    assert_eq!(dora(&mut e, STRAY), ip(3));
    // A client that moves frees its old address for the next one.
    assert_eq!(kind(&e.handle(&requesting(clients[0], ip(7)), RX, NOW)), Some(MessageType::Ack));
    assert_eq!(dora(&mut e, STRAY2), ip(2));
    // Expiry starts the search from the bottom again.
    assert!(e.expire(NOW + 43200 + 1));
    assert_eq!(dora(&mut e, Mac([0x02, 0xcc, 0, 0, 0, 1])), ip(2));
}

#[test]
fn only_the_lab_interface_and_listed_relays_are_admitted() {
    let mut cfg = engine().config().clone();
    let relay = Ipv4Addr::new(10, 99, 0, 2);
    let stranger = Ipv4Addr::new(10, 99, 0, 3);
    let (none, giaddr) = (Ipv4Addr::UNSPECIFIED, ip(50));
    // No relay listed: the lab's interface only, whatever giaddr says.
    assert_eq!(cfg.admit(none, ip(99), true), Ok(()));
    assert_eq!(cfg.admit(giaddr, ip(50), true), Ok(()));
    assert_eq!(cfg.admit(none, stranger, false), Err(Foreign::Interface));
    assert_eq!(cfg.admit(giaddr, relay, false), Err(Foreign::Relay));
    cfg.relays = vec![relay];
    assert_eq!(cfg.admit(giaddr, relay, false), Ok(()));
    // A listed relay's giaddr from another source, or a direct request from the relay's host,
    // is still not the lab's.
    assert_eq!(cfg.admit(giaddr, stranger, false), Err(Foreign::Relay));
    assert_eq!(cfg.admit(none, relay, false), Err(Foreign::Interface));
}

#[test]
fn a_reload_keeps_the_relays_the_server_started_with() {
    let mut e = engine();
    let mut cfg = e.config().clone();
    cfg.relays = vec![Ipv4Addr::new(10, 99, 0, 2)];
    let mut started = Engine::new(cfg.clone(), LeaseTable::default());
    let mut reloaded = cfg.clone();
    reloaded.relays = vec![Ipv4Addr::new(203, 0, 113, 7)];
    started.set_config(reloaded);
    assert_eq!(started.config().relays, cfg.relays);
    e.set_config(cfg);
    assert!(e.config().relays.is_empty());
}

/// An engine whose pool is a whole /8 (16 million addresses), so only the caps bound its tables.
fn engine_with_a_huge_pool() -> Engine {
    let mut cfg = engine().config().clone();
    cfg.subnet = "10.0.0.0/8".parse().unwrap();
    cfg.server_id = Ipv4Addr::new(10, 0, 0, 1);
    cfg.pool = kubenet_cluster::DhcpRange { start: Ipv4Addr::new(10, 0, 0, 2), end: Ipv4Addr::new(10, 255, 255, 254) };
    Engine::new(cfg, LeaseTable::default())
}

/// Made-up MACs and pool addresses from a fixed seed (xorshift64).
fn randoms(seed: u64) -> impl Iterator<Item = (Mac, Ipv4Addr)> {
    std::iter::successors(Some(seed), |x| {
        let mut x = *x;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        Some(x)
    })
    .skip(1)
    .map(|x| {
        let b = x.to_be_bytes();
        (Mac([0x02, b[0], b[1], b[2], b[3], b[4]]), Ipv4Addr::new(10, b[5], b[6], b[7].max(2)))
    })
}

#[test]
fn a_flood_of_declines_from_random_macs_stays_bounded_and_the_engine_still_answers() {
    let mut e = engine_with_a_huge_pool();
    for (i, (mac, addr)) in randoms(7).take(100_000).enumerate() {
        let d = msg(MessageType::Decline, mac, |m| {
            m.opts_mut().insert(DhcpOption::RequestedIpAddress(addr));
        });
        let o = e.handle(&d, RX, NOW + i as u64 / 1000);
        assert!(o.reply.is_none() && !o.leases_changed);
        assert!(e.declined.len() <= super::MAX_DECLINED, "{} declined after {i}", e.declined.len());
    }
    assert_eq!(e.stats.declines, 100_000);
    assert!(e.declined.len() > super::MAX_DECLINED / 2, "the quarantine still holds the latest declines");
    // The latest decline is still honoured; a new client is still served.
    let (_, last) = randoms(7).nth(99_999).unwrap();
    assert!(e.declined.contains_key(&last));
    let offer = e.handle(&msg(MessageType::Discover, STRAY, |_| {}), RX, NOW + 100).reply.expect("an offer");
    assert!(!e.declined.contains_key(&offer.msg.yiaddr()));
    // An address outside the pool is never quarantined: nothing hands it out.
    let before = e.declined.len();
    e.handle(
        &msg(MessageType::Decline, STRAY2, |m| {
            m.opts_mut().insert(DhcpOption::RequestedIpAddress(Ipv4Addr::new(192, 168, 1, 99)));
        }),
        RX,
        NOW + 100,
    );
    assert_eq!(e.declined.len(), before);
}

#[test]
fn a_flood_of_discovers_from_random_macs_keeps_the_offers_bounded() {
    let mut e = engine_with_a_huge_pool();
    for (i, (mac, _)) in randoms(11).take(100_000).enumerate() {
        let o = e.handle(&msg(MessageType::Discover, mac, |_| {}), RX, NOW + i as u64 / 10_000);
        assert_eq!(kind(&o), Some(MessageType::Offer), "discover {i}");
        assert!(e.offers.len() <= super::MAX_OFFERS, "{} offers after {i}", e.offers.len());
        assert_eq!(e.offers.by_ip.len(), e.offers.by_mac.len());
    }
    // The latest clients' offers are held and honoured; the server still answers a VM.
    let (latest, _) = randoms(11).nth(99_999).unwrap();
    let held = e.offers.get(&latest).map(|(ip, _)| *ip).expect("the latest offer is held");
    let ack = e.handle(&requesting_from(latest, held, Ipv4Addr::new(10, 0, 0, 1)), RX, NOW + 10);
    assert_eq!(kind(&ack), Some(MessageType::Ack));
    let vm = e.handle(&msg(MessageType::Discover, WORKER0, |_| {}), RX, NOW + 10);
    assert_eq!(vm.reply.unwrap().msg.yiaddr(), ip(14));
}

fn requesting_from(mac: Mac, want: Ipv4Addr, server: Ipv4Addr) -> Request {
    msg(MessageType::Request, mac, |m| {
        m.opts_mut().insert(DhcpOption::ServerIdentifier(server));
        m.opts_mut().insert(DhcpOption::RequestedIpAddress(want));
    })
}
