# omrs-stream image: one binary for every stage (topics, ingest, transform, sinks, query, ...).
#   docker build -t omrs-stream:dev .          (docker-compose.yml builds it as omrs-stream:dev)
# The classic builder and BuildKit both work: no BuildKit-only syntax is used.

# ---- build ---------------------------------------------------------------------------------
FROM rust:1-bookworm AS build

# librdkafka is compiled from source by rdkafka-sys (its configure script and make):
# a C toolchain, pkg-config and zlib; python3 for its linker-script generator. libssl-dev and
# libsasl2-dev are there for the optional TLS / SASL features of rdkafka (off in Cargo.lock today).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      build-essential pkg-config libssl-dev zlib1g-dev libsasl2-dev python3 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin omrs-stream \
 && cp target/release/omrs-stream /usr/local/bin/omrs-stream \
 && rm -rf target

# ---- runtime -------------------------------------------------------------------------------
FROM debian:bookworm-slim

# Runs as `omrs` (uid 10001). /var/lib/omrs-stream/lake exists and is owned by it, so a named
# volume mounted there (the Parquet sink's `lake` in docker-compose.yml) starts writable.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 omrs \
 && useradd --system --uid 10001 --gid omrs --home-dir /var/lib/omrs-stream --shell /usr/sbin/nologin omrs \
 && mkdir -p /etc/omrs-stream /var/lib/omrs-stream/lake \
 && chown -R omrs:omrs /var/lib/omrs-stream

COPY --from=build /usr/local/bin/omrs-stream /usr/local/bin/omrs-stream
# Defaults; docker-compose.yml mounts deploy/docker/omrs-stream.docker.toml over omrs-stream.toml.
COPY omrs-stream.toml topics.toml /etc/omrs-stream/

ENV OMRS_CONFIG=/etc/omrs-stream/omrs-stream.toml \
    OMRS_TOPICS=/etc/omrs-stream/topics.toml

# Prometheus metrics (/metrics, /health) when metrics.listen is 0.0.0.0:9464.
EXPOSE 9464

USER omrs:omrs
WORKDIR /etc/omrs-stream
ENTRYPOINT ["omrs-stream"]
CMD ["--help"]
