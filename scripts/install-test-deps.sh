#!/usr/bin/env bash
# Installs the Debian packages kubenet's tests and benchmarks use. Idempotent: packages already
# present are skipped, so a rerun takes a second. Needs root (or sudo) and Debian's package lists.
#
#   dnsmasq-base     the server kubenet replaces; benchmarks compare against it (the binary only:
#                    the `dnsmasq` package would start a system daemon on port 53)
#   isc-dhcp-client  dhclient, a real DHCP client for the namespace tests
#   udhcpc           busybox's DHCP client, what small images carry
#   bind9-dnsutils   dig, for the DNS tests
#   iproute2         ip netns / veth / bridges for the namespace tests
#   kea-admin        perfdhcp, the DHCP load generator used by bench/run.sh
#   dnsperf          the DNS load generator used by bench/run.sh
set -euo pipefail

packages=(dnsmasq-base isc-dhcp-client udhcpc bind9-dnsutils iproute2 kea-admin dnsperf)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "install-test-deps: all present (${packages[*]})"
    exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "install-test-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-test-deps: done"
