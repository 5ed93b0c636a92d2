# syntax=docker/dockerfile:1
# NVIDIA Triton with the MRC model repository and the carve3d_reward package its Python backend imports.
# The stock tritonserver image has neither torch nor our package, so the model would fail to load there.
# Build from the repository root:
#
#   docker build -f docker/triton.Dockerfile -t carve3d/mrc-triton:0.1.0 .
#   docker run --gpus all -p 127.0.0.1:8001:8001 -v mrc-cache:/cache carve3d/mrc-triton:0.1.0
#
# Base pinned by its exact release tag (no digest could be checked from the build machine: pin one with
# `docker buildx imagetools inspect nvcr.io/nvidia/tritonserver:25.08-py3` before production use).
FROM nvcr.io/nvidia/tritonserver:25.08-py3

ARG TORCH="torch==2.14.1 torchvision==0.29.1"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TORCH_HOME=/cache/torch \
    HF_HOME=/cache/hf \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib

# The Python backend runs the image's system Python: install torch and the package there.
RUN pip install $TORCH
COPY services/reward /opt/mrc/src/services/reward
RUN pip install /opt/mrc/src/services/reward && python -c "import carve3d_reward.model"
COPY services/reward/triton/model_repository /models

RUN useradd --uid 10001 --user-group --create-home --home-dir /home/mrc --shell /usr/sbin/nologin mrc \
    && mkdir -p /cache/torch /cache/hf \
    && chown -R 10001:10001 /cache
LABEL org.opencontainers.image.title="carve3d-mrc-triton" \
      org.opencontainers.image.description="NVIDIA Triton serving the Carve3D MRC model (Python backend)"

USER 10001:10001
WORKDIR /home/mrc
VOLUME ["/cache"]
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4)"]
CMD ["tritonserver", "--model-repository=/models", "--http-port=8000", "--grpc-port=8001", "--metrics-port=8002"]
