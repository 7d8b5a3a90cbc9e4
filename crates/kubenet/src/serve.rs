//! `kubenet serve`: the host agent. Binds every socket before it says "ready", then runs the
//! servers until SIGINT or SIGTERM.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use kubenet_cluster::Lab;
use kubenet_dhcp::server::Server;
use kubenet_dns::{Dns, Forwarder, Zone};
use tokio_util::sync::CancellationToken;

use crate::cli::ServeArgs;

pub fn run(lab: Lab, args: &ServeArgs, reload: &dyn Fn() -> anyhow::Result<Lab>) -> anyhow::Result<()> {
    // One thread for the control socket, DNS over TCP and the VMs; the packet loops (DNS over
    // UDP, DHCP) have a thread each ([`spawn_loop`]). No pool of workers idles beside them.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the runtime")?;
    rt.block_on(serve(lab, args, reload))
}

/// Runs a packet loop on a thread of its own, with a single-threaded runtime: its sockets
/// wake that thread and no other, so no packet waits for a hand-off between threads. The
/// future is first polled on the new thread, so the sockets it makes from std ones register
/// with that thread's runtime. A loop that fails stops the whole agent through `shutdown`.
fn spawn_loop<F>(
    name: &str,
    shutdown: CancellationToken,
    serve: F,
) -> std::io::Result<std::thread::JoinHandle<std::io::Result<()>>>
where
    F: std::future::Future<Output = std::io::Result<()>> + Send + 'static,
{
    std::thread::Builder::new().name(name.into()).spawn(move || {
        let r = tokio::runtime::Builder::new_current_thread().enable_all().build().and_then(|rt| rt.block_on(serve));
        if r.is_err() {
            shutdown.cancel();
        }
        r
    })
}

/// Where forwarded queries go: the lab's `upstream`, else the host's resolvers; never this
/// server itself.
fn upstreams(lab: &Lab, listen: SocketAddr) -> Vec<SocketAddr> {
    let configured = if lab.network.upstream.is_empty() {
        let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        kubenet_dns::forward::parse_resolv_conf(&text)
    } else {
        lab.network.upstream.clone()
    };
    let kept = kubenet_dns::server::without_self(&configured, listen, &kubenet_dns::server::host_addresses());
    for dropped in configured.iter().filter(|u| !kept.contains(u)) {
        tracing::warn!(upstream = %dropped, "not forwarding to {dropped}: that is this server itself");
    }
    if kept.is_empty() {
        tracing::warn!("no upstream DNS server: names outside the lab will get SERVFAIL (set network.upstream)");
    }
    kept
}

async fn serve(lab: Lab, args: &ServeArgs, reload: &dyn Fn() -> anyhow::Result<Lab>) -> anyhow::Result<()> {
    // Before any port: a second agent for the same lab would otherwise fail on port 53 and blame
    // some other DNS server.
    if let Ok(other) = crate::control::status(&lab.state_dir) {
        anyhow::bail!(
            "kubenet serve is already running for {} (pid {}): use that one, or stop it first",
            lab.state_dir.display(),
            other.pid
        );
    }
    std::fs::create_dir_all(&lab.state_dir)
        .with_context(|| format!("cannot create the state directory {}", lab.state_dir.display()))?;
    // Linux: the bridge and taps vmnet-shared gives macOS. Built first, so that the lab's host
    // address exists when the servers say "ready"; taken down after them, whatever the reason
    // they stopped, unless VMs still run on it.
    #[cfg(target_os = "linux")]
    let net = if args.no_bridge {
        None
    } else {
        Some(crate::hostnet::HostNet::apply(crate::hostnet::plan(&lab, crate::control::owner().0)).await?)
    };
    // The lab as served, reloads included: the teardown below counts its VMs, not the ones
    // there were at the start (a VM a reload added may still run on its tap).
    let current = Arc::new(Mutex::new(lab.clone()));
    let result = servers(current.clone(), args, reload).await;
    #[cfg(target_os = "linux")]
    if let Some(net) = net {
        let lab = current.lock().expect("lab lock").clone();
        let running = crate::vms::states(&lab).iter().filter(|s| s.run.pid().is_some()).count();
        if running == 0 {
            net.remove().await;
        } else {
            tracing::warn!(
                "kept {} and its taps: {running} VMs still run on them (`kubenet down`, then stop serve again to remove them)",
                lab.network.bridge
            );
        }
    }
    result
}

