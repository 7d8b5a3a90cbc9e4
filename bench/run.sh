#!/usr/bin/env bash
# Benchmarks kubenet against dnsmasq serving the same lab, side by side, inside two network
# namespaces this script creates (a server and a client joined by veth). No traffic leaves them:
# both servers' upstream is a dead port inside the server's namespace, and the query mix is the
# lab's own names. A do-nothing responder (bench/null-responder.c) runs the same phases first:
# its figures are the harness's ceiling, so a total near it says the load generator, not the
# server, was the limit.
#
# The server runs pinned to one CPU and the load generator to the other, so the server's CPU
# time (from /proc/PID/stat over each phase) gives its cost per packet whatever the generator
# can offer. Each run starts every server afresh (in an order that rotates from run to run) and
# sends, for SECONDS each:
#   DNS    dnsperf, as fast as it goes (8 clients, 200 in flight), then at a fixed 10,000 qps
#          (mean and p99 latency from each answer's time)
#   DHCP   perfdhcp as a relay agent, DISCOVER-OFFER-REQUEST-ACK exchanges, in two shapes:
#          lab   the reference lab's 7 fixed MACs (perfdhcp -M), as VMs renewing
#          pool  5000 random clients leasing from a /16 pool
#          each as fast as it goes (20,000/s offered), then at a fixed 1000/s (mean exchange
#          latency = mean DISCOVER-OFFER + mean REQUEST-ACK delay)
# and reads the server's peak RSS (VmHWM) after all of them, and what its RSS is made of then:
# private memory (RssAnon) and pages of mapped files, its binary and libraries (RssFile).
# Figures are medians of RUNS runs; every run's raw figures stay in a folder whose path is
# printed. Then, once per server: idle cost (voluntary context switches of all its threads and
# CPU ticks over IDLE seconds, no traffic), kubenet's start-up (exec to READY=1 on
# NOTIFY_SOCKET, without the host network), and one fsync on the state's disk, the unit of the
# DHCP latency target.
#
# dnsmasq is set up as a lab user would (dhcp-host per VM, dhcp-authoritative) plus what a
# fair comparison needs: no-ping (otherwise it waits 3 s per new address), quiet-dhcp (kubenet
# runs with -q), and dhcp-lease-max raised from its default of 1000 leases.
#
# Usage: sudo bench/run.sh [SECONDS] [RUNS]     (defaults: 5 3; IDLE=60 seconds of idle watch)
#        BEFORE=path/to/an/older/kubenet sudo -E bench/run.sh ...
#                                               adds that build's column, run in the same hour
#                                               (the idle and start-up rows stay this build's)
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-5}"
runs="${2:-3}"
idle="${IDLE:-60}"

# shellcheck source=bench/lib.sh
source bench/lib.sh

raw=$(mktemp -d /tmp/kubenet-bench.XXXXXX)
gcc -O2 -o "$work/null-responder" bench/null-responder.c
tck=$(getconf CLK_TCK)
if [ "$(nproc)" -ge 2 ]; then
    on_server=(taskset -c 0)
    on_load=(taskset -c 1)
    pinning="server on CPU 0, load generator on CPU 1"
else
    on_server=()
    on_load=()
    pinning="one CPU: server and load generator share it (figures per CPU-second still hold)"
fi

names=(gateway control0 control1 control2 worker0 worker1 worker2)
{
    cat <<EOF
no-resolv
server=127.0.0.1#5399
no-hosts
addn-hosts=$work/hosts
local=/kubevms/
expand-hosts
domain-needed
bogus-priv
interface=kbs0
bind-interfaces
dhcp-authoritative
no-ping
quiet-dhcp
dhcp-lease-max=100000
dhcp-range=192.168.100.1,192.168.199.254,255.255.0.0,12h
dhcp-option=option:router,192.168.1.1
dhcp-option=option:dns-server,192.168.1.1
domain=kubevms
dhcp-leasefile=$work/dnsmasq/leases
EOF
    for id in 0 1 2 3 4 5 6; do
        printf 'dhcp-host=52:52:52:00:00:%02x,192.168.1.%d,%s\n' "$id" $((10 + id)) "${names[$id]}"
    done
} >"$work/dnsmasq.conf"
{
    echo "192.168.1.1 vmhost"
    for id in 0 1 2 3 4 5 6; do echo "192.168.1.$((10 + id)) ${names[$id]}"; done
} >"$work/hosts"
for id in 0 1 2 3 4 5 6; do printf '52:52:52:00:00:%02x\n' "$id"; done >"$work/lab-macs"

cat >"$work/queries" <<'EOF'
worker0.kubevms A
control1 A
14.1.168.192.in-addr.arpa PTR
worker0.kubevms AAAA
nope.kubevms A
gateway.kubevms A
vmhost A
11.1.168.192.in-addr.arpa PTR
EOF

