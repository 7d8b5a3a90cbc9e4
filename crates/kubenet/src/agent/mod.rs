//! `kubenet serve`, the root agent, and everything only it runs: the servers and their
//! sockets ([`serve`]), the control socket's server side ([`control`]), the VM supervisor
//! ([`vms`]), the Linux host network ([`hostnet`]), the host resolver ([`host_resolver`]), the
//! network faults ([`faults`]) and what a reload may change ([`reload`]). The commands reach it only through
//! [`crate::client`] and the typed protocol ([`crate::proto`]).

pub mod control;
pub mod faults;
pub mod host_resolver;
// Linux only: on macOS vmnet-shared makes the bridge and QEMU the interfaces.
#[cfg(target_os = "linux")]
pub mod hostnet;
pub mod reload;
pub mod serve;
pub mod vms;
