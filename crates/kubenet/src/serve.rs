//! `kubenet serve`: the host agent. Binds every socket before it says "ready", then runs the
//! servers until SIGINT or SIGTERM.

use std::net::SocketAddrV4;
use std::time::SystemTime;

use anyhow::Context;
use kubenet_cluster::Lab;
use kubenet_dhcp::server::{Server, bind};
use kubenet_dhcp::{Config, Engine};
use tokio_util::sync::CancellationToken;

use crate::cli::ServeArgs;

pub fn run(lab: Lab, args: &ServeArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(serve(lab, args))
}

async fn serve(lab: Lab, args: &ServeArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&lab.state_dir)
        .with_context(|| format!("cannot create the state directory {}", lab.state_dir.display()))?;
    let lease_file = lab.lease_file();
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH)?.as_secs();
    let (leases, bad) = kubenet_dhcp::lease::load(&lease_file, now)
        .with_context(|| format!("cannot read the lease file {}", lease_file.display()))?;
    if bad > 0 {
        tracing::warn!("{}: skipped {bad} lines that are not leases", lease_file.display());
    }
    let addr = SocketAddrV4::new(args.dhcp_listen, args.dhcp_port);
    let socket = bind(addr)?;
    let mut dhcp = Server::new(socket, Engine::new(Config::from_lab(&lab), leases), lease_file.clone());
    if !args.no_bridge {
        tracing::debug!("host networking (bridge, taps, NAT) is not built yet; serving on the interfaces that exist");
    }
    tracing::info!(
        dhcp = %dhcp.local_addr()?,
        subnet = %lab.network.subnet,
        vms = lab.vms.len(),
        leases = %lease_file.display(),
        active = dhcp.engine().leases().len(),
        "ready"
    );

    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    dhcp.run(shutdown).await.context("DHCP server")?;

    let s = dhcp.engine().stats;
    let c = &dhcp.counters;
    tracing::info!(
        offers = s.offers,
        acks = s.acks,
        naks = s.naks,
        malformed = c.malformed_total(),
        foreign = c.foreign,
        "stopped"
    );
    Ok(())
}

async fn stop_on_signal(token: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
        tracing::error!("cannot install signal handlers; stop kubenet serve with SIGKILL");
        return;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stopping");
    token.cancel();
}
