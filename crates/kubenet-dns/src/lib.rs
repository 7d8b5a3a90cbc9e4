//! kubenet's DNS server: the lab's names, answered with authority, and everything else
//! forwarded through a cache to the host's resolvers.
//!
//! Layout:
//! - `zone`: the lab's forward and reverse zones, and which queries must never be forwarded
//!   (pure: a query in, a decision out).
//! - `message`: the reply skeleton and OPT record, EDNS limits, UDP encoding, the access list
//!   and the answer cache's key (pure; uses no other module).
//! - `request`: one request's fate, `handle`: parse, access list, zone (pure).
//! - `forward`: the upstream resolvers and the cache (I/O: sockets to the upstreams).
//! - `server`: UDP and TCP serving, the access list, truncation (I/O).
//!
//! Wire format from hickory-proto. The serving loop is kubenet's own rather than
//! hickory-server's: its forwarder clears the FQDN flag (so search domains get appended), its
//! local answers lack RA, and its wildcard UDP socket can answer from the wrong source address
//! (hickory#3401); each is a behaviour kubenet has to own.

pub mod forward;
pub mod message;
pub mod request;
pub mod server;
pub mod zone;

pub use forward::Forwarder;
pub use server::Dns;
pub use zone::{Decision, Zone};
