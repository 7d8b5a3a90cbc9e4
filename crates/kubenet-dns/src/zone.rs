//! The lab's names: what kubenet answers itself, and what it must never forward. Pure: a query
//! in, a decision out.
//!
//! Two authoritative zones come from the lab: the domain (`kubevms.`: the host, every VM, the
//! extra host entries, and names DHCP clients gave) and the reverse zone of the subnet
//! (`1.168.192.in-addr.arpa.`). As dnsmasq does with `expand-hosts`, `domain-needed` and
//! `bogus-priv`: a single-label name (`worker0.`) is answered from the lab's names and never
//! forwarded, and a reverse query for a private range that is not ours gets NXDOMAIN rather than
//! leaking to the upstream resolvers.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::str::FromStr;

use hickory_proto::op::{Message, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, NS, PTR, SOA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use ipnet::Ipv4Net;
use kubenet_cluster::Lab;

use crate::message::response;

/// What to do with a query.
#[derive(Debug, PartialEq)]
pub enum Decision {
    /// kubenet answers it: the complete response.
    Answer(Message),
    /// Not the lab's: ask the upstream resolvers.
    Forward,
}

#[derive(Clone, Debug)]
pub struct Zone {
    domain: Name,
    reverse: Name,
    subnet: Ipv4Net,
    /// The name server's own name: the host's FQDN.
    ns: Name,
    ttl: u32,
    /// Lower-case label -> address, for the lab's fixed names.
    fixed: HashMap<String, Ipv4Addr>,
    /// Names DHCP clients gave with their leases; never shadow a fixed name.
    dynamic: HashMap<String, Ipv4Addr>,
    /// Address -> FQDN for PTR; fixed names win over dynamic ones.
    ptr: HashMap<Ipv4Addr, Name>,
    /// The SOA records of the forward and reverse zones, built once.
    soa_forward: Record,
    soa_reverse: Record,
}

/// RFC 1918 and link-local ranges: their reverse lookups never leave the host (`bogus-priv`).
const PRIVATE: [(Ipv4Addr, u8); 4] = [
    (Ipv4Addr::new(10, 0, 0, 0), 8),
    (Ipv4Addr::new(172, 16, 0, 0), 12),
    (Ipv4Addr::new(192, 168, 0, 0), 16),
    (Ipv4Addr::new(169, 254, 0, 0), 16),
];

fn fqdn(s: &str) -> Name {
    let mut n = Name::from_str(s).expect("a validated name");
    n.set_fqdn(true);
    n.to_lowercase()
}

/// The reverse zone covering `subnet`, rounded out to whole octets: 192.168.1.0/24 ->
/// 1.168.192.in-addr.arpa.
pub fn reverse_zone(subnet: &Ipv4Net) -> Name {
    let octets = usize::from(subnet.prefix_len() / 8);
    let labels: String = subnet.network().octets()[..octets].iter().rev().map(|o| format!("{o}.")).collect();
    fqdn(&format!("{labels}in-addr.arpa."))
}

/// The addresses a reverse name stands for: 4.1.168.192.in-addr.arpa. -> 192.168.1.4/32,
/// 168.192.in-addr.arpa. -> 192.168.0.0/16. None for names that are not 1-4 octets under
/// in-addr.arpa.
fn reverse_prefix(name: &Name) -> Option<Ipv4Net> {
    let labels: Vec<&[u8]> = name.iter().collect();
    let n = labels.len();
    if !(3..=6).contains(&n)
        || !labels[n - 2].eq_ignore_ascii_case(b"in-addr")
        || !labels[n - 1].eq_ignore_ascii_case(b"arpa")
    {
        return None;
    }
    let mut o = [0u8; 4];
    for (i, l) in labels[..n - 2].iter().rev().enumerate() {
        o[i] = std::str::from_utf8(l).ok()?.parse().ok()?;
    }
    Ipv4Net::new(Ipv4Addr::from(o), ((n - 2) * 8) as u8).ok()
}

fn is_private_reverse(name: &Name) -> bool {
    reverse_prefix(name)
        .is_some_and(|n| PRIVATE.iter().any(|(net, len)| Ipv4Net::new(*net, *len).is_ok_and(|p| p.contains(&n))))
}

/// A zone's SOA: the host as primary server, hostmaster@domain, the local TTL as minimum.
fn soa(zone: &Name, domain: &Name, ns: &Name, ttl: u32) -> Record {
    let rname = Name::from_str("hostmaster").expect("a label").append_domain(domain).expect("short");
    // Serial 1: the zone is generated, and no secondary ever transfers it.
    let soa = SOA::new(ns.clone(), rname, 1, 1200, 180, 1_209_600, ttl);
    Record::from_rdata(zone.clone(), ttl, RData::SOA(soa))
}

impl Zone {
    pub fn from_lab(lab: &Lab, ttl: u32) -> Zone {
        let n = &lab.network;
        let domain = fqdn(&format!("{}.", n.domain));
        let ns = fqdn(&format!("{}.{}.", n.host_name, n.domain));
        let reverse = reverse_zone(&n.subnet);
        let mut z = Zone {
            soa_forward: soa(&domain, &domain, &ns, ttl),
            soa_reverse: soa(&reverse, &domain, &ns, ttl),
            ns,
            domain,
            reverse,
            subnet: n.subnet,
            ttl,
            fixed: HashMap::new(),
            dynamic: HashMap::new(),
            ptr: HashMap::new(),
        };
        for (name, ip) in lab.names() {
            z.fixed.insert(name.to_ascii_lowercase(), ip);
            z.ptr.entry(ip).or_insert_with(|| fqdn(&format!("{name}.{}.", n.domain)));
        }
        z
    }

    /// Replaces the names learnt from DHCP leases (option 12). A name that a VM, the host or an
    /// extra entry already has is ignored, as is an invalid one.
    pub fn set_dynamic<'a>(&mut self, leases: impl IntoIterator<Item = (&'a str, Ipv4Addr)>) {
        self.ptr.retain(|ip, _| self.fixed.values().any(|f| f == ip));
        self.dynamic.clear();
        for (name, ip) in leases {
            let name = name.to_ascii_lowercase();
            if !kubenet_cluster::is_dns_label(&name) || self.fixed.contains_key(&name) {
                continue;
            }
            self.ptr.entry(ip).or_insert_with(|| fqdn(&format!("{name}.{}", self.domain)));
            self.dynamic.insert(name, ip);
        }
    }

    fn lookup(&self, label: &str) -> Option<Ipv4Addr> {
        self.fixed.get(label).or_else(|| self.dynamic.get(label)).copied()
    }

    fn soa(&self, zone: &Name) -> Record {
        if *zone == self.reverse { self.soa_reverse.clone() } else { self.soa_forward.clone() }
    }

    /// Decides a query. `msg` is a parsed request with exactly one question.
    pub fn decide(&self, msg: &Message) -> Decision {
        // RFC 6891 6.1.3: an EDNS version this server does not speak gets BADVERS, with our
        // version (0) in the OPT record and nothing else answered.
        if msg.edns.as_ref().is_some_and(|e| e.version() > 0) {
            return Decision::Answer(response(msg, ResponseCode::BADVERS, false));
        }
        // An opcode this server does not implement is NOTIMP whatever the rest of the message
        // holds (RFC 1035 4.1.1, RFC 6895 2.2): its question count means nothing to us, so it
        // is checked before the count.
        if msg.metadata.op_code != OpCode::Query {
            return Decision::Answer(response(msg, ResponseCode::NotImp, false));
        }
        let Some(q) = msg.queries.first().filter(|_| msg.queries.len() == 1) else {
            return Decision::Answer(response(msg, ResponseCode::FormErr, false));
        };
        let name = q.name().to_lowercase();
        let qtype = q.query_type();
        let in_class = matches!(q.query_class(), DNSClass::IN | DNSClass::ANY);

        if self.domain.zone_of(&name) {
            if !in_class {
                return Decision::Answer(response(msg, ResponseCode::Refused, false));
            }
            return Decision::Answer(self.forward_zone(msg, &name, qtype));
        }
        if self.reverse.zone_of(&name) {
            if !in_class {
                return Decision::Answer(response(msg, ResponseCode::Refused, false));
            }
            return Decision::Answer(self.reverse_zone_answer(msg, &name, qtype));
        }
        // domain-needed: a bare label is the lab's or nobody's.
        if name.num_labels() == 1 {
            let label = String::from_utf8_lossy(name.iter().next().unwrap_or_default()).to_ascii_lowercase();
            return Decision::Answer(match self.lookup(&label) {
                Some(ip) => self.answer_a(msg, &name, qtype, ip, None),
                None => response(msg, ResponseCode::NXDomain, false),
            });
        }
        if is_private_reverse(&name) {
            return Decision::Answer(response(msg, ResponseCode::NXDomain, false));
        }
        Decision::Forward
    }

    fn forward_zone(&self, msg: &Message, name: &Name, qtype: RecordType) -> Message {
        let depth = name.num_labels() - self.domain.num_labels();
        if depth == 0 {
            return self.apex(msg, &self.domain, qtype);
        }
        let label = String::from_utf8_lossy(name.iter().next().unwrap_or_default()).to_ascii_lowercase();
        match self.lookup(&label).filter(|_| depth == 1) {
            Some(ip) => self.answer_a(msg, name, qtype, ip, Some(&self.domain)),
            None => self.negative(msg, ResponseCode::NXDomain, &self.domain),
        }
    }

    fn reverse_zone_answer(&self, msg: &Message, name: &Name, qtype: RecordType) -> Message {
        if *name == self.reverse {
            return self.apex(msg, &self.reverse, qtype);
        }
        let prefix = reverse_prefix(name);
        let address = prefix.filter(|p| p.prefix_len() == 32).map(|p| p.addr());
        match address.and_then(|ip| self.ptr.get(&ip)) {
            Some(target) if matches!(qtype, RecordType::PTR | RecordType::ANY) => {
                let mut m = response(msg, ResponseCode::NoError, true);
                m.add_answer(Record::from_rdata(name.clone(), self.ttl, RData::PTR(PTR(target.clone()))));
                m
            }
            Some(_) => self.negative(msg, ResponseCode::NoError, &self.reverse),
            // Under our reverse zone but no name there: an empty non-terminal (a partial name
            // inside the subnet) exists; anything else does not.
            None if address.is_none()
                && prefix.is_some_and(|p| self.subnet.contains(&p) || p.contains(&self.subnet)) =>
            {
                self.negative(msg, ResponseCode::NoError, &self.reverse)
            }
            None => self.negative(msg, ResponseCode::NXDomain, &self.reverse),
        }
    }

    fn apex(&self, msg: &Message, zone: &Name, qtype: RecordType) -> Message {
        let mut m = response(msg, ResponseCode::NoError, true);
        match qtype {
            // RFC 8482: a minimal answer to ANY; the SOA is the apex's defining record.
            RecordType::SOA | RecordType::ANY => {
                m.add_answer(self.soa(zone));
            }
            RecordType::NS => {
                m.add_answer(Record::from_rdata(zone.clone(), self.ttl, RData::NS(NS(self.ns.clone()))));
                if let Some(ip) = self.lookup(
                    &self.ns.iter().next().map(|l| String::from_utf8_lossy(l).to_ascii_lowercase()).unwrap_or_default(),
                ) {
                    m.add_additional(Record::from_rdata(self.ns.clone(), self.ttl, RData::A(A(ip))));
                }
            }
            _ => return self.negative(msg, ResponseCode::NoError, zone),
        }
        m
    }

    /// An A answer for a name that exists; NODATA for any other type but ANY (RFC 8482: the A
    /// record is the minimal answer).
    fn answer_a(&self, msg: &Message, name: &Name, qtype: RecordType, ip: Ipv4Addr, zone: Option<&Name>) -> Message {
        if matches!(qtype, RecordType::A | RecordType::ANY) {
            let mut m = response(msg, ResponseCode::NoError, true);
            m.add_answer(Record::from_rdata(name.clone(), self.ttl, RData::A(A(ip))));
            return m;
        }
        match zone {
            Some(z) => self.negative(msg, ResponseCode::NoError, z),
            None => response(msg, ResponseCode::NoError, true),
        }
    }

    /// NXDOMAIN or NODATA with the zone's SOA in the authority section (RFC 2308).
    fn negative(&self, msg: &Message, rcode: ResponseCode, zone: &Name) -> Message {
        let mut m = response(msg, rcode, true);
        m.add_authority(self.soa(zone));
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Edns, Query};

    fn zone() -> Zone {
        let lab = kubenet_cluster::parse(
            &kubenet_cluster::REFERENCE_CONFIG
                .replace("[network.hosts]\n", "[network.hosts]\nregistry = \"192.168.1.5\"\n"),
            kubenet_cluster::Source::Embedded,
            "/".as_ref(),
        )
        .unwrap();
        Zone::from_lab(&lab, 0)
    }

    fn query(name: &str, t: RecordType) -> Message {
        let mut m = Message::query();
        m.metadata.id = 77;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_str(name).unwrap(), t));
        m
    }

    fn answer(z: &Zone, name: &str, t: RecordType) -> Message {
        match z.decide(&query(name, t)) {
            Decision::Answer(m) => m,
            Decision::Forward => panic!("{name} {t} was forwarded"),
        }
    }

    fn a_of(m: &Message) -> Vec<Ipv4Addr> {
        m.answers.iter().filter_map(|r| if let RData::A(a) = &r.data { Some(a.0) } else { None }).collect()
    }

    fn has_soa(m: &Message) -> bool {
        m.authorities.iter().any(|r| matches!(r.data, RData::SOA(_)))
    }

    #[test]
    fn vm_names_resolve_with_authority_and_ra() {
        let z = zone();
        for (name, ip) in [
            ("worker0.kubevms.", [192, 168, 1, 14]),
            ("vmhost.kubevms.", [192, 168, 1, 1]),
            ("registry.kubevms.", [192, 168, 1, 5]),
        ] {
            let m = answer(&z, name, RecordType::A);
            assert_eq!(a_of(&m), [Ipv4Addr::from(ip)], "{name}");
            assert_eq!(m.metadata.response_code, ResponseCode::NoError);
            assert!(m.metadata.authoritative && m.metadata.recursion_available && m.metadata.recursion_desired);
            assert_eq!(m.metadata.id, 77);
            assert_eq!(m.queries, query(name, RecordType::A).queries);
            assert_eq!(m.answers[0].ttl, 0, "dnsmasq's local TTL");
        }
    }

    #[test]
    fn names_are_case_insensitive_and_the_trailing_dot_is_optional() {
        let z = zone();
        assert_eq!(a_of(&answer(&z, "WORKER0.KubeVMs.", RecordType::A)), [Ipv4Addr::new(192, 168, 1, 14)]);
        assert_eq!(a_of(&answer(&z, "worker0.kubevms", RecordType::A)), [Ipv4Addr::new(192, 168, 1, 14)]);
    }

    #[test]
    fn aaaa_of_an_existing_name_is_nodata_with_the_soa() {
        let m = answer(&zone(), "worker0.kubevms.", RecordType::AAAA);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty() && has_soa(&m) && m.metadata.authoritative);
    }

    #[test]
    fn unknown_names_in_the_zone_are_nxdomain_with_the_soa() {
        for name in ["worker9.kubevms.", "a.worker0.kubevms."] {
            let m = answer(&zone(), name, RecordType::A);
            assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{name}");
            assert!(has_soa(&m), "{name}");
        }
    }

    #[test]
    fn apex_soa_and_ns() {
        let z = zone();
        let soa = answer(&z, "kubevms.", RecordType::SOA);
        assert!(matches!(&soa.answers[0].data, RData::SOA(s) if s.mname.to_string() == "vmhost.kubevms."));
        let ns = answer(&z, "kubevms.", RecordType::NS);
        assert!(matches!(&ns.answers[0].data, RData::NS(n) if n.0.to_string() == "vmhost.kubevms."));
        let mut glue = ns.clone();
        glue.answers = ns.additionals.clone();
        assert_eq!(a_of(&glue), [Ipv4Addr::new(192, 168, 1, 1)]);
        let a = answer(&z, "kubevms.", RecordType::A);
        assert!(a.answers.is_empty() && has_soa(&a));
    }

    #[test]
    fn ptr_gives_the_fqdn() {
        let z = zone();
        let m = answer(&z, "14.1.168.192.in-addr.arpa.", RecordType::PTR);
        assert!(matches!(&m.answers[0].data, RData::PTR(p) if p.0.to_string() == "worker0.kubevms."));
        assert!(m.metadata.authoritative);
        let m = answer(&z, "10.1.168.192.in-addr.arpa.", RecordType::PTR);
        assert!(matches!(&m.answers[0].data, RData::PTR(p) if p.0.to_string() == "gateway.kubevms."));
        let none = answer(&z, "99.1.168.192.in-addr.arpa.", RecordType::PTR);
        assert_eq!(none.metadata.response_code, ResponseCode::NXDomain);
        assert!(has_soa(&none));
        let apex = answer(&z, "1.168.192.in-addr.arpa.", RecordType::SOA);
        assert_eq!(apex.answers.len(), 1);
    }

    #[test]
    fn single_labels_are_the_labs_or_nxdomain_never_forwarded() {
        let z = zone();
        let m = answer(&z, "worker0.", RecordType::A);
        assert_eq!(a_of(&m), [Ipv4Addr::new(192, 168, 1, 14)]);
        assert_eq!(m.answers[0].name.to_string(), "worker0.");
        let m = answer(&z, "intranet.", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    }

    #[test]
    fn private_reverse_lookups_that_are_not_ours_stay_home() {
        let z = zone();
        for name in [
            "5.0.0.10.in-addr.arpa.",
            "1.0.16.172.in-addr.arpa.",
            "1.1.31.172.in-addr.arpa.",
            "7.7.168.192.in-addr.arpa.",
            "10.in-addr.arpa.",
        ] {
            assert_eq!(answer(&z, name, RecordType::PTR).metadata.response_code, ResponseCode::NXDomain, "{name}");
        }
        // Public ranges, and 172.32/12 just outside the private block, are forwarded.
        for name in ["8.8.8.8.in-addr.arpa.", "1.0.32.172.in-addr.arpa."] {
            assert_eq!(z.decide(&query(name, RecordType::PTR)), Decision::Forward, "{name}");
        }
    }

    #[test]
    fn other_names_are_forwarded() {
        let z = zone();
        assert_eq!(z.decide(&query("deb.debian.org.", RecordType::A)), Decision::Forward);
        assert_eq!(z.decide(&query("kubevms.example.", RecordType::A)), Decision::Forward);
    }

    #[test]
    fn any_gets_a_minimal_answer() {
        let z = zone();
        assert_eq!(a_of(&answer(&z, "worker0.kubevms.", RecordType::ANY)), [Ipv4Addr::new(192, 168, 1, 14)]);
        assert_eq!(answer(&z, "kubevms.", RecordType::ANY).answers.len(), 1);
    }

    #[test]
    fn dhcp_names_join_the_zone_without_clobbering_the_labs() {
        let mut z = zone();
        z.set_dynamic([
            ("laptop", Ipv4Addr::new(192, 168, 1, 3)),
            ("worker0", Ipv4Addr::new(192, 168, 1, 4)),
            ("bad_name", Ipv4Addr::new(192, 168, 1, 6)),
        ]);
        assert_eq!(a_of(&answer(&z, "laptop.kubevms.", RecordType::A)), [Ipv4Addr::new(192, 168, 1, 3)]);
        assert_eq!(a_of(&answer(&z, "worker0.kubevms.", RecordType::A)), [Ipv4Addr::new(192, 168, 1, 14)]);
        assert!(
            matches!(&answer(&z, "3.1.168.192.in-addr.arpa.", RecordType::PTR).answers[0].data, RData::PTR(p) if p.0.to_string() == "laptop.kubevms.")
        );
        assert_eq!(
            answer(&z, "4.1.168.192.in-addr.arpa.", RecordType::PTR).metadata.response_code,
            ResponseCode::NXDomain
        );
        // The lease ends: the name goes.
        z.set_dynamic([]);
        assert_eq!(answer(&z, "laptop.kubevms.", RecordType::A).metadata.response_code, ResponseCode::NXDomain);
    }

    #[test]
    fn questions_other_than_one_query_are_refused_politely() {
        let z = zone();
        let mut two = query("worker0.kubevms.", RecordType::A);
        two.add_query(Query::query(Name::from_str("worker1.kubevms.").unwrap(), RecordType::A));
        assert!(matches!(z.decide(&two), Decision::Answer(m) if m.metadata.response_code == ResponseCode::FormErr));
        let mut notify = query("kubevms.", RecordType::SOA);
        notify.metadata.op_code = OpCode::Notify;
        assert!(matches!(z.decide(&notify), Decision::Answer(m) if m.metadata.response_code == ResponseCode::NotImp));
    }

    #[test]
    fn an_unknown_edns_version_is_badvers_with_ours_and_no_answer() {
        let z = zone();
        let mut q = query("worker0.kubevms.", RecordType::A);
        let mut e = Edns::new();
        e.set_version(1);
        e.set_dnssec_ok(true);
        q.set_edns(e);
        let Decision::Answer(m) = z.decide(&q) else { panic!("forwarded") };
        assert_eq!(m.metadata.response_code, ResponseCode::BADVERS);
        assert!(m.answers.is_empty() && !m.metadata.authoritative);
        let ours = m.edns.as_ref().unwrap();
        assert_eq!((ours.version(), ours.flags().dnssec_ok), (0, true));
        // Encoded, the high bits of 16 travel in the OPT record and the header says 0. (16 reads
        // back as BADSIG, the code's other name.)
        let wire = m.to_vec().unwrap();
        assert_eq!(wire[3] & 0x0f, 0);
        assert_eq!(u16::from(Message::from_vec(&wire).unwrap().metadata.response_code), 16);
    }

    #[test]
    fn other_opcodes_get_notimp_without_aa_or_ra() {
        let mut q = query("worker0.kubevms.", RecordType::A);
        q.metadata.op_code = OpCode::Unknown(15);
        let Decision::Answer(m) = zone().decide(&q) else { panic!("forwarded") };
        assert_eq!(m.metadata.response_code, ResponseCode::NotImp);
        assert!(!m.metadata.authoritative && !m.metadata.recursion_available);
    }

    #[test]
    fn an_unknown_opcode_is_notimp_whatever_the_question_count() {
        // No question (what an EDNS compliance checker sends), and two.
        let mut none = Message::query();
        none.metadata.op_code = OpCode::Unknown(15);
        let mut two = query("worker0.kubevms.", RecordType::A);
        two.add_query(Query::query(Name::from_str("worker1.kubevms.").unwrap(), RecordType::A));
        two.metadata.op_code = OpCode::Unknown(15);
        for q in [none, two] {
            let Decision::Answer(m) = zone().decide(&q) else { panic!("forwarded") };
            assert_eq!(m.metadata.response_code, ResponseCode::NotImp, "{} questions", q.queries.len());
            assert_eq!(m.metadata.op_code, OpCode::Unknown(15));
        }
        // A plain QUERY with no question stays FORMERR.
        let Decision::Answer(m) = zone().decide(&Message::query()) else { panic!("forwarded") };
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    }

    #[test]
    fn edns_is_echoed_with_our_payload_size() {
        let mut q = query("worker0.kubevms.", RecordType::A);
        let mut e = Edns::new();
        e.set_max_payload(4096);
        q.set_edns(e);
        let Decision::Answer(m) = zone().decide(&q) else { panic!() };
        assert_eq!(m.edns.unwrap().max_payload(), 1232);
    }

    #[test]
    fn reverse_zones_round_out_to_octets() {
        assert_eq!(reverse_zone(&"192.168.1.0/24".parse().unwrap()).to_string(), "1.168.192.in-addr.arpa.");
        assert_eq!(reverse_zone(&"10.20.0.0/16".parse().unwrap()).to_string(), "20.10.in-addr.arpa.");
        assert_eq!(reverse_zone(&"10.20.16.0/20".parse().unwrap()).to_string(), "20.10.in-addr.arpa.");
    }
}
