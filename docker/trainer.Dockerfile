# syntax=docker/dockerfile:1
# The Carve3D trainer (package carve3d_trainer, CLI carve3d-train) next to the reward service.
# Build from the repository root:
#
#   docker build -f docker/trainer.Dockerfile -t carve3d/trainer:0.1.0 .
#
# It installs carve3d-reward (for carve3d_reward.client) and services/trainer when that folder exists;
# an image built without it starts, says so and exits 78 (docker/trainer-entrypoint.sh).
# The trainer reaches the service through MRC_URL and MRC_AUTH_TOKEN (environment).
# Same pinned CUDA base as docker/reward.Dockerfile (digest not checked against the registry from here).
FROM nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04@sha256:f2c12914cf4751e61073843724275aa35d4817e01dbdc87eac03905971628c6e

ARG TORCH="torch==2.14.1 torchvision==0.29.1"

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
    MPLCONFIGDIR=/tmp/matplotlib

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && pip install $TORCH

COPY services /opt/mrc/src/services
RUN pip install /opt/mrc/src/services/reward \
    && if [ -f /opt/mrc/src/services/trainer/pyproject.toml ]; then \
           pip install /opt/mrc/src/services/trainer && python -c "import carve3d_trainer"; \
       else \
           echo "services/trainer is absent: building the trainer image without carve3d-train"; \
       fi

COPY --chmod=0755 docker/trainer-entrypoint.sh /usr/local/bin/trainer-entrypoint

RUN useradd --uid 10001 --user-group --create-home --home-dir /home/trainer --shell /usr/sbin/nologin trainer \
    && mkdir -p /cache/torch /cache/hf /out \
    && chown -R 10001:10001 /cache /out
LABEL org.opencontainers.image.title="carve3d-trainer" \
      org.opencontainers.image.description="Carve3D RL finetuning against the MRC reward service"

USER 10001:10001
WORKDIR /home/trainer
VOLUME ["/cache", "/out"]
ENTRYPOINT ["/usr/local/bin/trainer-entrypoint"]
CMD ["carve3d-train", "train", "--run-dir", "/out/run", "--resume", "--no-progress"]
