# Shared by bench/run.sh and bench/soak.sh: root check, the release build, two network
# namespaces joined by veth (server 192.168.1.1/16, client 192.168.1.254/16), cleanup of exactly
# what was created, and the benchmark lab. Source it; it sets $kubenet, $work, $srv, $cli and
# the array $pids (PIDs to end on exit).
[ "$(id -u)" -eq 0 ] || { echo "bench/run.sh needs root for network namespaces"; exit 2; }
bash scripts/install-test-deps.sh
# The servers run as `sudo kubenet serve` or a service would run them: without a developer's
# RUST_BACKTRACE, which makes every error (even an expected one at start) walk the stack and read
# the unwind tables, half a megabyte of RSS that no user's agent has.
unset RUST_BACKTRACE RUST_LIB_BACKTRACE
# The bench's lab is root's (its folders are made here as root): under `sudo`, SUDO_UID would
# make serve work for the developer instead, in root's folders.
unset SUDO_UID SUDO_GID SUDO_USER
cargo build --release --locked -q -p kubenet
kubenet="$PWD/target/release/kubenet"

work=$(mktemp -d)
srv="kbs$$"
cli="kbc$$"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    ip netns del "$srv" 2>/dev/null || true
    ip netns del "$cli" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

ip netns add "$srv"
ip netns add "$cli"
ip link add kbs0 netns "$srv" type veth peer name kbc0 netns "$cli"
ip -n "$srv" addr add 192.168.1.1/16 dev kbs0
ip -n "$cli" addr add 192.168.1.254/16 dev kbc0
for ns in "$srv" "$cli"; do ip -n "$ns" link set lo up; done
ip -n "$srv" link set kbs0 up
ip -n "$cli" link set kbc0 up

# The reference lab's VMs on a /16, so the pool holds every simulated client. ip_offset 266 keeps
# the VMs on 192.168.1.10-16 as in the reference lab.
cat >"$work/lab.toml" <<'EOF'
[network]
upstream = ["127.0.0.1:5399"]
ip_offset = 266
subnet = "192.168.0.0/16"
host_address = "192.168.1.1"
dhcp_range = ["192.168.100.1", "192.168.199.254"]
[[group]]
name = "gateway"
[[group]]
prefix = "control"
count = 3
[[group]]
prefix = "worker"
count = 3
EOF
