# syntax=docker/dockerfile:1
# The MRC reward service on an NVIDIA GPU. Build from the repository root:
#
#   docker build -f docker/reward.Dockerfile -t carve3d/mrc-reward:0.1.0 .
#   docker run --gpus all -p 127.0.0.1:8080:8080 -v mrc-cache:/cache carve3d/mrc-reward:0.1.0
#
# Build arguments:
#   TORCH          the torch pin; keep it equal to TORCH in the Makefile (tests/test_deploy.py checks)
#   EXTRAS         extras of carve3d-reward to install, e.g. "triton" once the Triton engine has one
#   FETCH_WEIGHTS  weights to bake into the image (lpips-alex, lpips-vgg, lpips-all); default: none.
#                  Without it weights are fetched into the /cache volume on first start instead
#                  (docker/entrypoint.sh, env FETCH_WEIGHTS). The image label org.carve3d.baked-weights
#                  records what was baked.
#
# Base: CUDA 13.0 runtime, the CUDA of the torch 2.14.1 wheels (torch.version.cuda == "13.0"); the wheels
# also bring their own CUDA libraries, so the base mainly fixes the driver requirement (>= 580).
# Digest taken from public Dockerfiles pinning the same tag, not checked against the registry from here:
# `docker buildx imagetools inspect nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04` shows the current one.
FROM nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04@sha256:f2c12914cf4751e61073843724275aa35d4817e01dbdc87eac03905971628c6e

ARG TORCH="torch==2.14.1 torchvision==0.29.1"
ARG EXTRAS=""
ARG FETCH_WEIGHTS=""

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
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
    MRC_DEVICE=cuda

# Ubuntu 24.04's Python is 3.12 (the project needs >= 3.11).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && pip install $TORCH

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
LABEL org.opencontainers.image.title="carve3d-mrc-reward" \
      org.opencontainers.image.description="Carve3D MRC reward service (GPU)" \
      org.carve3d.baked-weights="${FETCH_WEIGHTS:-none}"

USER 10001:10001
WORKDIR /home/mrc
VOLUME ["/cache"]
EXPOSE 8080
STOPSIGNAL SIGTERM
# A cold start loads the model (and may fetch weights): a long start period.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["/opt/venv/bin/python", "/usr/local/bin/mrc-healthcheck"]
ENTRYPOINT ["/usr/local/bin/mrc-entrypoint"]
CMD ["mrc", "serve", "--host", "0.0.0.0"]
