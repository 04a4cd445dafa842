# One peerlearn peer daemon. Build: `docker build -t peerlearn .`
# Run:   docker run --rm -p 7000:7000 -p 8000:8000 -e PEERLEARN_PEERS='["host-b:7000"]' \
#            -e PEERLEARN_ADVERTISE=host-a:7000 peerlearn
# Every node setting is a PEERLEARN_* variable (nested with __, e.g. PEERLEARN_LR__ETA=0.5),
# or pass flags after the image name: `docker run peerlearn run --steps 200 …`.
# docker-compose.yml runs three of these plus Prometheus and Grafana (docs/deploy.md).
FROM python:3.11-slim

# OPENBLAS/OMP/MKL: one BLAS thread per worker thread (the daemon runs a thread per worker).
# MPLCONFIGDIR: matplotlib (imported by some problems) wants a writable config directory.
# PEERLEARN_LISTEN/API: in a container the daemon listens on every interface, the API too
# (for /metrics scrapes and the health check); compose and Kubernetes set the rest.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OPENBLAS_NUM_THREADS=1 \
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    PEERLEARN_LISTEN=0.0.0.0:7000 \
    PEERLEARN_API=0.0.0.0:8000

WORKDIR /src
# Only what the package needs (see .dockerignore): the runtime dependencies, not the dev extras.
COPY pyproject.toml README.md ./
COPY peerlearn ./peerlearn
RUN pip install --no-cache-dir . \
    && rm -rf /src \
    && groupadd --system --gid 10001 peerlearn \
    && useradd --system --uid 10001 --gid peerlearn --home-dir /home/peerlearn --create-home \
       --shell /usr/sbin/nologin peerlearn \
    && install -d -o 10001 -g 10001 /var/lib/peerlearn
# /var/lib/peerlearn: the daemon's data (--out), a volume in compose and in Kubernetes; owned
# by the user here, so that a named volume mounted on it starts writable.

WORKDIR /home/peerlearn
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001

# 7000: peer links (between daemons); 8000: control API and /metrics.
EXPOSE 7000 8000

# /status answers as soon as the API is up (state "starting", then "running"); slim has no
# curl, so Python's urllib does the request.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/status', timeout=4)"]

ENTRYPOINT ["peerlearn"]
CMD ["run"]
