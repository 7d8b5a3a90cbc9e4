#!/usr/bin/env bash
# Benchmarks kubenet against dnsmasq serving the same lab, side by side, inside two network
# namespaces this script creates (a server and a client joined by veth). No traffic leaves them:
# both servers' upstream is a dead port inside the server's namespace, and the query mix is the
# lab's own names.
#
# DNS: dnsperf with the same query mix for both (A by FQDN and by single label, PTR, AAAA with
# no data, NXDOMAIN) for twice SECONDS_PER_RATE: queries/s, lost queries, mean and p99 latency.
#
# DHCP: perfdhcp (Kea) as a relay agent, 5000 simulated clients, at several offered rates of
# DISCOVER-OFFER-REQUEST-ACK exchanges for a fixed time each. Reported per server and rate: the
# exchanges/s completed, drops, and mean delays; then the best rate completed with < 1% drops,
# and the server's peak RSS.
#
# dnsmasq is set up as a lab user would (dhcp-host per VM, dhcp-authoritative) plus what a
# fair comparison needs: no-ping (otherwise it waits 3 s per new address), quiet-dhcp (kubenet
# runs with -q), and dhcp-lease-max raised from its default of 1000 leases.
#
# Usage: sudo bench/run.sh [SECONDS_PER_RATE] [RATES...]     (defaults: 5; 250 500 1000 2000 4000 8000)
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-5}"
shift || true
rates=("${@:-250 500 1000 2000 4000 8000}")
read -r -a rates <<<"${rates[*]}"
clients=5000

# shellcheck source=bench/lib.sh
source bench/lib.sh

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
        names=(gateway control0 control1 control2 worker0 worker1 worker2)
        printf 'dhcp-host=52:52:52:00:00:%02x,192.168.1.%d,%s\n' "$id" $((10 + id)) "${names[$id]}"
    done
} >"$work/dnsmasq.conf"

names=(gateway control0 control1 control2 worker0 worker1 worker2)
{
    echo "192.168.1.1 vmhost"
    for id in 0 1 2 3 4 5 6; do echo "192.168.1.$((10 + id)) ${names[$id]}"; done
} >"$work/hosts"

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

start_server() { # name -> sets $server_pid
    case "$1" in
    kubenet)
        mkdir -p "$work/kubenet"
        ip netns exec "$srv" "$kubenet" -q --config "$work/lab.toml" serve --no-bridge --dir "$work/kubenet" \
            >"$work/kubenet.log" 2>&1 &
        ;;
    dnsmasq)
        mkdir -p "$work/dnsmasq"
        ip netns exec "$srv" dnsmasq -k -C "$work/dnsmasq.conf" --log-facility="$work/dnsmasq.log" &
        ;;
    esac
    server_pid=$!
    pids+=("$server_pid")
    sleep 1
    kill -0 "$server_pid" || { echo "$1 did not start"; cat "$work/$1.log" 2>/dev/null; exit 1; }
}

stop_server() {
    kill "$server_pid"
    wait "$server_pid" 2>/dev/null || true
}

# perfdhcp's report -> "rate drops% offer_ms ack_ms"
perf() {
    timeout $((secs + 30)) ip netns exec "$cli" perfdhcp -4 -l 192.168.1.254 -r "$1" -R "$clients" -p "$secs" 192.168.1.1 2>&1 |
        awk '
            /^Rate:/ { rate = $2 }
            /^sent packets:/ { sent[++s] = $3 }
            /^drops:/ { drops[++d] = $2 }
            /^avg delay:/ { delay[++a] = $3 }
            END {
                # Drops over the whole exchange: lost DISCOVERs plus lost REQUESTs, per DISCOVER sent.
                pct = sent[1] ? 100 * (drops[1] + drops[2]) / sent[1] : 100
                printf "%.0f %.2f %s %s\n", rate, pct, delay[1], delay[2]
            }'
}

