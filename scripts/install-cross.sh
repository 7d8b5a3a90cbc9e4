#!/usr/bin/env bash
# Installs what cross-building kubenet for macOS (and Linux arm64) takes on this Linux machine,
# for scripts/test's macOS checks and scripts/release. Idempotent: what is there is kept.
#
#   rustup targets      the standard library for aarch64/x86_64-apple-darwin and
#                       aarch64-unknown-linux-gnu
#   ziglang (PyPI)      zig, the C compiler and linker: it ships macOS's libc headers and link
#                       stubs, which ring (under russh and rustls) needs, and glibc for any version
#   cargo-zigbuild      cargo with zig as the linker (crates.io)
set -euo pipefail

for t in aarch64-apple-darwin x86_64-apple-darwin aarch64-unknown-linux-gnu; do
    rustup target list --installed | grep -qx "$t" || rustup target add "$t" >/dev/null
done
if ! python3 -c 'import ziglang' 2>/dev/null; then
    echo "install-cross: installing zig (PyPI's ziglang)"
    # Debian's own python3 refuses system-wide pip installs unless told.
    python3 -m pip install -q ziglang 2>/dev/null || python3 -m pip install -q --break-system-packages ziglang
fi
if ! command -v cargo-zigbuild >/dev/null; then
    echo "install-cross: installing cargo-zigbuild"
    cargo install -q --locked cargo-zigbuild
fi
