# sparc retrieval service: gRPC on 50051, Prometheus metrics on 9464.
#   docker build -t sparc .
#   docker run --rm -p 50051:50051 -p 9464:9464 -v $PWD/runs:/app/runs sparc
# With no config the container serves the demo model and indexes (built on first start, a few minutes
# on CPU); mount a config with your checkpoint and bundles and pass --config to serve your own, e.g.
#   docker run --rm -p 50051:50051 -v $PWD/runs:/app/runs -v $PWD/bundles:/app/bundles \
#     -v $PWD/weights:/app/weights:ro -v $PWD/service.yaml:/app/service.yaml:ro sparc --config service.yaml
# (text and image queries need the CLIP / DINOv2 weights mounted; nothing is downloaded at run time).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    SPARC_HOST=0.0.0.0 SPARC_PORT=50051 SPARC_METRICS_PORT=9464

WORKDIR /app
# CPU-only torch (and the torchvision built for it) keeps the image small; faiss-cpu is the CPU FAISS build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch torchvision
COPY pyproject.toml README.md ./
COPY sparc_core ./sparc_core
COPY index ./index
COPY service ./service
COPY protos ./protos
RUN pip install . && python -m service.protogen && useradd --create-home --uid 10001 sparc \
    && mkdir -p /app/runs && chown -R sparc /app
USER sparc

EXPOSE 50051 9464
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD python -c "import grpc,sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; \
ch=grpc.insecure_channel('127.0.0.1:50051'); \
sys.exit(0 if g.HealthStub(ch).Check(h.HealthCheckRequest(), timeout=3).status == h.HealthCheckResponse.SERVING else 1)"
ENTRYPOINT ["sparc", "serve"]
