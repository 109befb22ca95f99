# syntax=docker/dockerfile:1
#
# The Kapsa operator image: the one `kapsa` binary, statically linked, as the
# entrypoint (the chart and deploy/operator/operator.yaml run `kapsa operator`),
# running as the non-root user 65532.
#
#   docker build -t kapsa .                      # distroless/static, no ssh
#   docker build --target ssh -t kapsa:ssh .     # Debian slim with an ssh client
#
# The default image (the last stage, `static`) has no shell and no ssh: Kapsa
# polls https:// git remotes in-process, but an ssh:// (or user@host:path)
# remote needs the `ssh` program, so Projects with ssh remotes report "the
# ssh program is not installed" on it. Build the `ssh` stage for them.
#
# Not built in Kapsa's CI: its machines have no container runtime.
# crates/kapsa/tests/chart.rs checks what can be checked without one: the
# files this file copies exist, and the cargo command below, run with these
# RUSTFLAGS, makes a static binary that runs `kapsa --version`.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

# ---- build: a static `kapsa` ------------------------------------------------
FROM docker.io/library/rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
# The workspace's sources only (.dockerignore keeps target/ and the rest out).
# rust-toolchain.toml is left out on purpose: the image's toolchain
# (RUST_VERSION) builds, instead of rustup downloading another.
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
# glibc linked statically (crt-static): the binary needs no libc in the image.
# --target is required with crt-static, so that build scripts and proc macros
# stay dynamic; uname -m gives the builder's architecture (x86_64, aarch64).
ENV RUSTFLAGS="-C target-feature=+crt-static"
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    target="$(uname -m)-unknown-linux-gnu" \
 && cargo build --release --locked -p kapsa --bin kapsa --target "$target" \
 && install -D -m 0755 "target/$target/release/kapsa" /out/kapsa
# Fails the build if the binary does not run on its own.
RUN /out/kapsa --version

# ---- ssh: the same binary with an ssh client, for ssh git remotes ------------
FROM docker.io/library/debian:${DEBIAN_RELEASE}-slim AS ssh
RUN apt-get update \
 && apt-get install -y --no-install-recommends openssh-client ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 65532 nonroot \
 && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /tmp nonroot
COPY --from=build /out/kapsa /usr/local/bin/kapsa
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kapsa"]
CMD ["operator"]

# ---- static: the default image, distroless (CA certificates, /etc/passwd, tzdata; no shell) ----
FROM gcr.io/distroless/static-debian12:nonroot AS static
COPY --from=build /out/kapsa /usr/local/bin/kapsa
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kapsa"]
CMD ["operator"]
