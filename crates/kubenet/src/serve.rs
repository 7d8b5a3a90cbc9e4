//! `kubenet serve`: the host agent. Binds every socket before it says "ready", then runs the
//! servers until SIGINT or SIGTERM.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use kubenet_cluster::Lab;
use kubenet_dhcp::server::Server;
use kubenet_dns::{Dns, Forwarder, Zone};
use tokio::sync::mpsc::UnboundedSender;
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

/// Where forwarded queries go ([`kubenet_dns::forward::choose_upstreams`]), with what it
/// needs from the host: its resolv.conf and its addresses.
fn upstreams(lab: &Lab, listen: SocketAddr) -> Vec<SocketAddr> {
    let resolv_conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let own: Vec<std::net::IpAddr> = kubenet_udp::addresses().into_iter().map(|a| a.address).collect();
    let chosen = kubenet_dns::forward::choose_upstreams(&lab.network.upstream, &resolv_conf, listen, &own);
    for dropped in &chosen.dropped {
        tracing::warn!(upstream = %dropped, "not forwarding to {dropped}: that is this server itself");
    }
    if chosen.kept.is_empty() {
        tracing::warn!("no upstream DNS server: names outside the lab will get SERVFAIL (set network.upstream)");
    }
    chosen.kept
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
    let result = match bind(&lab, args) {
        Ok(bound) => run_bound(bound, current.clone(), args, reload).await,
        Err(e) => Err(e),
    };
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

/// What `serve` holds once every socket is bound, before anything is served. Binding can fail
/// (a busy port, a bad lease file); once this exists, only serving is left.
struct Bound {
    dns: Arc<Dns>,
    dns_addr: SocketAddr,
    dns_udp: std::net::UdpSocket,
    dns_tcp: tokio::net::TcpListener,
    /// None with `--dns-only`.
    dhcp: Option<DhcpBound>,
    /// Active leases, counted by the lease hook for `status`.
    active_leases: Arc<AtomicUsize>,
    control: tokio::net::UnixListener,
    /// Each removes what it made when `serve` ends, whatever the reason.
    _control_file: crate::control::Removal,
    _host_resolver: Option<crate::host_resolver::Applied>,
}

/// The DHCP server, ready to run, and the channels into it.
struct DhcpBound {
    server: Server,
    socket: std::net::UdpSocket,
    /// New engine configurations (reloads).
    configs: UnboundedSender<kubenet_dhcp::Config>,
    /// Requests for the active leases (the control socket).
    leases: UnboundedSender<kubenet_dhcp::server::LeaseQuery>,
}

/// Binds DNS first (DHCP hands out this server's address as the resolver), then DHCP, the host
/// resolver and the control socket.
fn bind(lab: &Lab, args: &ServeArgs) -> anyhow::Result<Bound> {
    let (udp, tcp) = kubenet_dns::server::bind(SocketAddr::new(args.dns_listen, args.dns_port))?;
    let dns_addr = udp.local_addr()?;
    let forwarder = Forwarder::new(upstreams(lab, dns_addr), kubenet_dns::forward::UPSTREAM_TIMEOUT);
    let dns = Dns::new(Zone::from_lab(lab, lab.dns.local_ttl), forwarder, lab.dns.allow.clone());
    let active_leases = Arc::new(AtomicUsize::new(0));
    let dhcp = if args.dns_only { None } else { Some(bind_dhcp(lab, args, &dns, &active_leases)?) };
    let host_resolver = if args.host_resolver { Some(host_resolver(lab, args, dns_addr)?) } else { None };
    let (control, control_file) = crate::control::bind(&lab.state_dir, crate::control::owner())?;
    Ok(Bound {
        dns,
        dns_addr,
        dns_udp: udp.into_std()?,
        dns_tcp: tcp,
        dhcp,
        active_leases,
        control,
        _control_file: control_file,
        _host_resolver: host_resolver,
    })
}

/// Reads the lease file, binds the DHCP port and wires the server to DNS and `status`.
fn bind_dhcp(lab: &Lab, args: &ServeArgs, dns: &Arc<Dns>, active: &Arc<AtomicUsize>) -> anyhow::Result<DhcpBound> {
    let lease_file = lab.lease_file();
    let (leases, bad) = kubenet_dhcp::lease::load(&lease_file, kubenet_cluster::state::unix_now())
        .with_context(|| format!("cannot read the lease file {}", lease_file.display()))?;
    if bad > 0 {
        tracing::warn!("{}: skipped {bad} lines that are not leases", lease_file.display());
    }
    let socket = kubenet_dhcp::server::bind(SocketAddrV4::new(args.dhcp_listen, args.dhcp_port))?;
    let engine = kubenet_dhcp::Engine::new(kubenet_dhcp::Config::from_lab(lab), leases);
    let mut server = Server::new(engine, lease_file);
    server.on_leases(lease_hook(dns.clone(), active.clone()));
    let (leases, rx) = tokio::sync::mpsc::unbounded_channel();
    server.lease_queries(rx);
    let (configs, rx) = tokio::sync::mpsc::unbounded_channel();
    server.reloads(rx);
    Ok(DhcpBound { server, socket, configs, leases })
}

/// After each lease change on disk: the active count for `status`, and clients' own names
/// (option 12) into the zone while their leases live.
fn lease_hook(dns: Arc<Dns>, count: Arc<AtomicUsize>) -> kubenet_dhcp::server::LeaseHook {
    Box::new(move |table, changes| {
        // Expired leases leave the table within a minute: its size is the active count.
        count.store(table.len(), Ordering::Relaxed);
        if !changes.names {
            return;
        }
        let now = kubenet_cluster::state::unix_now();
        let names: Vec<(String, Ipv4Addr)> =
            table.iter().filter(|l| l.active(now)).filter_map(|l| l.hostname.clone().map(|h| (h, l.ip))).collect();
        dns.update_zone(|z| z.set_dynamic(names.iter().map(|(h, ip)| (h.as_str(), *ip))));
    })
}

/// Points the host's resolver at the lab's domain (`--host-resolver`); undone when dropped.
fn host_resolver(lab: &Lab, args: &ServeArgs, dns_addr: SocketAddr) -> anyhow::Result<crate::host_resolver::Applied> {
    let os = crate::host_resolver::Os::HOST.context("--host-resolver knows macOS and Linux only")?;
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
    crate::host_resolver::apply(plan)
}

/// What `kubenet status` shows of the running agent.
fn status_report(
    dns: Arc<Dns>,
    leases: Arc<AtomicUsize>,
    current: Arc<Mutex<Lab>>,
) -> impl Fn() -> crate::proto::StatusReport + Send + Sync {
    move || {
        let lab = current.lock().expect("lab lock");
        crate::proto::StatusReport {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            config: lab.source.clone(),
            state_dir: lab.state_dir.clone(),
            vms: lab.vms.len(),
            leases: leases.load(Ordering::Relaxed),
            dns: dns.totals().into(),
        }
    }
}

fn log_ready(lab: &Lab, b: &Bound) -> anyhow::Result<()> {
    let upstream: Vec<String> = b.dns.forwarder().upstreams().iter().map(ToString::to_string).collect();
    match &b.dhcp {
        Some(d) => tracing::info!(
            dns = %b.dns_addr,
            dhcp = %d.socket.local_addr()?,
            subnet = %lab.network.subnet,
            vms = lab.vms.len(),
            upstream = upstream.join(","),
            leases = %lab.lease_file().display(),
            active = d.server.engine().leases().len(),
            "ready"
        ),
        None => tracing::info!(
            dns = %b.dns_addr,
            domain = %lab.network.domain,
            upstream = upstream.join(","),
            "ready (DNS only)"
        ),
    }
    Ok(())
}

/// Serves what [`bind`] bound until SIGINT or SIGTERM, or until one server fails (which stops
/// the others). SIGHUP and `kubenet reload` re-read the lab.
async fn run_bound(
    b: Bound,
    current: Arc<Mutex<Lab>>,
    args: &ServeArgs,
    reload: &dyn Fn() -> anyhow::Result<Lab>,
) -> anyhow::Result<()> {
    // Every port is bound: packets from here on wait in their sockets until the loops start.
    log_ready(&current.lock().expect("lab lock"), &b)?;
    let Bound { dns, dns_addr: _, dns_udp, dns_tcp, dhcp, active_leases, control, _control_file, _host_resolver } = b;
    let shutdown = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    let (udp_dns, stop) = (dns.clone(), shutdown.clone());
    let mut threads = vec![(
        "DNS over UDP",
        spawn_loop("dns-udp", shutdown.clone(), async move {
            udp_dns.serve_udp(tokio::net::UdpSocket::from_std(dns_udp)?, stop).await
        })?,
    )];
    tasks.spawn(dns.clone().serve_tcp(dns_tcp, shutdown.clone()));
    tokio::spawn(stop_on_signal(shutdown.clone()));
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;

    let owner = crate::control::owner();
    let (reload_tx, mut reload_rx) = tokio::sync::mpsc::unbounded_channel::<crate::control::ReloadRequest>();
    let shared = Arc::new(crate::control::Shared {
        owner: owner.0,
        status: Box::new(status_report(dns.clone(), active_leases, current.clone())),
        leases: dhcp.as_ref().map(|d| d.leases.clone()),
        reloads: reload_tx,
        vms: crate::vms::Supervisor::new(current.clone(), owner, !args.no_bridge),
    });
    tasks.spawn(crate::control::serve(control, shared, shutdown.clone()));
    let dhcp_configs = dhcp.as_ref().map(|d| d.configs.clone());
    if let Some(d) = dhcp {
        threads.push(("DHCP", spawn_loop("dhcp", shutdown.clone(), run_dhcp(d, shutdown.clone()))?));
    }

    // Under systemd (Type=notify): every port is bound. Elsewhere NOTIFY_SOCKET is unset and
    // this does nothing.
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!("cannot tell the service manager we are ready: {e}");
    }
    match crate::memory::shed_start_up_pages() {
        Ok(bytes) => tracing::debug!(bytes, "start-up's code unmapped"),
        Err(e) => tracing::debug!("cannot unmap start-up's code: {e}"),
    }
    let reload_now = || reload_lab(&current, reload, &dns, dhcp_configs.as_ref());
    // The first server to fail stops the others; a clean stop ends them all.
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
            _ = hangups.recv() => { let _ = reload_now(); }
            Some(reply) = reload_rx.recv() => { let _ = reply.send(reload_now()); }
        }
    }
    // The loops' own failures cancelled `shutdown` already; a clean stop reaches them here.
    shutdown.cancel();
    for (what, thread) in threads {
        match thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = result.and(Err(anyhow::Error::new(e).context(what))),
            Err(_) => result = result.and(Err(anyhow::anyhow!("the {what} thread panicked"))),
        }
    }
    let t = dns.totals();
    tracing::info!(
        queries = t.queries,
        local = t.local,
        forwarded = t.forwarded,
        cache_hits = t.cache_hits,
        servfail = t.servfail,
        refused = t.refused,
        malformed = t.malformed,
        "stopped"
    );
    result
}

