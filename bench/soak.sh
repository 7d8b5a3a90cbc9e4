#!/usr/bin/env bash
# A bounded soak of kubenet serve: DNS and DHCP load at once, from a client namespace, for a
# fixed time (default 60 s), rate-limited to a load the server sustains. Fails (exit 1) if a DNS
# query is lost, if 1% or more of DHCP exchanges drop, or if the server's RSS grows by more than
# 1 MiB after the warm-up (the first third of the run, while the lease table fills).
# Nothing leaves the two namespaces it creates. .ci/run runs it.
#
# Usage: sudo bench/soak.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
dns_rate=20000
dhcp_rate=200
clients=2000

# shellcheck source=bench/lib.sh
source bench/lib.sh

cat >"$work/queries" <<'EOF2'
worker0.kubevms A
control1 A
14.1.168.192.in-addr.arpa PTR
worker0.kubevms AAAA
nope.kubevms A
EOF2

mkdir -p "$work/state"
ip netns exec "$srv" "$kubenet" -q --config "$work/lab.toml" serve --no-bridge --dir "$work/state" >"$work/serve.log" 2>&1 &
server_pid=$!
pids+=("$server_pid")
sleep 1
kill -0 "$server_pid" || { cat "$work/serve.log"; exit 1; }

ip netns exec "$cli" dnsperf -s 192.168.1.1 -d "$work/queries" -l "$secs" -Q "$dns_rate" -c 4 >"$work/dnsperf.out" 2>&1 &
dns_pid=$!
pids+=("$dns_pid")
ip netns exec "$cli" perfdhcp -4 -l 192.168.1.254 -r "$dhcp_rate" -R "$clients" -p "$secs" 192.168.1.1 >"$work/perfdhcp.out" 2>&1 &
dhcp_pid=$!
pids+=("$dhcp_pid")

samples=()
for ((t = 5; t <= secs; t += 5)); do
    sleep 5
    samples+=("$(awk '/VmRSS/ { print $2 }' "/proc/$server_pid/status")")
done
wait "$dns_pid" || true
wait "$dhcp_pid" || true
kill -0 "$server_pid" || { echo "soak: the server died"; cat "$work/serve.log"; exit 1; }

sent=$(awk '/Queries sent:/ { print $3 }' "$work/dnsperf.out")
lost=$(awk '/Queries lost:/ { print $3 }' "$work/dnsperf.out")
dhcp=$(awk '/^sent packets:/ { s[++i] = $3 } /^drops:/ { d[++j] = $2 } /^Rate:/ { r = $2 }
    END { printf "%.0f %.2f", r, s[1] ? 100 * (d[1] + d[2]) / s[1] : 100 }' "$work/perfdhcp.out")
read -r dhcp_done dhcp_drops <<<"$dhcp"
warm=$((${#samples[@]} / 3))
base=${samples[$warm]}
peak=$(printf '%s\n' "${samples[@]:$warm}" | sort -n | tail -1)
growth=$((peak - base))

echo "soak: ${secs}s, DNS at ${dns_rate}/s and DHCP at ${dhcp_rate}/s (${clients} clients) together"
echo "  DNS:  $sent queries sent, $lost lost"
echo "  DHCP: $dhcp_done exchanges/s completed, ${dhcp_drops}% dropped"
echo "  RSS every 5 s (kB): ${samples[*]}"
echo "  RSS growth after warm-up: ${growth} kB (from $base to a peak of $peak)"

fail=0
[ "$lost" = "0" ] || { echo "soak: FAILED: $lost DNS queries lost"; fail=1; }
awk -v d="$dhcp_drops" 'BEGIN { exit !(d < 1) }' || { echo "soak: FAILED: ${dhcp_drops}% DHCP drops"; fail=1; }
[ "$growth" -le 1024 ] || { echo "soak: FAILED: RSS grew by ${growth} kB after warm-up"; fail=1; }
[ "$fail" -eq 0 ] && echo "soak: passed"
exit "$fail"
