# The imgemb code-location image: serves the Dagster definitions over gRPC.
# torch from PyPI on linux/x86_64 is a CUDA build, so the same image runs the
# embedding step on a GPU node (with the NVIDIA container runtime) or on CPU.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DAGSTER_HOME=/opt/dagster/home \
    TORCH_HOME=/opt/torch

RUN useradd --create-home --uid 10001 imgemb \
    && mkdir -p "$DAGSTER_HOME" "$TORCH_HOME" \
    && chown imgemb "$DAGSTER_HOME" "$TORCH_HOME"

WORKDIR /opt/dagster/app

# Dependencies first, so code changes do not reinstall torch.
COPY pyproject.toml README.md ./
COPY imgemb_assets/__init__.py imgemb_assets/__init__.py
RUN pip install .

COPY imgemb_assets ./imgemb_assets
COPY workspace.yaml ./
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