# dnsperf's report -> "qps lost mean_ms p99_ms"
dnsbench() {
    timeout $((secs * 2 + 30)) ip netns exec "$cli" dnsperf -s 192.168.1.1 -d "$work/queries" -l $((secs * 2)) -c 8 -q 200 -v \
        >"$work/dnsperf.out" 2>&1 || true
    p99=$(awk '/^> / { print $NF }' "$work/dnsperf.out" | sort -n | awk '{ v[NR] = $1 } END { i = int(NR * 0.99); if (i < 1) i = 1; printf "%.3f", v[i] * 1000 }')
    awk -v p99="$p99" '
        /Queries per second:/ { qps = $4 }
        /Queries lost:/ { lost = $3 }
        /Average Latency/ { mean = $4 * 1000 }
        END { printf "%.0f %s %.3f %s\n", qps, lost, mean, p99 }' "$work/dnsperf.out"
}

declare -A result best rss_dhcp rss_dns dns
# Each phase on a fresh server with fresh state, so that neither inherits the other's backlog.
for server in kubenet dnsmasq; do
    rm -rf "${work:?}/$server"
    start_server "$server"
    dns[$server]=$(dnsbench)
    rss_dns[$server]=$(awk '/VmHWM/ { print $2 }' "/proc/$server_pid/status")
    stop_server

    rm -rf "${work:?}/$server"
    start_server "$server"
    best[$server]=0
    for r in "${rates[@]}"; do
        read -r got pct offer ack < <(perf "$r")
        result[$server,$r]="$got $pct $offer $ack"
        if awk -v p="$pct" 'BEGIN { exit !(p < 1) }' && [ "$got" -gt "${best[$server]}" ]; then
            best[$server]=$got
        fi
    done
    rss_dhcp[$server]=$(awk '/VmHWM/ { print $2 }' "/proc/$server_pid/status")
    stop_server
done

echo
echo "DHCP: perfdhcp relay mode, $clients clients, ${secs}s per rate (exchanges = DISCOVER-OFFER-REQUEST-ACK)"
printf '%-8s | %-38s | %-38s\n' "offered" "kubenet: done/s  drops  offer/ack ms" "dnsmasq: done/s  drops  offer/ack ms"
for r in "${rates[@]}"; do
    read -r kg kp ko ka <<<"${result[kubenet,$r]}"
    read -r dg dp do da <<<"${result[dnsmasq,$r]}"
    printf '%-8s | %7s/s %6s%% %7s / %-7s      | %7s/s %6s%% %7s / %-7s\n' "$r/s" "$kg" "$kp" "$ko" "$ka" "$dg" "$dp" "$do" "$da"
done
ratio=$(awk -v k="${best[kubenet]}" -v d="${best[dnsmasq]}" 'BEGIN { if (d > 0) printf "%.1fx", k / d; else print "n/a" }')
printf 'best rate with < 1%% drops: kubenet %s/s, dnsmasq %s/s (%s)\n' "${best[kubenet]}" "${best[dnsmasq]}" "$ratio"
printf 'peak RSS after the DHCP runs: kubenet %s kB, dnsmasq %s kB\n' "${rss_dhcp[kubenet]}" "${rss_dhcp[dnsmasq]}"

read -r kq kl km kp <<<"${dns[kubenet]}"
read -r dq dl dm dp <<<"${dns[dnsmasq]}"
echo
echo "DNS: dnsperf, lab names only (A FQDN and single label, PTR, AAAA NODATA, NXDOMAIN), $((secs * 2))s"
printf '%-10s | %10s | %6s | %8s | %8s\n' server "queries/s" lost "mean ms" "p99 ms"
printf '%-10s | %10s | %6s | %8s | %8s\n' kubenet "$kq" "$kl" "$km" "$kp" dnsmasq "$dq" "$dl" "$dm" "$dp"
awk -v k="$kq" -v d="$dq" 'BEGIN { if (d > 0) printf "kubenet/dnsmasq queries/s: %.2fx\n", k / d }'
printf 'peak RSS after the DNS run: kubenet %s kB, dnsmasq %s kB\n' "${rss_dns[kubenet]}" "${rss_dns[dnsmasq]}"
