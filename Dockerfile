# The image every node of configs/cluster/runpod.yaml runs: CUDA, Python 3.11, rsync (Ray copies
# the bootstrap config and file_mounts with it before any set-up command), sshd (Ray drives the
# pods over SSH), and the project's pinned stack. No model weights: models live on the network
# volume. The code in the image is only the starting point: `ray up` rsyncs the checkout over
# /root/awq-serve, which is installed in editable mode, so the shipped code is what runs.
#
#   docker build -t ghcr.io/<you>/awq-serve:0.1.0 .
#   docker push ghcr.io/<you>/awq-serve:0.1.0     # a public image, or add registry auth in RunPod
#
# Rebuild when pyproject.toml changes (dependencies); code changes need only `ray up`.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
FROM ${CUDA_IMAGE}

# The CUDA build of torch matching the base image (the CPU-only default would not see the GPU).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv python3.11-dev build-essential \
        openssh-server rsync git curl ca-certificates dnsutils tini \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /run/sshd /root/.ssh && chmod 700 /root/.ssh \
    && python3.11 -m venv $VIRTUAL_ENV

WORKDIR /root/awq-serve

# Dependencies first, in their own layer: a code-only change rebuilds nothing below.
COPY pyproject.toml README.md ./
RUN pip install --upgrade pip \
    && pip install torch==2.13.0 --index-url ${TORCH_INDEX} \
    && python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(x for x in d['dependencies'] if not x.startswith('torch')))" > /tmp/deps.txt \
    && pip install -r /tmp/deps.txt

COPY . .
RUN pip install --no-deps -e . \
    && python -c "import cluster.runpod, deployments.app, quantization.pipeline"

# RunPod puts the account's SSH public keys in PUBLIC_KEY; the start script installs them and
# runs sshd (what RunPod's own images do). tini reaps the processes Ray leaves behind.
COPY cluster/pod_start.sh /usr/local/bin/pod_start.sh
RUN chmod +x /usr/local/bin/pod_start.sh
EXPOSE 22 8000
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["/usr/local/bin/pod_start.sh"]
