# kold's image: `kold runtime serve` (a Knative Service's function) by default, `kold controller` by args.
#
#   CUDA (default): docker build -t kold-runtime .
#   CPU:            docker build -t kold-runtime:cpu \
#                     --build-arg BASE_IMAGE=python:3.11-slim --build-arg FLAVOUR=cpu .
#
# Installed the way scripts/setup.sh does it: a venv, torch pinned first (so pip never swaps it for
# another build), then the project. Nothing here has been built by a Docker engine in CI; the tests
# lint it with hadolint (tests/test_dockerfile.py).

ARG BASE_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04

# --- base: the interpreter, shared by builder and final so the venv's links resolve in both -----
FROM ${BASE_IMAGE} AS base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# python:3.11-slim already has Python 3.11; the CUDA (Ubuntu 22.04) base needs it from the distro.
# The distro's security updates are what we want here, so apt versions are not pinned.
# hadolint ignore=DL3008
RUN if ! command -v python3.11 >/dev/null 2>&1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3.11 --version

# --- builder: the venv with torch and kold ------------------------------------------------------
FROM base AS builder
# cuda: PyPI's default torch (a CUDA build) and the gpu extra (CuPy for CUDA restores);
# cpu: the CPU-only torch wheel, no extra.
ARG FLAVOUR=cuda
ARG TORCH_VERSION=2.13.0
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python3.11 -m venv /opt/kold/venv
ENV PATH=/opt/kold/venv/bin:$PATH
RUN case "${FLAVOUR}" in \
        cuda) pip install --no-cache-dir "torch==${TORCH_VERSION}" ;; \
        cpu) pip install --no-cache-dir --index-url "${TORCH_CPU_INDEX}" "torch==${TORCH_VERSION}" ;; \
        *) echo "FLAVOUR must be cuda or cpu, not '${FLAVOUR}'" >&2; exit 1 ;; \
    esac
WORKDIR /src
COPY . .
RUN if [ "${FLAVOUR}" = cuda ]; then pip install --no-cache-dir "/src[gpu]"; else pip install --no-cache-dir /src; fi \
    && python -c "import torch, kold.cli; print('kold', kold.__version__, 'torch', torch.__version__)"

# --- final: the venv only, as a non-root user ------------------------------------------------------
FROM base AS final
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="kold-runtime" \
      org.opencontainers.image.description="kold's serverless LLM function runtime (kold runtime serve): snapshot restore, OpenAI-compatible API" \
      org.opencontainers.image.source="https://github.com/kold/kold" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
RUN groupadd --system --gid 10001 kold \
    && useradd --system --uid 10001 --gid kold --home-dir /home/kold --create-home --shell /usr/sbin/nologin kold
COPY --from=builder /opt/kold/venv /opt/kold/venv
ENV PATH=/opt/kold/venv/bin:$PATH \
    HOME=/home/kold
USER 10001:10001
WORKDIR /home/kold
EXPOSE 8080
# Knative's queue-proxy probes the runtime's /readyz and /healthz; a Docker HEALTHCHECK would only
# duplicate that (and Kubernetes ignores it).
HEALTHCHECK NONE
# ENTRYPOINT is `kold` so the one image also runs the pre-warm controller (manifests/base/controller.yaml
# passes `controller ...` as args). The default command serves a function; Knative's `args` replace it
# (manifests/base/function.yaml passes `runtime serve --snapshot ...`). --host 0.0.0.0: the runtime
# listens on loopback by default, unreachable through `docker run -p`; the port comes from $PORT,
# which Knative sets (else 8080).
ENTRYPOINT ["kold"]
CMD ["runtime", "serve", "--host", "0.0.0.0"]
