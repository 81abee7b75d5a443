# The imgemb code-location image: serves the Dagster definitions over gRPC.
# torch from PyPI on linux/x86_64 is a CUDA build, so the same image runs the
# embedding step on a GPU node (with the NVIDIA container runtime) or on CPU.
#
#   docker build -t imgemb .                      CUDA-capable torch from PyPI (~7 GB image)
#   docker build -t imgemb-cpu \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#                                                 CPU-only torch (no CUDA libraries): a much smaller
#                                                 image for CPU-only run workers and the code server
#
# deploy/image/build.sh builds this file with podman on hosts without Docker or a registry
# (`make image`), and deploy/image/smoke_test.sh checks the result (`make image-smoke`).
FROM python:3.11-slim

# DAGSTER_MAX_PARTITIONS_FOR_DA_TIMESTAMP_FETCH: automation tells "written after its upstream
# changed" by the events' times (dagster_wiring/location/automation.py); past this many partitions of one
# table updated between two evaluations Dagster uses the evaluation's time instead (default 100),
# which can run a chunk of a big backfill twice. Read by the daemon.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DAGSTER_MAX_PARTITIONS_FOR_DA_TIMESTAMP_FETCH=2000 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DAGSTER_HOME=/opt/dagster/home \
    TORCH_HOME=/opt/torch

RUN useradd --create-home --uid 10001 imgemb \
    && mkdir -p "$DAGSTER_HOME" "$TORCH_HOME" \
    && chown imgemb "$DAGSTER_HOME" "$TORCH_HOME"

WORKDIR /opt/dagster/app

# Extra wheel sources for pip, read by pip itself from these variables during the RUNs below (build
# args stay out of the image's environment, though `docker history` shows their values). Empty by
# default: plain PyPI, as on any Docker host.
# deploy/image/build.sh passes the build host's local wheel folders and indexes here (mounted
# read-only for the build), so several GB of torch and CUDA wheels are not downloaded again.
ARG PIP_FIND_LINKS=""
ARG PIP_EXTRA_INDEX_URL=""
ARG PIP_CONSTRAINT=""
# Where torch and torchvision come from when set, e.g. https://download.pytorch.org/whl/cpu for a
# CPU-only image; the versions stay those pyproject.toml allows. Empty: PyPI's (CUDA) build.
ARG TORCH_INDEX_URL=""

# Dependencies first, from pyproject.toml alone, so editing the code or the README does not
# reinstall torch: this layer is rebuilt only when the dependencies change.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
    && if [ -n "$TORCH_INDEX_URL" ]; then \
         grep -E '^(torch|torchvision)([^A-Za-z0-9_.-]|$)' /tmp/requirements.txt > /tmp/torch-requirements.txt \
         && pip install --index-url "$TORCH_INDEX_URL" -r /tmp/torch-requirements.txt; \
       fi \
    && pip install -r /tmp/requirements.txt \
    && rm -f /tmp/requirements.txt /tmp/torch-requirements.txt \
    && pip check

COPY README.md ./
COPY imgemb_assets ./imgemb_assets
# workspace.yaml: `dagster dev -w` from here; dagster.yaml: the local instance settings that
# `python -m imgemb_assets.demo` copies into its DAGSTER_HOME.
COPY workspace.yaml dagster.yaml ./
RUN pip install --no-deps .

# Set PREFETCH_WEIGHTS=1 where the build can reach the network, so runs never
# download torchvision's ResNet50 weights at start-up.
ARG PREFETCH_WEIGHTS=0
RUN if [ "$PREFETCH_WEIGHTS" = "1" ]; then \
      python -c "from torchvision.models import ResNet50_Weights as W; W.DEFAULT.get_state_dict(progress=False)" \
      && chown -R imgemb "$TORCH_HOME"; \
    fi

USER imgemb
EXPOSE 4000
CMD ["dagster", "code-server", "start", "-h", "0.0.0.0", "-p", "4000", "-m", "imgemb_assets.definitions", "--location-name", "imgemb"]
