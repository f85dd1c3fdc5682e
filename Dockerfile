# The fluxtrain service. By default a CUDA image: the torch 2.13.0 wheels on PyPI are built for
# CUDA 13.0 (they depend on cuda-toolkit 13.0.3 and bring their own CUDA libraries), so the base
# is the matching CUDA 13.0 runtime. Any Debian or Ubuntu base with Python 3.11+ works too:
# `make test-container` builds this file over a plain Debian bookworm with the CPU torch wheel.
ARG BASE_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    && python3 -m venv /opt/venv

# TORCH_SPEC and TORCH_FIND_LINKS choose the torch build (`torch==2.13.0+cpu` from a wheel folder
# mounted into the build, say); EXTRAS are the pyproject extras installed (`cuda`, bitsandbytes,
# only where there is CUDA); PIP_CERT is a CA bundle for builds behind a TLS-intercepting proxy.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_FIND_LINKS=
ARG EXTRAS=cloud,cuda
ARG PIP_CERT

# Slowest-changing first: torch, then the dependencies pyproject.toml names, then the source, so
# a code change reinstalls nothing but fluxtrain itself.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install ${TORCH_FIND_LINKS:+--find-links "$TORCH_FIND_LINKS"} "$TORCH_SPEC"
COPY pyproject.toml /src/pyproject.toml
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c 'import sys, tomllib; project = tomllib.load(open("/src/pyproject.toml", "rb"))["project"]; extras = [name for name in sys.argv[1].split(",") if name]; print("\n".join(project["dependencies"] + [r for name in extras for r in project["optional-dependencies"][name]]))' "$EXTRAS" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt
COPY README.md /src/README.md
COPY fluxtrain /src/fluxtrain
RUN pip install --no-cache-dir --no-deps --no-build-isolation /src \
    && pip check \
    && useradd --create-home --uid 10001 --user-group fluxtrain \
    && mkdir -p /data /models \
    && chown fluxtrain:fluxtrain /data /models

# The seed's settings: the data root and the models root are the two volumes; the Hugging Face
# cache (for a hub-id caption model) lives in the data volume so it outlives the container.
ENV FLUXTRAIN_HOST=0.0.0.0 \
    PORT=8000 \
    MOUNT_PATH=/data \
    FS_PATH=/models \
    HF_HOME=/data/cache/huggingface
VOLUME ["/data", "/models"]
WORKDIR /home/fluxtrain
USER fluxtrain
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=4)"]
CMD ["fluxtrain", "serve"]
