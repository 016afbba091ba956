# The project's image: every Kubeflow step and every TrainJob node runs it (README, section Kubeflow).
#   docker build -t REGISTRY/tsallis:TAG . && docker push REGISTRY/tsallis:TAG
#   export TSALLIS_IMAGE=REGISTRY/tsallis:TAG   # then: tsallis pipeline compile / submit
# Python 3.11 and the torch that the tests run (torch==2.13.0 in docker/requirements.txt). PyPI's Linux wheel of
# torch is its CUDA build and brings the CUDA and cuDNN runtime as nvidia-* wheels: the host needs only the driver.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DS_BUILD_OPS=0 \
    TQDM_DISABLE=1 \
    TSALLIS_HOME=/app \
    HF_HOME=/cache/huggingface

# Non-root user uid 1000; /app (where steps write outputs/) and the cache mount point belong to it.
RUN useradd --create-home --uid 1000 tsallis && mkdir -p /app /cache/huggingface && chown -R tsallis /app /cache
WORKDIR /app

# Dependencies first, pinned: this big layer is rebuilt only when docker/requirements.txt changes.
COPY --chown=1000 docker/requirements.txt docker/requirements.txt
RUN pip install --no-cache-dir -r docker/requirements.txt

# The package with its DeepSpeed and Kubeflow extras (already satisfied by the pins above), the configs that
# `tsallis train --config configs/...` reads; tsallis_kubeflow (components, pipeline, `tsallis pipeline`) is
# installed with the package, and components/ and pipelines/ re-export it.
COPY --chown=1000 pyproject.toml README.md ./
COPY --chown=1000 tsallis_core/ tsallis_core/
COPY --chown=1000 tsallis_kubeflow/ tsallis_kubeflow/
RUN pip install --no-cache-dir --constraint docker/requirements.txt ".[deepspeed,kubeflow]" && pip check
COPY --chown=1000 configs/ configs/
COPY --chown=1000 components/ components/
COPY --chown=1000 pipelines/ pipelines/

# The model and dataset cache (HF_HOME) is the PVC mounted at /cache (writable by uid 1000: README, Kubeflow).
USER 1000
VOLUME ["/cache"]

CMD ["tsallis", "--help"]
