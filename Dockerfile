# One image for the operator and the trainer workers.
#   GPU nodes (default):  docker build -t kubetune .
#   CPU only:             docker build --build-arg TORCH_VARIANT=cpu -t kubetune:cpu .
# The operator runs `kubetune operator`; worker pods run `kubetune worker ...`.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# cu126 (CUDA 12.6 wheels, for GPU nodes) or cpu: the PyTorch wheel index to install from.
ARG TORCH_VARIANT=cu126
ARG TORCH_VERSION=2.13.0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
# torch first, from the variant's index, so the project install finds it satisfied.
RUN python -m venv /opt/kubetune \
    && /opt/kubetune/bin/pip install --no-cache-dir \
        --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
        "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY trainer ./trainer
COPY operator ./operator
RUN /opt/kubetune/bin/pip install --no-cache-dir . \
    && /opt/kubetune/bin/kubetune --version

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="kubetune" \
      org.opencontainers.image.description="Kubernetes-native hyperparameter tuning operator and trainer" \
      org.opencontainers.image.licenses="Apache-2.0"
# No compilers or pip caches here: only the virtual environment built above.
COPY --from=build /opt/kubetune /opt/kubetune
RUN groupadd --system --gid 10001 kubetune \
    && useradd --system --uid 10001 --gid kubetune --no-create-home --home-dir /tmp kubetune
ENV PATH=/opt/kubetune/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["kubetune"]
CMD ["--help"]
