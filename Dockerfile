# syntax=docker/dockerfile:1
# twmon's container image: `docker build -t twmon .` from the repository root.
#
# Build stage: the agent builds with stable Rust; its kernel programs with a nightly whose LLVM
# (22) matches the one bpf-linker is built against (Debian's llvm-22-dev), as in `cargo xtask
# setup`. Final stage: distroless with glibc, and the single self-contained binary.
# Run it as the DaemonSet in deploy/kubernetes does: host network and PID namespace, CAP_BPF,
# CAP_PERFMON, CAP_SYSLOG, /sys/kernel/btf from the host (no tracefs: the programs are BTF
# tracepoints).

FROM rust:1.95-bookworm AS build

# The nightly of this date has LLVM 22; the build script of the agent runs `cargo +nightly`.
ARG NIGHTLY=nightly-2026-05-19
ARG BPF_LINKER=0.13.0

RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      llvm-22-dev=1:22.* libpolly-22-dev=1:22.* zlib1g-dev=1:1.2.* libzstd-dev=1.5.* \
 && rm -rf /var/lib/apt/lists/*

RUN rustup toolchain install "$NIGHTLY" --profile minimal --component rust-src \
 && ln -s "$RUSTUP_HOME/toolchains/$NIGHTLY-x86_64-unknown-linux-gnu" \
          "$RUSTUP_HOME/toolchains/nightly-x86_64-unknown-linux-gnu" \
 && LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --locked --version "$BPF_LINKER" \
      --no-default-features --features llvm-22

WORKDIR /src
COPY . .
RUN cargo build --release --locked --package monitor \
 && install -D -m 0755 target/release/twmon /out/twmon

# distroless publishes no version tags: pin the digest (…cc-debian12@sha256:…) in your own build.
# hadolint ignore=DL3007
FROM gcr.io/distroless/cc-debian12:latest
COPY --from=build /out/twmon /usr/local/bin/twmon
EXPOSE 9864
# Root in the container: Kubernetes grants added capabilities to root containers only.
# The capabilities come from the runtime (DaemonSet securityContext, or docker run
# --cap-add BPF --cap-add PERFMON --cap-add SYSLOG).
# hadolint ignore=DL3002
USER 0
ENTRYPOINT ["/usr/local/bin/twmon"]
CMD ["--web.listen-address=:9864"]
