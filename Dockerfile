# syntax=docker/dockerfile:1
# The ingest worker image. Build:  docker build -t ingest:0.1.0 .
# Run:    docker run -v $PWD/config.yaml:/etc/ingest/config.yaml:ro ingest:0.1.0
# (the entrypoint is the `ingest` command; the default arguments run the worker with that config).

# Pinned by version; both stages use the same base so the virtualenv's interpreter path is identical.
# Where no registry is reachable, `make image` passes locally built Debian bases instead (the same
# /usr/bin/python3 in both; the runtime one has no pip): PYTHON_IMAGE for the build stage and
# PYTHON_RUNTIME_IMAGE for the runtime stage (docs/deployment.md).
ARG PYTHON_IMAGE=python:3.11.14-slim-trixie
ARG PYTHON_RUNTIME_IMAGE=${PYTHON_IMAGE}

# ---- build: a virtualenv with the project and its dependencies, from binary wheels only ---------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src

# The venv has no pip of its own: the build stage's pip installs into it (`pip --python`), so the
# final image carries only what the worker runs.
RUN python -m venv --without-pip /opt/ingest

# Where package downloads pass a TLS-intercepting proxy, the builder passes the host's CA bundle and
# pip configuration as build secrets (`make image` does): mounted for one RUN, never in a layer.
# Without them (docker build on an ordinary network) the mounts are simply empty.
ARG PIP_SECRETS="if [ -f /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi; \
    if [ -f /run/secrets/pip-conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip-conf; fi"

# Dependencies first, in their own layer: they change far less often than the code.
# Exact versions from .ci/constraints.txt (`make constraints`), within pyproject's ranges.
# --only-binary: the native dependencies (confluent-kafka, pycryptodome, jsonschema-rs, orjson, ...)
# publish manylinux wheels; refusing their source distributions guarantees that nothing is compiled
# (the slim base has no compiler anyway). The one exception is pubnub, which is published as a
# pure-Python source distribution only (no compiler involved).
COPY pyproject.toml .ci/constraints.txt ./
RUN --mount=type=secret,id=pip-ca --mount=type=secret,id=pip-conf eval "$PIP_SECRETS" \
 && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && python -m pip --python /opt/ingest/bin/python install --only-binary=:all: --no-binary=pubnub \
        -r /tmp/requirements.txt -c constraints.txt

# The project itself (pure Python; its wheel carries the JSON Schemas as ingest/_schemas).
COPY README.md ./
COPY schemas/ schemas/
COPY ingest/ ingest/
RUN --mount=type=secret,id=pip-ca --mount=type=secret,id=pip-conf eval "$PIP_SECRETS" \
 && python -m pip wheel --no-deps --wheel-dir /tmp/wheels . \
 && python -m pip --python /opt/ingest/bin/python install --no-deps --only-binary=:all: /tmp/wheels/*.whl

# ---- runtime -------------------------------------------------------------------------------------
FROM ${PYTHON_RUNTIME_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="ingest" \
      org.opencontainers.image.description="RingCentral push notifications (PubNub) into Kafka, keyed by account" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

# The runtime never installs packages: drop the base image's installer tooling (a local runtime
# base has none to drop).
RUN if python -m pip --version >/dev/null 2>&1; then python -m pip uninstall --yes --quiet pip setuptools wheel; fi \
 && groupadd --system --gid 10001 ingest \
 && useradd --system --uid 10001 --gid ingest --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin ingest

COPY --from=build /opt/ingest /opt/ingest

# Unbuffered output: logs are JSON lines read by the container runtime as they are written.
# No bytecode writes: the root filesystem is read-only in Kubernetes (pip precompiled the .pyc).
ENV PATH=/opt/ingest/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# Numeric uid:gid so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /tmp
# metrics.port: /metrics, /healthz, /readyz
EXPOSE 9095
ENTRYPOINT ["ingest"]
CMD ["run", "--config", "/etc/ingest/config.yaml"]
