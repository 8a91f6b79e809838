# syntax=docker/dockerfile:1
# The worker image: torch and diffusers (`pip install .[worker]`), `fleet worker` as its
# entry point, one worker per GPU (a pod with one GPU runs slot 0 on it).
#
#   docker build -f docker/worker.Dockerfile -t diffusion-fleet-worker .                          # CUDA
#   docker build -f docker/worker.Dockerfile --build-arg VARIANT=cpu -t diffusion-fleet-worker:cpu .
#   docker build -f docker/worker.Dockerfile --build-arg MODEL=sd15 -t diffusion-fleet-worker:sd15 .
#
# The model: without MODEL, mount one (a diffusers model directory) and point FLEET_MODEL
# at it (the Kubernetes manifests mount a volume at /models). MODEL=tiny|sd15|sdxl bakes
# `fleet model init /models/$MODEL --arch $MODEL` into the image (random weights, real
# shapes: for benchmarks and smoke tests) and sets FLEET_MODEL to it.
#
# CUDA: PyPI's torch for Linux x86_64 is the CUDA build and carries its CUDA libraries, so
# the base is NVIDIA's smallest CUDA image (its environment tells the NVIDIA container
# runtime to expose the GPU); the node's driver must support the CUDA of that torch.
ARG VARIANT=cuda
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
ARG CPU_IMAGE=ubuntu:24.04

FROM ${CUDA_IMAGE} AS os-cuda
ENV TORCH_INDEX_URL=https://pypi.org/simple

FROM ${CPU_IMAGE} AS os-cpu
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# Python from the distribution (3.12 on Ubuntu 24.04), in both stages at the same path.
# hadolint ignore=DL3006
FROM os-${VARIANT} AS os
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

FROM os AS build
ARG TORCH_VERSION=2.13.0
RUN python3 -m venv /opt/fleet
ENV PATH=/opt/fleet/bin:$PATH
# torch first, from the variant's index: the worker extra's torch>=2.4 is then satisfied.
RUN pip install --no-cache-dir --disable-pip-version-check --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY tasks/ tasks/
COPY app/ app/
COPY workers/ workers/
COPY fleet/ fleet/
# The project itself: its dependencies' ranges are setup.cfg's.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --disable-pip-version-check ".[worker]"

FROM build AS model
ARG MODEL=
RUN mkdir -p /models \
    && if [ -n "$MODEL" ]; then fleet model init "/models/$MODEL" --arch "$MODEL" --device cpu; fi

FROM os
ARG MODEL=
RUN groupadd --system --gid 10001 fleet \
    && useradd --system --uid 10001 --gid fleet --no-create-home --home-dir /var/lib/fleet \
        --shell /usr/sbin/nologin fleet \
    && install -d -o fleet -g fleet /var/lib/fleet
COPY --from=build /opt/fleet /opt/fleet
COPY --from=model /models /models
ENV PATH=/opt/fleet/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/var/lib/fleet \
    FLEET_STATE_DIR=/var/lib/fleet \
    FLEET_MODEL=${MODEL:+/models/$MODEL}
WORKDIR /var/lib/fleet
USER 10001:10001
# The worker's Prometheus /metrics (FLEET_WORKER_METRICS_PORT, slot 0).
EXPOSE 9808
ENTRYPOINT ["fleet"]
CMD ["worker"]
