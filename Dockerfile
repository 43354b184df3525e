# syntax=docker/dockerfile:1
# Build stage: a release binary from the locked dependency set.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY config ./config
RUN cargo build --release --locked --bin remora \
 && strip target/release/remora

# Runtime stage: glibc and CA certificates only, no shell.
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