async fn servers(
    current: Arc<Mutex<Lab>>,
    args: &ServeArgs,
    reload: &dyn Fn() -> anyhow::Result<Lab>,
) -> anyhow::Result<()> {
    let lab = current.lock().expect("lab lock").clone();
    let shutdown = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();

    // DNS first: DHCP hands out this server's address as the resolver.
    let dns_addr = SocketAddr::new(args.dns_listen, args.dns_port);
    let (udp, tcp) = kubenet_dns::server::bind(dns_addr)?;
    let dns_addr = udp.local_addr()?;
    let forwarder = Forwarder::new(upstreams(&lab, dns_addr), kubenet_dns::forward::UPSTREAM_TIMEOUT);
    let dns = Dns::new(Zone::from_lab(&lab, lab.dns.local_ttl), forwarder, lab.dns.allow.clone());
    let udp = udp.into_std()?;
    let (udp_dns, udp_stop) = (dns.clone(), shutdown.clone());
    let udp_thread = spawn_loop("dns-udp", shutdown.clone(), async move {
        udp_dns.serve_udp(tokio::net::UdpSocket::from_std(udp)?, udp_stop).await
    })?;
    tasks.spawn(dns.clone().serve_tcp(tcp, shutdown.clone()));

    // Active leases, counted by the lease hook for `status`; the list itself is asked of the
    // DHCP server when the control socket wants it.
    let active_leases = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut lease_queries = None;
    let mut dhcp = None;
    let mut dhcp_configs = None;
    if !args.dns_only {
        let lease_file = lab.lease_file();
        let now = kubenet_cluster::state::unix_now();
        let (leases, bad) = kubenet_dhcp::lease::load(&lease_file, now)
            .with_context(|| format!("cannot read the lease file {}", lease_file.display()))?;
        if bad > 0 {
            tracing::warn!("{}: skipped {bad} lines that are not leases", lease_file.display());
        }
        let socket = kubenet_dhcp::server::bind(SocketAddrV4::new(args.dhcp_listen, args.dhcp_port))?;
        let engine = kubenet_dhcp::Engine::new(kubenet_dhcp::Config::from_lab(&lab), leases);
        let mut server = Server::new(engine, lease_file);
        // Clients' own names (option 12) join the zone while their leases live.
        let zone_dns = dns.clone();
        let count = active_leases.clone();
        server.on_leases(Box::new(move |table, changes| {
            // Expired leases leave the table within a minute: its size is the active count.
            count.store(table.len(), std::sync::atomic::Ordering::Relaxed);
            if !changes.names {
                return;
            }
            let now = kubenet_cluster::state::unix_now();
            let names: Vec<(String, Ipv4Addr)> =
                table.iter().filter(|l| l.active(now)).filter_map(|l| l.hostname.clone().map(|h| (h, l.ip))).collect();
            zone_dns.update_zone(|z| z.set_dynamic(names.iter().map(|(h, ip)| (h.as_str(), *ip))));
        }));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        server.lease_queries(rx);
        lease_queries = Some(tx);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        server.reloads(rx);
        dhcp_configs = Some(tx);
        dhcp = Some((server, socket));
    }

    // Undone when this function returns, whatever the reason.
    let _host_resolver = if args.host_resolver {
        let os = crate::host_resolver::Os::current().context("--host-resolver knows macOS and Linux only")?;
        let lab_address = std::net::IpAddr::V4(lab.network.host_address);
        let served = if dns_addr.ip().is_unspecified() { lab_address } else { dns_addr.ip() };
        let link = crate::host_resolver::link_holding(served);
        let plan = crate::host_resolver::plan(
            os,
            &lab.network.domain,
            dns_addr,
            lab_address,
            link.as_deref(),
            &args.resolver_dir,
        )?;
        Some(crate::host_resolver::apply(plan)?)
    } else {
        None
    };

    tokio::spawn(stop_on_signal(shutdown.clone()));
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;

    // The control socket, for the user who ran sudo.
    let (owner_uid, owner_gid) = crate::control::owner();
    let (listener, _socket_file) = crate::control::bind(&lab.state_dir, (owner_uid, owner_gid))?;
    let (reload_tx, mut reload_rx) = tokio::sync::mpsc::unbounded_channel::<crate::control::ReloadRequest>();
    let status = {
        let (dns, leases, current) = (dns.clone(), active_leases.clone(), current.clone());
        move || {
            use std::sync::atomic::Ordering::Relaxed;
            let lab = current.lock().expect("lab lock");
            let f = dns.forwarder().stats();
            crate::control::proto::StatusReport {
                version: env!("CARGO_PKG_VERSION").into(),
                pid: std::process::id(),
                config: lab.source.clone(),
                state_dir: lab.state_dir.clone(),
                vms: lab.vms.len(),
                leases: leases.load(Relaxed),
                dns: crate::control::proto::DnsCounters {
                    queries: dns.counters.queries.load(Relaxed),
                    local: dns.counters.local.load(Relaxed),
                    forwarded: f.forwarded,
                    cache_hits: f.cache_hits,
                    servfail: f.servfail,
                    refused: dns.counters.refused.load(Relaxed),
                },
            }
        }
    };
    let shared = Arc::new(crate::control::Shared {
        owner: owner_uid,
        status: Box::new(status),
        leases: lease_queries,
        reloads: reload_tx,
        vms: crate::vms::Supervisor::new(current.clone(), (owner_uid, owner_gid), !args.no_bridge),
    });
    tasks.spawn(crate::control::serve(listener, shared, shutdown.clone()));

    let upstream: Vec<String> = dns.forwarder().upstreams().iter().map(ToString::to_string).collect();
    match &dhcp {
        Some((d, socket)) => tracing::info!(
            dns = %dns_addr,
            dhcp = %socket.local_addr()?,
            subnet = %lab.network.subnet,
            vms = lab.vms.len(),
            upstream = upstream.join(","),
            leases = %lab.lease_file().display(),
            active = d.engine().leases().len(),
            "ready"
        ),
        None => {
            tracing::info!(dns = %dns_addr, domain = %lab.network.domain, upstream = upstream.join(","), "ready (DNS only)")
        }
    }

    // Under systemd (Type=notify): every port is bound. Elsewhere NOTIFY_SOCKET is unset and
    // this does nothing.
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!("cannot tell the service manager we are ready: {e}");
    }

    let reload_now = |current: &Mutex<Lab>| -> crate::control::ReloadResult {
        match reload() {
            Ok(new) => {
                let mut cur = current.lock().expect("lab lock");
                let later = apply_reload(&cur, &new, &dns, dhcp_configs.as_ref());
                let source = new.source.clone();
                *cur = new;
                Ok((source, later))
            }
            // A broken edit must not take the lab down: keep serving what was loaded.
            Err(e) => {
                tracing::error!("reload failed, still serving the previous configuration:\n{e:#}");
                Err(format!("reload refused, still serving the previous definition: {e:#}"))
            }
        }
    };
    let mut dhcp_thread = None;
    if let Some((mut server, socket)) = dhcp {
        let stop = shutdown.clone();
        dhcp_thread = Some(spawn_loop("dhcp", shutdown.clone(), async move {
            let r = server.run(&tokio::net::UdpSocket::from_std(socket)?, stop).await;
            let s = server.engine().stats;
            let c = &server.counters;
            tracing::info!(
                offers = s.offers,
                acks = s.acks,
                naks = s.naks,
                malformed = c.malformed_total(),
                foreign = c.foreign,
                "DHCP stopped"
            );
            r
        })?);
    }
    // The first server to fail stops the others; a clean stop ends them all. SIGHUP reloads.
    let mut result = Ok(());
    loop {
        tokio::select! {
            r = tasks.join_next() => match r {
                None => break,
                Some(r) => if let Err(e) = r.context("server task").and_then(|r| r.context("server")) {
                    shutdown.cancel();
                    result = Err(e);
                },
            },
            _ = hangups.recv() => { let _ = reload_now(&current); }
            Some(reply) = reload_rx.recv() => { let _ = reply.send(reload_now(&current)); }
        }
    }
    // The loops' own failures cancelled `shutdown` already; a clean stop reaches them here.
    shutdown.cancel();
    for (what, thread) in std::iter::once(("DNS over UDP", udp_thread)).chain(dhcp_thread.map(|t| ("DHCP", t))) {
        match thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = result.and(Err(anyhow::Error::new(e).context(what))),
            Err(_) => result = result.and(Err(anyhow::anyhow!("the {what} thread panicked"))),
        }
    }
    let f = dns.forwarder().stats();
    let c = &dns.counters;
    use std::sync::atomic::Ordering::Relaxed;
    tracing::info!(
        queries = c.queries.load(Relaxed),
        local = c.local.load(Relaxed),
        forwarded = f.forwarded,
        cache_hits = f.cache_hits,
        servfail = f.servfail,
        refused = c.refused.load(Relaxed),
        malformed = c.malformed.load(Relaxed),
        "stopped"
    );
    result
}

