#!/usr/bin/env bash
# Builds binllm-kernels for aarch64 and runs its NEON / portable paths under qemu-user.
# rustup cannot fetch the aarch64 standard library here, so this uses Debian 12's own Rust
# (rustc-web, with libstd-rust-web-dev:arm64), the aarch64 cross linker and qemu-user.
# Run as root from anywhere; installs the packages on first use.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
target_dir="${CARGO_TARGET_DIR_AARCH64:-/tmp/binllm-aarch64-target}"
if ! dpkg -s libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu qemu-user >/dev/null 2>&1; then
  dpkg --add-architecture arm64
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    rustc-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
fi
export RUSTC=/usr/bin/rustc CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
cd "$root"
/usr/bin/cargo check -p binllm-kernels --all-targets --target aarch64-unknown-linux-gnu --target-dir "$target_dir"
/usr/bin/cargo build -p binllm-kernels --release --example self_check --target aarch64-unknown-linux-gnu \
  --target-dir "$target_dir"
# Single-threaded on purpose: qemu-user 7.2 hangs when the guest spawns a thread.
qemu-aarch64 -L /usr/aarch64-linux-gnu "$target_dir/aarch64-unknown-linux-gnu/release/examples/self_check"
