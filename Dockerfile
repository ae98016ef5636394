# Wan 2.1 VACE server, GPU image. Weights are never baked in: mount them and point
# WAN_VACE_WEIGHTS_DIR at the folder (see README, "Serving the 14B model").
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    WAN_VACE_DATA_DIR=/data

# Unpinned on purpose: the distribution's python3 gets security fixes with each rebuild.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
# Dependencies before code, so a code change does not reinstall torch. [cluster] brings the
# PostgreSQL and S3 drivers, so one image serves every role (docs/cluster.md).
COPY pyproject.toml README.md ./
RUN mkdir -p server pipelines preprocessors \
    && touch server/__init__.py pipelines/__init__.py preprocessors/__init__.py \
    && pip install torch==2.11.0 torchvision==0.26.0 \
    && pip install "./[cluster]"
COPY server ./server
COPY pipelines ./pipelines
COPY preprocessors ./preprocessors
COPY weights.toml ./
COPY scripts ./scripts
RUN pip install --no-deps .

EXPOSE 8000
VOLUME ["/data"]
# Ready means weights loaded and a warm-up ran: loading the 14B model takes minutes.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health/ready')"]
CMD ["wan-vace", "serve", "--host", "0.0.0.0", "--port", "8000", "--model", "wan2.1-vace-14b"]