# Starts server $1 on the server CPU with fresh state; sets $dns_pid and $dhcp_pid (the same
# process, except for the null responder, which is one process per protocol).
start_server() {
    rm -rf "${work:?}/$1"
    mkdir -p "$work/$1"
    case "$1" in
    kubenet | before)
        local bin="$kubenet"
        [ "$1" = kubenet ] || bin="$BEFORE"
        ip netns exec "$srv" "${on_server[@]}" "$bin" -q --config "$work/lab.toml" serve --no-bridge \
            --dir "$work/$1" >"$work/$1.log" 2>&1 &
        dns_pid=$!
        dhcp_pid=$dns_pid
        ;;
    dnsmasq)
        ip netns exec "$srv" "${on_server[@]}" dnsmasq -k -C "$work/dnsmasq.conf" --log-facility="$work/dnsmasq.log" &
        dns_pid=$!
        dhcp_pid=$dns_pid
        ;;
    null)
        ip netns exec "$srv" "${on_server[@]}" "$work/null-responder" dns 192.168.1.1 53 &
        dns_pid=$!
        pids+=("$dns_pid")
        ip netns exec "$srv" "${on_server[@]}" "$work/null-responder" dhcp 192.168.1.1 &
        dhcp_pid=$!
        ;;
    esac
    pids+=("$dhcp_pid")
    [ "$dns_pid" = "$dhcp_pid" ] || pids+=("$dns_pid")
    sleep 1
    kill -0 "$dns_pid" && kill -0 "$dhcp_pid" || {
        echo "$1 did not start"
        cat "$work/$1.log" 2>/dev/null
        exit 1
    }
}

stop_server() {
    kill "$dns_pid" "$dhcp_pid" 2>/dev/null || true
    wait "$dns_pid" "$dhcp_pid" 2>/dev/null || true
    pids=()
}