/// Swaps in a reloaded lab: the zone at once, the DHCP engine's config through its channel
/// (whose lease hook then puts the clients' names back into the new zone). Sockets, leases and
/// the forwarder stay. Returns what only a restart can change ([`needs_restart`]), also logged.
fn apply_reload(
    old: &Lab,
    new: &Lab,
    dns: &Dns,
    dhcp: Option<&tokio::sync::mpsc::UnboundedSender<kubenet_dhcp::Config>>,
) -> Vec<String> {
    dns.update_zone(|z| *z = Zone::from_lab(new, new.dns.local_ttl));
    if let Some(tx) = dhcp {
        let _ = tx.send(kubenet_dhcp::Config::from_lab(new));
    }
    let later = needs_restart(old, new);
    for w in &later {
        tracing::warn!("{w}");
    }
    tracing::info!(vms = new.vms.len(), hosts = new.network.hosts.len(), "reloaded {}", new.source);
    later
}

/// The changes between `old` and `new` a reload cannot make while `serve` runs, one message per
/// field: what binds sockets, builds the host network, picks the forwarder's upstreams or the
/// VMs' host profile at start. Names, addresses and VMs (the zone, the leases) do change live.
pub fn needs_restart(old: &Lab, new: &Lab) -> Vec<String> {
    let (o, n) = (&old.network, &new.network);
    let fields = [
        ("state_dir", old.state_dir != new.state_dir),
        ("network.subnet", o.subnet != n.subnet),
        ("network.host_address", o.host_address != n.host_address),
        ("network.bridge", o.bridge != n.bridge),
        ("network.nat", o.nat != n.nat),
        ("network.upstream", o.upstream != n.upstream),
        ("dns.allow", old.dns.allow != new.dns.allow),
        ("accelerator", old.accelerator != new.accelerator),
        ("firmware", old.firmware != new.firmware),
    ];
    fields
        .iter()
        .filter(|(_, changed)| *changed)
        .map(|(name, _)| {
            format!("{name} changed: it takes effect when kubenet serve restarts (until then the old value holds)")
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_names_what_waits_for_a_restart() {
        let old = kubenet_cluster::load(&kubenet_cluster::Choice::Embedded, std::path::Path::new("/lab")).unwrap();
        let mut new = old.clone();
        assert!(needs_restart(&old, &new).is_empty());
        new.network.hosts.clear();
        new.vms.pop();
        assert!(needs_restart(&old, &new).is_empty(), "names and VMs change live");
        new.network.upstream = vec!["192.0.2.53:53".parse().unwrap()];
        new.network.nat = !old.network.nat;
        new.accelerator = kubenet_cluster::Accelerator::Tcg;
        let later = needs_restart(&old, &new);
        let names: Vec<&str> = later.iter().map(|w| w.split(' ').next().unwrap()).collect();
        assert_eq!(names, ["network.nat", "network.upstream", "accelerator"]);
        assert!(later[0].ends_with("it takes effect when kubenet serve restarts (until then the old value holds)"));
    }
}
