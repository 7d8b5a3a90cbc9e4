//! The user's commands, each run as the user: the lab's life cycle ([`lifecycle`]: setup, up,
//! down, status, destroy, image), snapshots, `ssh` on one VM or many, the console, network faults (`net`), the tmux layout, `doctor`, the
//! boot-time service, and the tables they print. What they need of the running agent they ask
//! through [`crate::client`].

pub mod console;
pub mod cp;
pub mod doctor;
pub mod lifecycle;
pub mod net;
pub mod service;
pub mod snapshot;
pub mod ssh;
pub mod table;
pub mod tmux;
