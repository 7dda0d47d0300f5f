#!/usr/bin/env bash
# Packs what a lent GPU machine lacks for this project into .whl/site.tar.xz (git-ignored; ~10 MB): the device
# image has torch 2.11 (CUDA), transformers 5.17, tokenizers, huggingface_hub, safetensors, numpy, pillow, but not
# diffusers, the gRPC extras, protobuf 7, OpenTelemetry or minio. cp312 wheels, unpacked and xz-compressed, because
# the tree with models/shapes-toy is 52 of the 64 MiB a device call may carry.
#   here:  scripts/device_site.sh && make proto
#   there: carry [".whl", "unclip/v1"]; begin the command with
#          mkdir -p /tmp/site && tar xJf .whl/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD
# (used in session 4 for benchmarks.karlo_size and tests/unit/test_cuda.py on an H200).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
platforms=""
for p in manylinux_2_34_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 manylinux1_x86_64; do
  platforms="$platforms --platform $p"
done
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
  -d "$work/wheels" \
  diffusers==0.42.1 grpcio==1.85.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 \
  grpcio-status==1.85.1 googleapis-common-protos==1.76.0 protobuf==7.36.2 \
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-exporter-otlp-proto-grpc==1.45.2 \
  opentelemetry-exporter-otlp-proto-common==1.45.2 opentelemetry-proto==1.45.2 \
  opentelemetry-instrumentation==0.66b2 opentelemetry-instrumentation-grpc==0.66b2 \
  opentelemetry-semantic-conventions==0.66b2 importlib_metadata==10.2.0 \
  minio==7.2.20 argon2-cffi==25.1.0 argon2-cffi-bindings==26.2.0 pycryptodome==4.4.0 cffi==2.1.1 pycparser==3.12
mkdir -p "$work/site" .whl
for wheel in "$work"/wheels/*.whl; do (cd "$work/site" && python3 -m zipfile -e "$wheel" .); done
tar cJf .whl/site.tar.xz -C "$work/site" .
ls -la .whl/site.tar.xz
