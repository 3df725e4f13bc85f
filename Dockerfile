# omrs-stream images, both from this one Dockerfile:
#   docker build -t omrs-stream:dev .                         the whole pipeline (default target)
#   docker build --target omrs-agent -t omrs-agent:dev .      the clinic-sized agent alone
# docker-compose.yml (the demo) and deploy/compose/hq.yml (a deployment) build them so.
# The classic builder and BuildKit both work: no BuildKit-only syntax is used.

# ---- build ---------------------------------------------------------------------------------
# librdkafka is compiled from source by rdkafka-sys (its configure script and make): a C
# toolchain, pkg-config and zlib; python3 for its linker-script generator; libssl-dev for TLS.
FROM rust:1-bookworm AS chef
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      build-essential pkg-config libssl-dev zlib1g-dev libsasl2-dev python3 \
 && rm -rf /var/lib/apt/lists/* \
 && cargo install cargo-chef --locked --version 0.1.78
WORKDIR /src

# The dependency-cache layer: cargo-chef reduces the workspace to its manifests and lock file
# (recipe.json). The dependencies (DataFusion, Arrow, librdkafka…: most of a 20–45 minute
# build) are compiled from the recipe alone, so that layer is rebuilt only when Cargo.toml or
# Cargo.lock change, not on every source edit.
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS build
ENV CARGO_TARGET_DIR=/src/target
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json -p omrs-stream -p omrs-agent
COPY . .
# scripts/dist: the release build, with the debug info split out of the binaries (the
# `.debug` files stay in /dist of this stage; `docker cp` them out to read a crash's backtrace).
RUN scripts/dist /dist \
 && cp /dist/omrs-stream /dist/omrs-agent /usr/local/bin/

# ---- runtime -------------------------------------------------------------------------------
# Runs as `omrs` (uid 10001). /var/lib/omrs-stream/lake exists and is owned by it, so a named
# volume mounted there (the Parquet sink's `lake`) starts writable.
FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 omrs \
 && useradd --system --uid 10001 --gid omrs --home-dir /var/lib/omrs-stream --shell /usr/sbin/nologin omrs \
 && mkdir -p /etc/omrs-stream /var/lib/omrs-stream/lake \
 && chown -R omrs:omrs /var/lib/omrs-stream
# Defaults; the compose files mount their config over omrs-stream.toml.
COPY omrs-stream.toml topics.toml /etc/omrs-stream/
COPY deploy/docker/healthcheck /usr/local/bin/omrs-healthcheck
ENV OMRS_CONFIG=/etc/omrs-stream/omrs-stream.toml \
    OMRS_TOPICS=/etc/omrs-stream/topics.toml \
    OMRS_HEALTH_PORT=9464
# A stage is healthy when its /health says so: connected to its sources and sinks, its loop
# turning (metrics.listen = 0.0.0.0:9464 in the container's config). One-shot commands
# (topics apply, sink hq-mysql --init) serve no /health; compose does not wait on theirs.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=4 CMD ["omrs-healthcheck"]
EXPOSE 9464
USER omrs:omrs
WORKDIR /etc/omrs-stream

# The clinic's agent: omrs-core and omrs-ingest only (README: its size beside omrs-stream's).
FROM runtime AS omrs-agent
COPY --from=build /usr/local/bin/omrs-agent /usr/local/bin/omrs-agent
ENTRYPOINT ["omrs-agent"]
CMD ["--help"]

# Every stage: topics, ingest, transform, sinks, query, verify, status, identity, dlq.
FROM runtime AS omrs-stream
COPY --from=build /usr/local/bin/omrs-stream /usr/local/bin/omrs-stream
EXPOSE 5433
ENTRYPOINT ["omrs-stream"]
CMD ["--help"]
