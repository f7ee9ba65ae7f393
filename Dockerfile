# syntax=docker/dockerfile:1
#
# docker build -t tether .
# docker run --rm -p 7900:7900/udp -p 9900:9900 \
#     -v /srv/tether/key:/run/secrets/tether_key:ro tether

# Build stage. The crate's rust-version is 1.88.
FROM rust:1.88-slim-bookworm AS builder
WORKDIR /src
# Everything is copied: Cargo.toml names benches, examples and the load tool,
# and cargo wants their sources present even to build the one binary.
# .dockerignore keeps target/ and .git/ out.
COPY . .
# The cache mounts keep downloaded crates and compiled dependencies between
# builds (BuildKit), so a source change rebuilds only tether itself. The
# binary is copied out because the target/ cache is not part of the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin tether \
 && install -D -m 0755 target/release/tether /out/tether

# Runtime: glibc and libgcc only, no shell, runs as uid/gid 65532 (nonroot).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/tether /usr/local/bin/tether
# Numeric, so Kubernetes runAsNonRoot can verify it.
USER 65532:65532
EXPOSE 7900/udp 9900/tcp
ENTRYPOINT ["/usr/local/bin/tether"]
# --insecure-bind: required today to serve metrics (TCP 9900) on a
# non-loopback address, which a container needs for its port to be reachable.
# The UDP side is still authenticated: with --key-file, every datagram must
# carry a valid HMAC. The metrics port is unauthenticated, so keep it off
# public networks (publish it on 127.0.0.1, or a NetworkPolicy).
#
# The key file (16 to 64 raw bytes) must be readable by uid 65532 and by no
# one else: mode 0400 or 0600, owned by 65532. The server refuses a file with
# any group or other permission bit set.
#   docker run / compose: the file is bind-mounted with its host owner and
#     mode, so on the host: chown 65532:65532 KEY && chmod 400 KEY.
#   Kubernetes: Secret volume files are owned by root, and with fsGroup set
#     defaultMode 0400 becomes 0440 (kubernetes/kubernetes#57923): unreadable
#     by 65532 without fsGroup, refused with it. Mount the Secret (defaultMode
#     0444) only in an initContainer running as 65532 that copies it into an
#     emptyDir (medium: Memory) with mode 0400; mount that in this container
#     and point --key-file at it.
CMD ["serve", "--listen", "0.0.0.0:7900", "--key-file", "/run/secrets/tether_key", "--metrics", "0.0.0.0:9900", "--insecure-bind", "--log-format", "json"]
