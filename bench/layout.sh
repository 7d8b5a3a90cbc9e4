#!/usr/bin/env bash
# Writes crates/kubenet/serve.order: the functions `kubenet serve` runs, for the linker to place
# side by side (see crates/kubenet/build.rs). It runs the release build of serve under valgrind's
# callgrind inside the two namespaces bench/lib.sh creates and sends it what a lab and the
# benchmark send: DNS for the lab's names and for a name it forwards (to a fake upstream this
# script starts in the server's namespace), DHCP in the lab's shape and a pool's, each faster
# than serve under valgrind can answer (so the paths for a full queue and for drops run too),
# status and reload over the control socket, and SIGHUP. Nothing leaves the namespaces.
#
# The list is every function of the binary that ran, sorted by name. Run it again after a
# dependency or toolchain update (symbol names carry a hash of each crate's build); bench/run.sh
# says how much of the list the binary it measures still holds.
#
# Usage: sudo bench/layout.sh            (writes crates/kubenet/serve.order)
#        bench/layout.sh --check BINARY  (how many of the listed functions BINARY has)
set -euo pipefail
cd "$(dirname "$0")/.."
order=crates/kubenet/serve.order

# check BINARY: "N of M functions listed in serve.order are in BINARY".
check() {
    local found
    found=$(nm --defined-only "$1" | awk 'NR == FNR { want[$1] = 1; next } ($3 in want) { n[$3] = 1 } END { print length(n) }' "$order" -)
    echo "$found of $(wc -l <"$order") functions listed in $order are in $1"
}
if [ "${1:-}" = --check ]; then
    check "$2"
    exit 0
fi

# shellcheck source=bench/lib.sh
source bench/lib.sh
command -v valgrind >/dev/null || apt-get install -y -qq --no-install-recommends valgrind >/dev/null

# A fake upstream: answers every query with its own question and no records.
ip netns exec "$srv" python3 - <<'EOF' &
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 5399))
s.settimeout(120)
while True:
    q, peer = s.recvfrom(4096)
    s.sendto(q[:2] + b"\x81\x80" + q[4:], peer)
EOF
pids+=($!)

printf '%s\n' 'worker0.kubevms A' 'control1 A' '14.1.168.192.in-addr.arpa PTR' 'worker0.kubevms AAAA' \
    'nope.kubevms A' 'gateway.kubevms A' 'vmhost A' '11.1.168.192.in-addr.arpa PTR' 'example.com A' >"$work/queries"
for id in 0 1 2 3 4 5 6; do printf '52:52:52:00:00:%02x\n' "$id"; done >"$work/lab-macs"
mkdir -p "$work/state"
ip netns exec "$srv" valgrind -q --tool=callgrind --demangle=no --dump-instr=no \
    --callgrind-out-file="$work/callgrind.out" \
    "$kubenet" -q --config "$work/lab.toml" serve --no-bridge --dir "$work/state" >"$work/serve.log" 2>&1 &
server=$!
pids+=("$server")
for _ in $(seq 120); do [ -S "$work/state/kubenet.sock" ] && break; sleep 0.5; done
[ -S "$work/state/kubenet.sock" ] || { cat "$work/serve.log"; echo "serve did not start under valgrind"; exit 1; }

on_client() { timeout 60 ip netns exec "$cli" "$@" >/dev/null 2>&1 || true; }
on_client dnsperf -s 192.168.1.1 -d "$work/queries" -l 5 -c 8 -q 200
on_client dnsperf -s 192.168.1.1 -d "$work/queries" -l 3 -Q 200
on_client perfdhcp -4 -l 192.168.1.254 -r 20000 -M "$work/lab-macs" -p 5 192.168.1.1
on_client perfdhcp -4 -l 192.168.1.254 -r 20000 -R 5000 -p 5 192.168.1.1
on_client perfdhcp -4 -l 192.168.1.254 -r 200 -R 5000 -p 3 192.168.1.1
for cmd in status reload; do
    "$kubenet" --config "$work/lab.toml" --dir "$work/state" "$cmd" >/dev/null 2>&1 || true
done
kill -HUP "$server"
sleep 2
on_client dnsperf -s 192.168.1.1 -d "$work/queries" -l 2 -Q 200
kill -TERM "$server"
wait "$server" || true

# Every function named in the profile (callgrind names a function once, as fn= or cfn=, then by
# number) that the binary defines.
grep -oE '^c?fn=\([0-9]+\) .*' "$work/callgrind.out" | sed -E 's/^c?fn=\([0-9]+\) //' | sort -u >"$work/ran"
nm --defined-only "$kubenet" | awk 'NR == FNR { ran[$1] = 1; next } ($2 ~ /^[tTwW]$/ && $3 in ran) { print $3 }' \
    "$work/ran" - | LC_ALL=C sort -u >"$order"
check "$kubenet"
