//! kubenet's DNS server: the lab's names, answered with authority, and everything else
//! forwarded through a cache to the host's resolvers.
//!
//! Layout:
//! - `zone`: the lab's forward and reverse zones, and which queries must never be forwarded
//!   (pure: a query in, a decision out).
//! - `message`: the reply skeleton and OPT record, EDNS limits, UDP encoding, the access list
//!   and the answer cache's key (pure; uses no other module).
//! - `request`: one request's fate, `handle`: parse, access list, zone (pure).
//! - `admit`: which queries the server takes at all, by the interface they came in on (the
//!   lab's, loopback) or the address they were sent to (pure; the caller passes it in).
//! - `forward`: the upstream resolvers and the cache (I/O: sockets to the upstreams).
//! - `server`: UDP and TCP serving, the source policy and access list, truncation, and the
//!   bounds on what clients can make it hold (I/O).
//!
//! Wire format from hickory-proto. The serving loop is kubenet's own rather than
//! hickory-server's: its forwarder clears the FQDN flag (so search domains get appended), its
//! local answers lack RA, and its wildcard UDP socket can answer from the wrong source address
//! (hickory#3401); each is a behaviour kubenet has to own.

pub mod admit;
pub mod forward;
pub mod message;
pub mod request;
pub mod server;
pub mod zone;

pub use admit::{Admit, LabInterface};
pub use forward::Forwarder;
pub use server::Dns;
pub use zone::{Decision, Zone};
