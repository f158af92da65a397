# sparc retrieval service: gRPC on 50051, Prometheus metrics on 9464.
#   docker build -t sparc .
#   docker run --rm -p 50051:50051 -p 9464:9464 -v $PWD/runs:/app/runs sparc
# With no config the container serves the demo model and indexes (built on first start, a few minutes
# on CPU); mount a config with your checkpoint and bundles and pass --config to serve your own, e.g.
#   docker run --rm -p 50051:50051 -v $PWD/runs:/app/runs -v $PWD/bundles:/app/bundles \
#     -v $PWD/weights:/app/weights:ro -v $PWD/service.yaml:/app/service.yaml:ro sparc --config service.yaml
# (text and image queries need the CLIP / DINOv2 weights mounted; nothing is downloaded at run time).
#
# CUDA variant (CUDA 12 torch wheels and faiss-gpu; run with --gpus all):
#   docker build --build-arg VARIANT=gpu -t sparc:gpu .
#   docker run --rm --gpus all -p 50051:50051 -v $PWD/runs:/app/runs sparc:gpu
ARG PYTHON=3.11
FROM python:${PYTHON}-slim
ARG VARIANT=cpu

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    SPARC_HOST=0.0.0.0 SPARC_PORT=50051 SPARC_METRICS_PORT=9464

# The CPU image takes CPU-only torch (small); the CUDA image the CUDA 12 wheels, which carry their runtime.
RUN if [ "$VARIANT" = gpu ]; then pip install --index-url https://download.pytorch.org/whl/cu124 torch torchvision; \
    else pip install --index-url https://download.pytorch.org/whl/cpu torch torchvision; fi

# The wheel is built from exactly what is copied here: setup.py is the build hook that generates the gRPC
# stubs from protos/ into the package, so the installed sparc carries service/_proto.
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY protos ./protos
COPY sparc_core ./sparc_core
COPY index ./index
COPY service ./service
RUN pip wheel --no-deps --wheel-dir /tmp/wheels . \
    && if [ "$VARIANT" = gpu ]; then pip install "$(ls /tmp/wheels/sparc-*.whl)[encoders,plots,hdf5,gpu,milvus,seismic]"; \
       else pip install "$(ls /tmp/wheels/sparc-*.whl)[encoders,plots,hdf5,cpu,milvus,seismic]"; fi \
    && rm -rf /tmp/wheels /src \
    && useradd --create-home --uid 10001 sparc && mkdir -p /app/runs && chown -R sparc /app

WORKDIR /app
# numba's compiled search kernels live in the image: compiled here once, loaded by every fresh container
# (a cold start answers its first query in milliseconds); a CPU unlike the build machine's recompiles them
ENV NUMBA_CACHE_DIR=/app/numba-cache
RUN python -c "from index.searcher import warm_kernel_cache; warm_kernel_cache()" && chown -R sparc /app/numba-cache
USER sparc

EXPOSE 50051 9464
# the probe reads the server's settings (SPARC_CONFIG, SPARC_*): it follows the configured port and TLS
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 CMD ["python", "-m", "service.healthcheck"]
ENTRYPOINT ["sparc", "serve"]
