//! The release binary's layout, for `serve`'s memory (README, *Benchmarks*: "Memory").
//!
//! The kernel maps a program's code in 64 KB windows around each page it touches, so what
//! `serve` keeps resident of its binary depends on how its code is spread, not only on how
//! much of it runs. `serve.order` lists the functions `serve` ran under a profile
//! (`bench/layout.sh` writes it); the linker places them first, side by side, and the rest of
//! the binary (VMs, images, snapshots, ssh) stays on disk while `serve` runs.
//!
//! This is only for the linker that reads that list: rustc's own lld, the default linker of
//! x86_64-unknown-linux-gnu. A configured linker (cargo-zigbuild, mold, a cross linker) or
//! another target gets the default layout. A stale list costs nothing but the benefit: a
//! function it names that no longer exists is skipped, and a new one goes after the listed ones.
//!
//! Where the C library applies packed relative relocations (glibc 2.36 and later, found by
//! the version the binary would then need), the relocation table is packed too: 0.47 MB that
//! the dynamic loader otherwise reads at every start.

use std::path::{Path, PathBuf};

fn main() {
    let order = Path::new(env("CARGO_MANIFEST_DIR").as_deref().unwrap_or(".")).join("serve.order");
    println!("cargo::rerun-if-changed={}", order.display());
    for var in ["RUSTC_LINKER", "CARGO_ENCODED_RUSTFLAGS"] {
        println!("cargo::rerun-if-env-changed={var}");
    }

    let default_lld = env("TARGET").as_deref() == Some("x86_64-unknown-linux-gnu")
        && env("RUSTC_LINKER").is_none()
        && !env("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default().contains("link");
    if env("PROFILE").as_deref() != Some("release") || !default_lld {
        return;
    }
    println!("cargo::rustc-link-arg-bin=kubenet=-Wl,--symbol-ordering-file={}", order.display());
    println!("cargo::rustc-link-arg-bin=kubenet=-Wl,--no-warn-symbol-ordering");
    if libc_applies_relr() {
        println!("cargo::rustc-link-arg-bin=kubenet=-Wl,-z,pack-relative-relocs");
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// True when the libc.so.6 the link uses defines GLIBC_ABI_DT_RELR, the version a binary with
/// packed relocations asks for: such a glibc (2.36+) applies them, an older one would refuse
/// the binary, so with an older one the relocations stay as they are.
fn libc_applies_relr() -> bool {
    let out = std::process::Command::new("cc").arg("-print-file-name=libc.so.6").output();
    let Ok(out) = out else { return false };
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let Ok(bytes) = std::fs::read(&path) else { return false };
    let tag = b"GLIBC_ABI_DT_RELR";
    bytes.windows(tag.len()).any(|w| w == tag)
}
