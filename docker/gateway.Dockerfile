# syntax=docker/dockerfile:1
# unclip gateway: the OpenAI-compatible HTTP door (OpenAI Images API, playground) in front of the orchestrator.
# Built from the repository root, CPU (default) or CUDA:
#   docker build -f docker/gateway.Dockerfile -t unclip-gateway:0.1.0-cpu .
#   docker build -f docker/gateway.Dockerfile --build-arg VARIANT=cuda -t unclip-gateway:0.1.0-cuda .
ARG VARIANT=cpu

# ---- bases ------------------------------------------------------------------------------------------------
# CPU: Debian's slim Python and torch's CPU-only wheels (no multi-GB CUDA libraries).
FROM python:3.11-slim-bookworm AS base-cpu
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# CUDA: NVIDIA's runtime image (CUDA + cuDNN user space; the node supplies the driver) with Ubuntu's Python.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS base-cuda
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && ln -s /usr/bin/python3 /usr/local/bin/python
ENV TORCH_INDEX_URL=https://pypi.org/simple

# ---- build: a virtual environment with the pinned dependencies and the generated gRPC stubs ----------------
FROM base-${VARIANT} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first and alone, from the index of this variant, so nothing else pulls another build of it.
RUN pip install --index-url "$TORCH_INDEX_URL" torch==2.13.0
WORKDIR /app
COPY pyproject.toml ./
COPY protos/ protos/
COPY unclip/ unclip/
COPY services/ services/
COPY training/ training/
COPY policies/ policies/
RUN rm -rf unclip/v1 \
 && pip install -e . \
 && mkdir -p unclip/v1 \
 && python -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. protos/unclip/v1/*.proto \
 && touch unclip/v1/__init__.py \
 && python -m compileall -q unclip services training

# ---- runtime: no compilers, no pip caches; a non-root user; the root filesystem can be mounted read-only ---
FROM base-${VARIANT} AS runtime
RUN groupadd --system --gid 10001 unclip \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin unclip
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    UNCLIP_PORT=8080 \
    UNCLIP_METRICS_PORT=9464
WORKDIR /app
USER 10001:10001
EXPOSE 8080 9464
ENTRYPOINT ["python", "-m", "services.gateway"]
