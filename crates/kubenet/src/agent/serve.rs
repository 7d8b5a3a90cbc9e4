//! `kubenet serve`: the host agent. Binds every socket before it says "ready", then runs the
//! servers until SIGINT or SIGTERM.

use crate::agent::faults::{Backend, Switch};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use kubenet_cluster::Lab;
use kubenet_dhcp::server::Server;
use kubenet_dns::{Dns, Forwarder, Zone};
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use kubenet_vm::owner::Owner;

use crate::cli::ServeArgs;

/// `owner`: the lab's owner as resolved (or why not: then no VM starts); `files_owner`: whose
/// rights the agent's files in the owner's folders are made with, the owner even without a
/// user entry ([`Owner::bare`]).
pub fn run(
    lab: Lab,
    files_owner: Owner,
    owner: Result<Owner, String>,
    args: &ServeArgs,
    reload: &Reload,
) -> anyhow::Result<()> {
    // One thread for the control socket, DNS over TCP and the VMs; the packet loops (DNS over
    // UDP, DHCP) have a thread each ([`spawn_loop`]). No pool of workers idles beside them.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the runtime")?;
    rt.block_on(serve(lab, files_owner, owner, args, reload))
}

/// Runs a packet loop on a thread of its own, with a single-threaded runtime: its sockets
/// wake that thread and no other, so no packet waits for a hand-off between threads. The
/// future is first polled on the new thread, so the sockets it makes from std ones register
/// with that thread's runtime. A loop that fails stops the whole agent through `shutdown`; so
/// does one that panics, logged, rather than leave the agent up without it.
///
/// `files_as`: the owner whose file-system identity the thread takes for its whole life (the
/// DHCP loop, which writes the lease file in the owner's folder: a link anywhere on that path
/// then reaches only what the owner could write).
fn spawn_loop<F>(
    name: &str,
    shutdown: CancellationToken,
    files_as: Option<Owner>,
    serve: F,
) -> std::io::Result<std::thread::JoinHandle<std::io::Result<()>>>
where
    F: std::future::Future<Output = std::io::Result<()>> + Send + 'static,
{
    let thread = name.to_owned();
    std::thread::Builder::new().name(name.into()).spawn(move || {
        let run = || {
            if let Some(owner) = &files_as {
                owner.adopt_on_this_thread().map_err(std::io::Error::other)?;
            }
            tokio::runtime::Builder::new_current_thread().enable_all().build().and_then(|rt| rt.block_on(serve))
        };
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)).unwrap_or_else(|payload| {
            let why = crate::agent::control::panic_message(payload.as_ref());
            tracing::error!("the {thread} loop panicked: {why}");
            Err(std::io::Error::other(format!("panicked: {why}")))
        });
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

/// Reads the lab definition again (SIGHUP, `kubenet reload`), as the owner.
pub type Reload<'a> = dyn Fn() -> anyhow::Result<Lab> + 'a;

async fn serve(
    lab: Lab,
    files_owner: Owner,
    owner: Result<Owner, String>,
    args: &ServeArgs,
    reload: &Reload<'_>,
) -> anyhow::Result<()> {
    // The agent's own files in the owner's folders (the state directory, the control socket,
    // the lease file) are made and read with `files_owner`'s rights (kubenet_vm::owner).
    // Before any port: a second agent for the same lab would otherwise fail on port 53 and blame
    // some other DNS server. Asked as the owner (the socket is in the owner's folder), briefly.
    if let Some(other) = files_owner.run_as(|| crate::client::probe(&lab.state_dir))? {
        anyhow::bail!(
            "kubenet serve is already running for {} (pid {}): use that one, or stop it first",
            lab.state_dir.display(),
            other.pid
        );
    }
    state_dir_of(&lab, &files_owner)?;
    // Linux: the bridge and taps vmnet-shared gives macOS. Built first, so that the lab's host
    // address exists when the servers say "ready"; taken down after them, whatever the reason
    // they stopped, unless VMs still run on it.
    #[cfg(target_os = "linux")]
    let net = if args.no_bridge {
        None
    } else {
        Some(crate::agent::hostnet::HostNet::apply(crate::agent::hostnet::plan(&lab, files_owner.uid)).await?)
    };
    // The lab as served, reloads included: the teardown below counts its VMs, not the ones
    // there were at the start (a VM a reload added may still run on its tap).
    let current = Arc::new(Mutex::new(lab.clone()));
    #[cfg(target_os = "linux")]
    let backend = fault_backend(&lab, net.is_some());
    #[cfg(not(target_os = "linux"))]
    let backend = fault_backend(&lab, false);
    let switch = Arc::new(Switch::new(backend, current.clone()));
    let result = match bind(&lab, args, &files_owner) {
        Ok(bound) => run_bound(bound, current.clone(), owner, args, reload, switch.clone()).await,
        Err(e) => Err(e),
    };
    // No fault outlives the agent, whatever VMs keep running.
    if let Err(e) = switch.clear() {
        tracing::warn!("cannot clear the network faults: {e}");
    }
    #[cfg(target_os = "linux")]
    if let Some(net) = net {
        let lab = current.lock().expect("lab lock").clone();
        let running = kubenet_vm::process::states(&lab).iter().filter(|s| s.run.pid().is_some()).count();
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

/// Makes the state directory (as its owner) and checks it is the owner's alone. The lab's
/// interfaces and nftables table are marked with it: one that is not the owner's (another
/// user's lab) is not this owner's to serve. Nor one others may write (as sshd's StrictModes):
/// they could plant what root reads there. Group-writable is the owner's own business when the
/// group is the owner's (the private group a umask of 002 leaves writable on Debian and Ubuntu).
fn state_dir_of(lab: &Lab, files_owner: &Owner) -> anyhow::Result<()> {
    files_owner
        .run_as(|| std::fs::create_dir_all(&lab.state_dir))?
        .with_context(|| format!("cannot create the state directory {}", lab.state_dir.display()))?;
    let meta = std::fs::metadata(&lab.state_dir)?;
    let (holder, mode, group) = {
        use std::os::unix::fs::MetadataExt;
        (meta.uid(), meta.mode(), meta.gid())
    };
    let others_write = mode & 0o002 != 0 || (mode & 0o020 != 0 && group != files_owner.gid);
    if holder != files_owner.uid {
        anyhow::bail!(
            "the state directory {} belongs to uid {holder}, not to the lab's owner (uid {}): serve a lab of your own",
            lab.state_dir.display(),
            files_owner.uid
        );
    }
    if others_write {
        anyhow::bail!(
            "the state directory {} can be written by others than its owner (mode {:o}): `chmod go-w {}`",
            lab.state_dir.display(),
            mode & 0o7777,
            lab.state_dir.display()
        );
    }
    Ok(())
}

/// Where network faults (`kubenet net`) go: the lab's own bridge on Linux (`bridged` false:
/// `--no-bridge`, none to act on).
#[cfg(target_os = "linux")]
fn fault_backend(lab: &Lab, bridged: bool) -> Backend {
    if bridged {
        Backend::Linux { mark: crate::agent::hostnet::mark(&lab.state_dir) }
    } else {
        Backend::Unavailable("kubenet serve runs with --no-bridge: network faults need the lab's own bridge".into())
    }
}

/// Where network faults (`kubenet net`) go: vmnet's bridge on macOS.
#[cfg(not(target_os = "linux"))]
fn fault_backend(_lab: &Lab, _bridged: bool) -> Backend {
    if cfg!(target_vendor = "apple") {
        Backend::MacOs
    } else {
        Backend::Unavailable("network faults are for Linux and macOS".into())
    }
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
    /// The user who may use the control socket besides root: the lab's owner.
    owner_uid: u32,
    /// Each removes what it made when `serve` ends, whatever the reason.
    _control_file: crate::agent::control::Removal,
    _host_resolver: Option<crate::agent::host_resolver::Applied>,
}

/// The DHCP server, ready to run, and the channels into it.
struct DhcpBound {
    server: Server,
    socket: std::net::UdpSocket,
    /// New engine configurations (reloads).
    configs: UnboundedSender<kubenet_dhcp::Config>,
    /// Requests for the active leases (the control socket).
    leases: UnboundedSender<kubenet_dhcp::server::LeaseQuery>,
    /// Whose rights the DHCP thread writes the lease file with.
    files_as: Owner,
}

/// Binds DNS first (DHCP hands out this server's address as the resolver), then DHCP, the host
/// resolver and the control socket.
fn bind(lab: &Lab, args: &ServeArgs, owner: &Owner) -> anyhow::Result<Bound> {
    let (udp, tcp) = kubenet_dns::server::bind(SocketAddr::new(args.dns_listen, args.dns_port))?;
    let dns_addr = udp.local_addr()?;
    let forwarder = Forwarder::new(upstreams(lab, dns_addr), kubenet_dns::forward::UPSTREAM_TIMEOUT);
    // Only the lab's interface and loopback are served (kubenet_dns::admit). The lab's
    // interface is known now on Linux; a query from an interface DNS does not know makes it
    // look again (macOS's vmnet bridge appears with the first VM, and is made anew).
    let network = lab.clone();
    let admit = kubenet_dns::Admit::lab_and_loopback(lab_interface(lab))
        .context("finding the loopback interface")?
        .finding(move || lab_interface(&network));
    let dns = Dns::with_admit(Zone::from_lab(lab, lab.dns.local_ttl), forwarder, lab.dns.allow.clone(), admit);
    let active_leases = Arc::new(AtomicUsize::new(0));
    let dhcp = if args.dns_only { None } else { Some(bind_dhcp(lab, args, &dns, &active_leases, owner)?) };
    let host_resolver = if args.host_resolver { Some(host_resolver(lab, args, dns_addr)?) } else { None };
    let (control, control_file) = crate::agent::control::bind(&lab.state_dir, owner)?;
    Ok(Bound {
        dns,
        dns_addr,
        dns_udp: udp.into_std()?,
        dns_tcp: tcp,
        dhcp,
        active_leases,
        control,
        owner_uid: owner.uid,
        _control_file: control_file,
        _host_resolver: host_resolver,
    })
}

/// The lab's interface as it is now: the one holding the host's address, with the lab's prefix.
fn lab_interface(lab: &Lab) -> Option<kubenet_dns::LabInterface> {
    let host = std::net::IpAddr::V4(lab.network.host_address);
    let ifindex = kubenet_udp::addresses().into_iter().find(|a| a.address == host && a.index != 0)?.index;
    let address = ipnet::Ipv4Net::new(lab.network.host_address, lab.network.subnet.prefix_len()).ok()?;
    Some(kubenet_dns::LabInterface { ifindex, address })
}

/// Reads the lease file, binds the DHCP port and wires the server to DNS and `status`.
fn bind_dhcp(
    lab: &Lab,
    args: &ServeArgs,
    dns: &Arc<Dns>,
    active: &Arc<AtomicUsize>,
    owner: &Owner,
) -> anyhow::Result<DhcpBound> {
    let lease_file = lab.lease_file();
    // Read, as it is later written (the DHCP thread), with the owner's rights.
    let (leases, bad) = owner
        .run_as(|| kubenet_dhcp::lease::load(&lease_file, kubenet_cluster::state::unix_now()))?
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
    Ok(DhcpBound { server, socket, configs, leases, files_as: owner.clone() })
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
fn host_resolver(
    lab: &Lab,
    args: &ServeArgs,
    dns_addr: SocketAddr,
) -> anyhow::Result<crate::agent::host_resolver::Applied> {
    let os = crate::agent::host_resolver::Os::HOST.context("--host-resolver knows macOS and Linux only")?;
    let lab_address = std::net::IpAddr::V4(lab.network.host_address);
    let served = if dns_addr.ip().is_unspecified() { lab_address } else { dns_addr.ip() };
    let link = crate::agent::host_resolver::link_holding(served);
    let plan = crate::agent::host_resolver::plan(
        os,
        &lab.network.domain,
        dns_addr,
        lab_address,
        link.as_deref(),
        &args.resolver_dir,
    )?;
    crate::agent::host_resolver::apply(plan)
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
    owner: Result<Owner, String>,
    args: &ServeArgs,
    reload: &Reload<'_>,
    net: Arc<Switch>,
) -> anyhow::Result<()> {
    // Every port is bound: packets from here on wait in their sockets until the loops start.
    log_ready(&current.lock().expect("lab lock"), &b)?;
    let Bound {
        dns,
        dns_addr: _,
        dns_udp,
        dns_tcp,
        dhcp,
        active_leases,
        control,
        owner_uid,
        _control_file,
        _host_resolver,
    } = b;
    let shutdown = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    let mut threads: Vec<LoopThread> = vec![spawn_dns(&dns, dns_udp, dns_tcp, &shutdown, &mut tasks)?];
    tokio::spawn(stop_on_signal(shutdown.clone()));
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;

    let (reload_tx, mut reload_rx) = tokio::sync::mpsc::unbounded_channel::<crate::agent::control::ReloadRequest>();
    let shared = Arc::new(crate::agent::control::Shared {
        owner: owner_uid,
        status: Box::new(status_report(dns.clone(), active_leases, current.clone())),
        leases: dhcp.as_ref().map(|d| d.leases.clone()),
        reloads: reload_tx,
        vms: crate::agent::vms::Supervisor::new(current.clone(), owner, !args.no_bridge),
        net: net.clone(),
    });
    tasks.spawn(crate::agent::control::serve(control, shared, shutdown.clone()));
    let dhcp_configs = dhcp.as_ref().map(|d| d.configs.clone());
    if let Some(d) = dhcp {
        let files_as = Some(d.files_as.clone());
        threads.push(("DHCP", spawn_loop("dhcp", shutdown.clone(), files_as, run_dhcp(d, shutdown.clone()))?));
    }

    // Under systemd (Type=notify): every port is bound. Elsewhere NOTIFY_SOCKET is unset and
    // this does nothing.
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!("cannot tell the service manager we are ready: {e}");
    }
    let start = current.lock().expect("lab lock").clone();
    // Under the network faults' lock: see `Switch::reload`.
    let reload_now = || net.reload(|| reload_lab(&start, &current, reload, &dns, dhcp_configs.as_ref()));
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
    let result = join(threads, result);
    log_stopped(&dns);
    result
}

/// DNS: over UDP in a thread of its own, over TCP in the agent's runtime.
fn spawn_dns(
    dns: &Arc<Dns>,
    udp: std::net::UdpSocket,
    tcp: tokio::net::TcpListener,
    shutdown: &CancellationToken,
    tasks: &mut tokio::task::JoinSet<std::io::Result<()>>,
) -> anyhow::Result<LoopThread> {
    let (udp_dns, stop) = (dns.clone(), shutdown.clone());
    let thread = spawn_loop("dns-udp", shutdown.clone(), None, async move {
        udp_dns.serve_udp(tokio::net::UdpSocket::from_std(udp)?, stop).await
    })?;
    tasks.spawn(dns.clone().serve_tcp(tcp, shutdown.clone()));
    Ok(("DNS over UDP", thread))
}

/// A packet loop's thread, named for the log.
type LoopThread = (&'static str, std::thread::JoinHandle<std::io::Result<()>>);

/// Waits for the packet loops' threads; the first failure (after `result`'s) is the result.
fn join(threads: Vec<LoopThread>, mut result: anyhow::Result<()>) -> anyhow::Result<()> {
    for (what, thread) in threads {
        match thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = result.and(Err(anyhow::Error::new(e).context(what))),
            Err(_) => result = result.and(Err(anyhow::anyhow!("the {what} thread panicked"))),
        }
    }
    result
}

/// DNS's totals at the stop, key=value (tests and users grep them).
fn log_stopped(dns: &Dns) {
    let t = dns.totals();
    tracing::info!(
        queries = t.queries,
        local = t.local,
        forwarded = t.forwarded,
        cache_hits = t.cache_hits,
        servfail = t.servfail,
        refused = t.refused,
        malformed = t.malformed,
        outside = t.outside,
        "stopped"
    );
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

/// Re-reads the lab and swaps in what of it may change live ([`crate::agent::reload::served`], held
/// to `start`, the lab `serve` started with); a broken or unsafe edit keeps the running lab.
/// The answer goes to `kubenet reload`.
fn reload_lab(
    start: &Lab,
    current: &Mutex<Lab>,
    reload: &Reload<'_>,
    dns: &Dns,
    dhcp: Option<&UnboundedSender<kubenet_dhcp::Config>>,
) -> crate::agent::control::ReloadResult {
    let new = reload().and_then(|new| {
        let served = crate::agent::reload::served(start, &new).map_err(anyhow::Error::msg)?;
        Ok((new, served))
    });
    match new {
        Ok((new, served)) => {
            let mut cur = current.lock().expect("lab lock");
            let later = apply_reload(&cur, &new, &served, dns, dhcp);
            let source = served.source.clone();
            *cur = served;
            Ok((source, later))
        }
        // A broken edit must not take the lab down: keep serving what was loaded.
        Err(e) => {
            tracing::error!("reload failed, still serving the previous configuration:\n{e:#}");
            Err(format!("reload refused, still serving the previous definition: {e:#}"))
        }
    }
}

/// Swaps in a reloaded lab, `served` of the file's `new`: the zone at once, the DHCP engine's
/// config through its channel (whose lease hook then puts the clients' names back into the new
/// zone). Sockets, leases and the forwarder stay. Returns what only a restart can change
/// ([`crate::agent::reload::diff`] of the file against what runs), as warnings, also logged.
fn apply_reload(
    old: &Lab,
    new: &Lab,
    served: &Lab,
    dns: &Dns,
    dhcp: Option<&UnboundedSender<kubenet_dhcp::Config>>,
) -> Vec<String> {
    dns.update_zone(|z| *z = Zone::from_lab(served, served.dns.local_ttl));
    if let Some(tx) = dhcp {
        let _ = tx.send(kubenet_dhcp::Config::from_lab(served));
    }
    let diff = crate::agent::reload::diff(old, new);
    let later = diff.warnings();
    for w in &later {
        tracing::warn!("{w}");
    }
    tracing::info!(changed = diff.live.join(","), vms = served.vms.len(), "reloaded {}", served.source);
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
