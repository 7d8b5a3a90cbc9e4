//! kubenet's DHCPv4 server: every VM gets its fixed address, name and the lab's options on the
//! first try; other machines get pool addresses that never collide with a VM's.
//!
//! Layout:
//! - `wire`: datagram checks before dhcproto sees a byte, and reply encoding (pure).
//! - `engine`: RFC 2131 decisions: request in, reply and destination out (pure).
//! - `lease`: the lease table and its dnsmasq-format file, written atomically.
//! - `server`: the UDP socket, per-packet interface, the receive loop (I/O).
//! - `throttle`: at most one warning of a kind per period, for what packets trigger (pure).

pub mod engine;
pub mod lease;
pub mod server;
pub mod throttle;
pub mod wire;

pub use engine::{Config, Destination, Engine, Foreign, Outcome, Received, Reply, Stats};
pub use lease::{Lease, LeaseTable};
pub use wire::{Malformed, Request, decode_request};