/// The DHCP loop, for its own thread: serves until `shutdown`, then logs its totals.
async fn run_dhcp(d: DhcpBound, shutdown: CancellationToken) -> std::io::Result<()> {
    let DhcpBound { mut server, socket, .. } = d;
    let r = server.run(&tokio::net::UdpSocket::from_std(socket)?, shutdown).await;
    let (s, c) = (server.engine().stats, &server.counters);
    tracing::info!(
        offers = s.offers,
        acks = s.acks,
        naks = s.naks,
        malformed = c.malformed_total(),
        foreign = c.foreign,
        "DHCP stopped"
    );
    r
}

/// Re-reads the lab and swaps it in; a broken edit keeps the running lab. The answer goes to
/// `kubenet reload`.
fn reload_lab(
    current: &Mutex<Lab>,
    reload: &dyn Fn() -> anyhow::Result<Lab>,
    dns: &Dns,
    dhcp: Option<&UnboundedSender<kubenet_dhcp::Config>>,
) -> crate::control::ReloadResult {
    match reload() {
        Ok(new) => {
            let mut cur = current.lock().expect("lab lock");
            let later = apply_reload(&cur, &new, dns, dhcp);
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
}

/// Swaps in a reloaded lab: the zone at once, the DHCP engine's config through its channel
/// (whose lease hook then puts the clients' names back into the new zone). Sockets, leases and
/// the forwarder stay. Returns what only a restart can change ([`crate::reload::diff`]), as
/// warnings, also logged.
fn apply_reload(old: &Lab, new: &Lab, dns: &Dns, dhcp: Option<&UnboundedSender<kubenet_dhcp::Config>>) -> Vec<String> {
    dns.update_zone(|z| *z = Zone::from_lab(new, new.dns.local_ttl));
    if let Some(tx) = dhcp {
        let _ = tx.send(kubenet_dhcp::Config::from_lab(new));
    }
    let diff = crate::reload::diff(old, new);
    let later = diff.warnings();
    for w in &later {
        tracing::warn!("{w}");
    }
    tracing::info!(changed = diff.live.join(","), vms = new.vms.len(), "reloaded {}", new.source);
    later
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
