# syntax=docker/dockerfile:1
# The API and Flower image: `pip install .[api]` (Flask, gunicorn + gevent, Flower) and
# the `fleet` command, no torch. `fleet hooks` (webhook delivery) runs from it too.
#
#   docker build -f docker/api.Dockerfile -t diffusion-fleet-api .
#   docker run diffusion-fleet-api          # fleet web: the API on :8000
#   docker run diffusion-fleet-api flower   # Flower on :5555, auth from FLEET_FLOWER_BASIC_AUTH
#   docker run diffusion-fleet-api hooks    # the webhook delivery worker
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
RUN python -m venv /opt/fleet
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY tasks/ tasks/
COPY app/ app/
COPY workers/ workers/
COPY fleet/ fleet/
RUN /opt/fleet/bin/pip install --no-cache-dir --disable-pip-version-check ".[api]"

FROM ${PYTHON_IMAGE}
# A user of its own, no login, no home but the state directory (a volume in Kubernetes).
RUN groupadd --system --gid 10001 fleet \
    && useradd --system --uid 10001 --gid fleet --no-create-home --home-dir /var/lib/fleet \
        --shell /usr/sbin/nologin fleet \
    && install -d -o fleet -g fleet /var/lib/fleet
COPY --from=build /opt/fleet /opt/fleet
ENV PATH=/opt/fleet/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/var/lib/fleet \
    FLEET_STATE_DIR=/var/lib/fleet \
    FLEET_API_HOST=0.0.0.0
WORKDIR /var/lib/fleet
USER 10001:10001
EXPOSE 8000 5555
ENTRYPOINT ["fleet"]
CMD ["web"]
