# Sourced by scripts/test and scripts/demo before they build: Rust's cargo (rustup's
# ~/.cargo/env when it is not on PATH), and the system OpenSSL and pkg-config that librdkafka and
# mysql_async's TLS link, installed from Debian packages when missing.
if ! command -v cargo >/dev/null 2>&1; then
  [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null || { echo "cargo not found: install Rust 1.85 or newer with rustup (https://rustup.rs)" >&2; exit 1; }
if ! pkg-config --exists openssl 2>/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q libssl-dev pkg-config >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q libssl-dev pkg-config >/dev/null; } \
    || { echo "install libssl-dev and pkg-config (the Kafka and MariaDB TLS clients link OpenSSL)" >&2; exit 1; }
fi
