# The node image `kefu deploy` builds: kefu-node on a small Debian runtime.
# Build: docker build -t kefu-node .   (the build stage needs no network beyond crates.io)

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p node --bin kefu-node \
    && cp target/release/kefu-node /usr/local/bin/kefu-node

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /data kefu \
    && mkdir -p /data /etc/kefu && chown kefu /data
COPY --from=build /usr/local/bin/kefu-node /usr/local/bin/kefu-node
# J-IM (tcp/http/ws), TLS (tcp) and QUIC (udp), admin, mesh (udp, private network only).
EXPOSE 8888/tcp 8443/tcp 8443/udp 9090/tcp 7443/udp
ENV KEFU_PROFILE=prod KEFU_DATA_DIR=/data
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/kefu-node"]
