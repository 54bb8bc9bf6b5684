# syntax=docker/dockerfile:1
# Static binaries (x86_64-unknown-linux-musl) in FROM scratch images, one
# target per binary:
#
#   docker build --target greet-server -t localhost/greet-etcd/greet-server:0.1.0 .
#   docker build --target controller   -t localhost/greet-etcd/controller:0.1.0 .
#   docker build --target greet-client -t localhost/greet-etcd/greet-client:0.1.0 .
#
# scripts/build-images.sh does all three, with docker or without a daemon
# (buildah), and loads them into kind / k3d / minikube.
#
# Build args: RUST_IMAGE pins the build stage's toolchain image.
# BINARIES=prebuilt skips the build stage and takes static binaries from
# bin/ of the build context instead (build-images.sh --from-host does this
# where no base image can be pulled: it needs nothing but FROM scratch).

ARG RUST_IMAGE=docker.io/library/rust:1.95-slim-bookworm
ARG BINARIES=build

FROM ${RUST_IMAGE} AS build
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends musl-tools protobuf-compiler \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    CARGO_PROFILE_RELEASE_STRIP=symbols \
    cargo build --release --locked --target x86_64-unknown-linux-musl \
      -p greet-server -p greet-client -p controller \
 && mkdir -p /out \
 && cp target/x86_64-unknown-linux-musl/release/greet-server \
       target/x86_64-unknown-linux-musl/release/greet-client \
       target/x86_64-unknown-linux-musl/release/controller /out/

FROM scratch AS prebuilt
COPY bin/ /out/

FROM ${BINARIES} AS binaries

FROM scratch AS greet-server
COPY --from=binaries /out/greet-server /greet-server
USER 65532:65532
EXPOSE 3000
ENTRYPOINT ["/greet-server"]

FROM scratch AS greet-client
COPY --from=binaries /out/greet-client /greet-client
USER 65532:65532
ENTRYPOINT ["/greet-client"]

FROM scratch AS controller
COPY --from=binaries /out/controller /controller
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/controller"]
