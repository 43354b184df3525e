# syntax=docker/dockerfile:1
# Build stage: a release binary from the locked dependency set.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The manifest declares the benchmarks; cargo needs their sources to load it.
COPY benches ./benches
COPY config ./config
RUN cargo build --release --locked --bin remora \
 && strip target/release/remora

# Init-container image (`docker build --target init`): the same binary with
# iptables (iptables-restore, nf_tables backend) for `remora iptables`, which
# installs the pod's capture rules. Runs as root with NET_ADMIN and NET_RAW.
FROM debian:bookworm-slim AS init
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/remora /usr/local/bin/remora
ENTRYPOINT ["/usr/local/bin/remora"]
CMD ["iptables"]

# Runtime stage (the default): glibc and CA certificates only, no shell.
FROM gcr.io/distroless/cc-debian12
COPY --from=build /src/target/release/remora /usr/local/bin/remora
COPY config /etc/remora/examples
# Istio's proxy UID/GID: traffic capture rules exclude this user's traffic.
USER 1337:1337
# 15000 admin (loopback), 15001 outbound capture, 15006 inbound capture,
# 15021 health, 15090 Prometheus.
EXPOSE 15000 15001 15006 15021 15090
ENTRYPOINT ["/usr/local/bin/remora"]
CMD ["run", "--config", "/etc/remora/config"]
