# syntax=docker/dockerfile:1
#
# fanout container image: docker build -t fanout .   (BuildKit; see docs/docker.md)
#
# The build step is ./scripts/build, the same script CI runs on every change, so this file
# cannot drift from a build that works. ./scripts/check-dockerfile (run by the test command)
# checks that the runtime stage installs every shared library the binary links.

# --- builder -----------------------------------------------------------------------------
# rust-version in Cargo.toml is 1.85; this is the toolchain the project is developed with.
FROM rust:1.95-bookworm AS build

# librdkafka is compiled from source with CMake (C and C++): build-essential, cmake.
# pkg-config + zlib1g-dev: link the system zlib (zlib1g in the runtime image).
# Unpinned on purpose (DL3008): bookworm's point releases replace pinned versions.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake pkg-config zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# The whole context (see .dockerignore): the build needs src/, migrations/ (sqlx::migrate!),
# demo/ and clients/js/fanout.js (include_str!) besides Cargo.toml and Cargo.lock.
COPY . .

# Cargo's registry, git checkouts and the target directory persist between builds;
# ./scripts/build copies the binary out of the (cached, unexported) target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    ./scripts/build --out /out

# --- runtime -----------------------------------------------------------------------------
FROM debian:bookworm-slim

# The Cargo.toml version; ./scripts/check-dockerfile keeps them equal.
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="fanout" \
      org.opencontainers.image.description="Pushes messages from Kafka to WebSocket clients, filtered by per-user preferences." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/debian:bookworm-slim"

# Exactly the shared libraries `ldd fanout` reports (libc6 is in the base image):
# libssl3 (libssl.so.3, libcrypto.so.3: OpenSSL, the TLS of librdkafka, Redis and
# PostgreSQL), zlib1g (libz.so.1), libgcc-s1 (libgcc_s.so.1). ca-certificates: the system
# trust store (/etc/ssl/certs/ca-certificates.crt), used when no CA file is configured.
# ./scripts/check-runtime builds this stage with debootstrap and runs the binary in it.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libgcc-s1 libssl3 zlib1g \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --gid 10001 fanout \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin fanout

COPY --from=build /out/fanout /usr/local/bin/fanout

# fanout reads config/default.toml relative to its working directory. The file and its
# directory stay root-owned (read-only to fanout); /app itself belongs to fanout so the
# SQLite default (sqlite://fanout.db, single node only) can be created there.
WORKDIR /app
COPY config/default.toml /app/config/default.toml
RUN chown 10001:10001 /app

# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001

# 8080: WebSocket /ws and /v1 API (server.listen); 9090: /metrics, /healthz, /readyz
# (admin.listen). Without Kafka/Redis/database configured fanout runs its embedded demo
# default, which listens on 127.0.0.1 only: give the container a real configuration.
EXPOSE 8080 9090

# No HEALTHCHECK: Kubernetes probes /healthz and /readyz on the admin port (helm/fanout),
# and a Docker HEALTHCHECK would only duplicate them (and is ignored by Kubernetes).
# fanout runs as PID 1 without an init: it handles SIGTERM itself (draining connections
# over shutdown.drain) and starts no child processes.
ENTRYPOINT ["fanout"]
CMD ["serve"]
