# syntax=docker/dockerfile:1
# switchyard: a multi-stage build. The build stage compiles the `dist` profile (whole-program
# optimisation, no debug info); the runtime is distroless (glibc, CA certificates, no shell),
# running as an unprivileged uid with the rules read-only and the state in a volume.
#
#   docker build -t switchyard .
#   docker run -p 8080:8080 -e PORT_CLIENT_SECRET=... -v $PWD/rules:/etc/switchyard/rules:ro \
#     -v switchyard-state:/var/lib/switchyard switchyard
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS build
# librdkafka and OpenSSL are built from source by their crates: gcc, make and perl. Build-stage
# tools only, from the pinned base image's Debian release (nothing of them ships in the image),
# so their versions are left to it.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc g++ make perl pkg-config git \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Without a .git directory in the context, pass the commit: --build-arg GIT_COMMIT=$(git rev-parse --short=12 HEAD)
ARG GIT_COMMIT=""
ENV SWITCHYARD_GIT_COMMIT=${GIT_COMMIT}
RUN cargo build --locked --profile dist -p switchyard \
 && install -D -m 0755 target/dist/switchyard /out/switchyard \
 && install -d -m 0755 /out/rules /out/state \
 && cp -r rules/. /out/rules/

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="switchyard" \
      org.opencontainers.image.description="Port and Coder webhooks in, Slack Block Kit out, decided by YAML rules" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/switchyard/switchyard"
COPY --from=build /out/switchyard /usr/local/bin/switchyard
# The shipped rules as a default; mount your own over it (read-only).
COPY --from=build /out/rules /etc/switchyard/rules
# The state directory exists and belongs to the runtime uid, so a fresh volume is writable.
COPY --from=build --chown=65532:65532 /out/state /var/lib/switchyard
ENV SWITCHYARD_RULES=/etc/switchyard/rules \
    SWITCHYARD_DATA_DIR=/var/lib/switchyard \
    SWITCHYARD_LISTEN=0.0.0.0:8080 \
    SWITCHYARD_LOG_FORMAT=json
VOLUME ["/var/lib/switchyard"]
EXPOSE 8080
# distroless:nonroot is uid 65532; the state volume must be writable by it.
USER 65532:65532
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
  CMD ["/usr/local/bin/switchyard", "probe", "http://127.0.0.1:8080/healthz"]
ENTRYPOINT ["/usr/local/bin/switchyard"]
CMD ["serve"]
