# CUDA image for GPU nodes: the pipeline with faiss-gpu. Build: docker build -t lafite-pipeline .
# Run:  docker run --gpus all -v $PWD/data:/data lafite-pipeline embed /data/images --cache /data/cache
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-pip python3-venv libgomp1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/lafite
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY trainers ./trainers
COPY kernels ./kernels
COPY manifests ./manifests

# faiss-cpu and faiss-gpu ship the same `faiss` module: keep only the GPU build.
RUN python3 -m pip install --upgrade pip \
    && python3 -m pip install '.[gpu]' \
    && python3 -m pip uninstall -y faiss-cpu \
    && python3 -m pip install --force-reinstall --no-deps 'faiss-gpu-cu12>=1.8'

ENTRYPOINT ["pipeline"]
CMD ["--help"]
