# syntax=docker/dockerfile:1
# The MRC reward service on the CPU (no GPU, CPU-only torch). Build from the repository root:
#
#   docker build -f docker/reward-cpu.Dockerfile -t carve3d/mrc-reward:0.1.0-cpu .
#   docker run -p 127.0.0.1:8080:8080 -v mrc-cache:/cache carve3d/mrc-reward:0.1.0-cpu
#
# Same build arguments, entrypoint, user, volume, port and health check as docker/reward.Dockerfile;
# torch comes from PyTorch's CPU wheel index (TORCH_INDEX_URL), pinned like the Makefile.
# Base digest taken from public Dockerfiles pinning the same tag (the multi-arch index), not checked
# against the registry from here.
FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

ARG TORCH="torch==2.14.1 torchvision==0.29.1"
ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"
ARG EXTRAS=""
ARG FETCH_WEIGHTS=""

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    TORCH_HOME=/cache/torch \
    HF_HOME=/cache/hf \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    MRC_BAKED_WEIGHTS=/opt/mrc/weights/torch \
    MRC_HOST=0.0.0.0 \
    MRC_PORT=8080 \
    MRC_DEVICE=cpu

RUN python -m venv /opt/venv \
    && pip install --index-url "$TORCH_INDEX_URL" $TORCH

COPY services/reward /opt/mrc/src/services/reward
RUN pip install "/opt/mrc/src/services/reward${EXTRAS:+[$EXTRAS]}" && mrc --version

COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/mrc-entrypoint
COPY --chmod=0644 docker/healthcheck.py /usr/local/bin/mrc-healthcheck

RUN if [ -n "$FETCH_WEIGHTS" ]; then \
        TORCH_HOME=/opt/mrc/weights/torch MRC_BAKED_WEIGHTS=/nonexistent FETCH_WEIGHTS="$FETCH_WEIGHTS" \
            /usr/local/bin/mrc-entrypoint true; \
    fi \
    && useradd --uid 10001 --user-group --create-home --home-dir /home/mrc --shell /usr/sbin/nologin mrc \
    && mkdir -p /cache/torch /cache/hf \
    && chown -R 10001:10001 /cache
LABEL org.opencontainers.image.title="carve3d-mrc-reward-cpu" \
      org.opencontainers.image.description="Carve3D MRC reward service (CPU)" \
      org.carve3d.baked-weights="${FETCH_WEIGHTS:-none}"

USER 10001:10001
WORKDIR /home/mrc
VOLUME ["/cache"]
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["/opt/venv/bin/python", "/usr/local/bin/mrc-healthcheck"]
ENTRYPOINT ["/usr/local/bin/mrc-entrypoint"]
CMD ["mrc", "serve", "--host", "0.0.0.0"]