# Voluntary context switches of all of process $1's threads: each is a wake-up from a sleep.
switches() { cat /proc/"$1"/task/*/status | awk '/^voluntary_ctxt_switches/ { n += $2 } END { print n }'; }

ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

# record SERVER METRIC VALUE: one raw figure of this run.
record() { echo "$1 $2 $3" >>"$raw/run$run.txt"; }

# DNS phase: $1 server name, $2 "sat" or a fixed rate in queries/s.
dns_phase() {
    local t0 t1 out="$raw/run$run-$1-dns-$2.txt" args=(-c 8 -q 200)
    [ "$2" = sat ] || args=(-Q "$2" -v)
    t0=$(ticks "$dns_pid")
    timeout $((secs + 30)) ip netns exec "$cli" "${on_load[@]}" dnsperf -s 192.168.1.1 -d "$work/queries" \
        -l "$secs" "${args[@]}" >"$out" 2>&1 || true
    t1=$(ticks "$dns_pid")
    local done lost qps mean
    done=$(awk '/Queries completed:/ { print $3 }' "$out")
    lost=$(awk '/Queries lost:/ { print $3 }' "$out")
    qps=$(awk '/Queries per second:/ { printf "%.0f", $4 }' "$out")
    mean=$(awk '/Average Latency/ { printf "%.3f", $4 * 1000 }' "$out")
    record "$1" "dns_$2_qps" "$qps"
    record "$1" "dns_$2_lost" "$lost"
    record "$1" "dns_$2_cpu_us" "$(awk -v t=$((t1 - t0)) -v h="$tck" -v n="$done" 'BEGIN { printf "%.2f", n ? t / h * 1e6 / n : 0 }')"
    record "$1" "dns_$2_per_core" "$(awk -v t=$((t1 - t0)) -v h="$tck" -v n="$done" 'BEGIN { printf "%.0f", t ? n / (t / h) : 0 }')"
    if [ "$2" != sat ]; then
        record "$1" "dns_$2_mean_ms" "$mean"
        record "$1" "dns_$2_p99_ms" "$(awk '/^> / { print $NF }' "$out" | sort -n |
            awk '{ v[NR] = $1 } END { i = int(NR * 0.99); if (i < 1) i = 1; printf "%.3f", v[i] * 1000 }')"
        # -v writes every answer; keep the summary only.
        grep -v '^> ' "$out" >"$out.tmp" && mv "$out.tmp" "$out"
    fi
}

# DHCP phase: $1 server name, $2 shape (lab or pool), $3 "sat" or a fixed rate in exchanges/s.
dhcp_phase() {
    local t0 t1 out="$raw/run$run-$1-dhcp-$2-$3.txt" who=(-M "$work/lab-macs") rate=20000
    [ "$2" = lab ] || who=(-R 5000)
    [ "$3" = sat ] || rate=$3
    t0=$(ticks "$dhcp_pid")
    timeout $((secs + 30)) ip netns exec "$cli" "${on_load[@]}" perfdhcp -4 -l 192.168.1.254 -r "$rate" "${who[@]}" \
        -p "$secs" 192.168.1.1 >"$out" 2>&1 || true
    t1=$(ticks "$dhcp_pid")
    # perfdhcp prints one block for DISCOVER-OFFER, then one for REQUEST-ACK.
    read -r acks pct latency < <(awk '
        /^sent packets:/ { sent[++s] = $3 }
        /^received packets:/ { got[++g] = $3 }
        /^drops:/ { drops[++d] = $2 }
        /^avg delay:/ { delay[++a] = $3 }
        END {
            pct = sent[1] ? 100 * (drops[1] + drops[2]) / sent[1] : 100
            printf "%d %.2f %.3f\n", got[2], pct, delay[1] + delay[2]
        }' "$out")
    record "$1" "dhcp_$2_$3_per_s" "$(awk -v n="$acks" -v s="$secs" 'BEGIN { printf "%.0f", n / s }')"
    record "$1" "dhcp_$2_$3_drops_pct" "$pct"
    record "$1" "dhcp_$2_$3_cpu_us" "$(awk -v t=$((t1 - t0)) -v h="$tck" -v n="$acks" 'BEGIN { printf "%.1f", n ? t / h * 1e6 / n : 0 }')"
    record "$1" "dhcp_$2_$3_per_core" "$(awk -v t=$((t1 - t0)) -v h="$tck" -v n="$acks" 'BEGIN { printf "%.0f", t ? n / (t / h) : 0 }')"
    [ "$3" = sat ] || record "$1" "dhcp_$2_$3_mean_ms" "$latency"
}

servers=(null kubenet dnsmasq)
if [ -n "${BEFORE:-}" ]; then
    [ -x "$BEFORE" ] || { echo "BEFORE=$BEFORE is not an executable"; exit 2; }
    servers+=(before)
fi
for run in $(seq 1 "$runs"); do
    # Each run starts one server further along the list, so a disturbance that recurs with
    # the period of a run (this VM has them) does not land on the same server every time.
    order=("${servers[@]:$(((run - 1) % ${#servers[@]}))}" "${servers[@]:0:$(((run - 1) % ${#servers[@]}))}")
    for s in "${order[@]}"; do
        echo "run $run/$runs: $s" >&2
        start_server "$s"
        dns_phase "$s" sat
        dns_phase "$s" 10000
        for shape in lab pool; do
            dhcp_phase "$s" "$shape" sat
            dhcp_phase "$s" "$shape" 1000
        done
        if [ "$s" != null ]; then
            for f in VmHWM RssAnon RssFile; do
                record "$s" "rss_$f" "$(awk -v f="$f:" '$1 == f { print $2 }' "/proc/$dhcp_pid/status")"
            done
        fi
        stop_server
    done
done

# Once per server: idle cost and start-up.
for s in kubenet dnsmasq; do
    echo "idle: $s for ${idle}s" >&2
    start_server "$s"
    sleep 1
    c0=$(switches "$dhcp_pid")
    t0=$(ticks "$dhcp_pid")
    sleep "$idle"
    c1=$(switches "$dhcp_pid")
    t1=$(ticks "$dhcp_pid")
    echo "$s idle_wakeups_per_s $(awk -v c=$((c1 - c0)) -v s="$idle" 'BEGIN { printf "%.2f", c / s }')" >>"$raw/once.txt"
    echo "$s idle_cpu_ticks $((t1 - t0))" >>"$raw/once.txt"
    echo "$s idle_rss_RssAnon $(awk '$1 == "RssAnon:" { print $2 }' "/proc/$dhcp_pid/status")" >>"$raw/once.txt"
    stop_server
done
rm -rf "${work:?}/kubenet"
mkdir -p "$work/kubenet"
for i in $(seq 1 "$runs"); do
    ip netns exec "$srv" python3 - "$work/notify" "$kubenet" -q --config "$work/lab.toml" serve --no-bridge \
        --dir "$work/kubenet" <<'EOF' >>"$raw/ready.txt"
import os, socket, subprocess, sys, time
path = sys.argv[1]
if os.path.exists(path):
    os.unlink(path)
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(path)
s.settimeout(10)
t0 = time.monotonic()
p = subprocess.Popen(sys.argv[2:], env=dict(os.environ, NOTIFY_SOCKET=path),
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    while b"READY=1" not in s.recv(4096):
        pass
    print("%.1f" % ((time.monotonic() - t0) * 1000))
finally:
    p.terminate()
    p.wait()
EOF
done
echo "kubenet ready_ms $(sort -n "$raw/ready.txt" | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }')" >>"$raw/once.txt"
python3 - "$work" <<'EOF' >>"$raw/once.txt"
import os, sys, time
path = os.path.join(sys.argv[1], "fsync-probe")
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
times = []
for _ in range(200):
    os.write(fd, b"1767225600 52:52:52:00:00:04 192.168.1.14 worker0 *\n")
    t = time.perf_counter()
    os.fsync(fd)
    times.append(time.perf_counter() - t)
os.close(fd)
os.unlink(path)
times.sort()
print("disk fsync_ms %.3f" % (times[len(times) // 2] * 1000))
EOF

# The table: each figure the median of the runs.
cat "$raw"/run*.txt "$raw/once.txt" | awk -v runs="$runs" -v secs="$secs" -v pinning="$pinning" -v raw="$raw" \
    -v before="${BEFORE:-}" '
    { v[$1, $2, ++n[$1, $2]] = $3 }
    function med(s, m,    k, i, j, t, a) {
        k = n[s, m]
        if (!k) return ""
        for (i = 1; i <= k; i++) a[i] = v[s, m, i]
        for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
        return a[int((k + 1) / 2)]
    }
    function ratio(m, better,    k, d) {
        k = med("kubenet", m); d = med("dnsmasq", m)
        if (k == "" || d == "" || k + 0 == 0 || d + 0 == 0) return ""
        return sprintf("%.2fx", better == "high" ? k / d : d / k)
    }
    function row(label, m, better) {
        printf "%-44s %11s %11s %11s %9s", label, med("null", m), med("kubenet", m), med("dnsmasq", m), ratio(m, better)
        printf before == "" ? "\n" : sprintf(" %11s\n", med("before", m))
    }
    END {
        printf "kubenet bench: %s s per phase, medians of %s runs; %s\n", secs, runs, pinning
        printf "(x: how many times better kubenet is; null: a do-nothing responder, the harness ceiling)\n\n"
        printf "%-44s %11s %11s %11s %9s", "", "null", "kubenet", "dnsmasq", "k vs d"
        printf before == "" ? "\n" : sprintf(" %11s\n", "before")
        print "DNS, the lab names"
        row("  saturated: queries/s", "dns_sat_qps", "high")
        row("  saturated: queries per server CPU-second", "dns_sat_per_core", "high")
        row("  saturated: server CPU us per query", "dns_sat_cpu_us", "low")
        row("  saturated: queries lost", "dns_sat_lost", "low")
        row("  at 10000 qps: mean latency ms", "dns_10000_mean_ms", "low")
        row("  at 10000 qps: p99 latency ms", "dns_10000_p99_ms", "low")
        row("  at 10000 qps: server CPU us per query", "dns_10000_cpu_us", "low")
        row("  at 10000 qps: queries lost", "dns_10000_lost", "low")
        split("lab pool", shapes, " ")
        for (i = 1; i <= 2; i++) {
            sh = shapes[i]
            print (sh == "lab" ? "DHCP, lab shape: the 7 VM MACs" : "DHCP, pool shape: 5000 clients from a /16 pool")
            row("  saturated: exchanges/s", "dhcp_" sh "_sat_per_s", "high")
            row("  saturated: exchanges per server CPU-second", "dhcp_" sh "_sat_per_core", "high")
            row("  saturated: drops %", "dhcp_" sh "_sat_drops_pct", "low")
            row("  at 1000/s: mean exchange latency ms", "dhcp_" sh "_1000_mean_ms", "low")
            row("  at 1000/s: server CPU us per exchange", "dhcp_" sh "_1000_cpu_us", "low")
            row("  at 1000/s: drops %", "dhcp_" sh "_1000_drops_pct", "low")
        }
        print "Server"
        # The memory figure: private memory, what the agent really costs; peak RSS also counts
        # file-backed pages (the binary, libraries) that the kernel shares and reclaims.
        row("  private memory kB (RssAnon) at idle", "idle_rss_RssAnon", "low")
        row("  private memory kB (RssAnon) after all phases (5,000 leases)", "rss_RssAnon", "low")
        row("  for information: peak RSS kB (VmHWM)", "rss_VmHWM", "low")
        row("  for information: mapped files kB (RssFile) after all phases", "rss_RssFile", "low")
        row("  idle: wakeups/s (voluntary switches)", "idle_wakeups_per_s", "")
        row("  idle: CPU ticks over the idle watch", "idle_cpu_ticks", "")
        row("  start: exec to ready ms", "ready_ms", "")
        printf "one fsync on the state disk: %s ms (median of 200)\n", med("disk", "fsync_ms")
        if (before != "") printf "before: %s\n", before
        printf "raw figures of every run: %s\n", raw
    }'
