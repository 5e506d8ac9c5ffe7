# alexnet-service. CPU image by default (torch from the PyTorch CPU index: no CUDA libraries).
#   docker build -t alexnet-service .
# CUDA image: the same file with CUDA wheels (run it with the NVIDIA container toolkit):
#   docker build -t alexnet-service:cuda --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu126 .
FROM python:3.11-slim

ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL}

WORKDIR /opt/alexnet

# Dependencies first, from pyproject.toml alone: code changes do not invalidate this layer.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
 && pip install -r requirements.txt \
 && rm requirements.txt

COPY README.md ./
COPY app ./app
COPY model ./model
RUN pip install --no-deps . \
 && rm -rf build ./*.egg-info \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/alexnet --shell /usr/sbin/nologin alexnet \
 && mkdir -p /var/lib/alexnet \
 && chown alexnet:alexnet /var/lib/alexnet

# No compiler in the image: torch.compile (ALEXNET_COMPILE) needs one and measured no gain
# for AlexNet on CPU; it stays off here.
ENV ALEXNET_HOME=/var/lib/alexnet \
    ALEXNET_HOST=0.0.0.0 \
    ALEXNET_PORT=8000 \
    ALEXNET_SHUTDOWN_TIMEOUT_S=8 \
    TORCH_HOME=/var/lib/alexnet/torch \
    MPLCONFIGDIR=/tmp/matplotlib
VOLUME ["/var/lib/alexnet"]
USER 10001:10001
WORKDIR /var/lib/alexnet
EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "app.healthcheck"]

# Exec form: the server is PID 1's only process and gets SIGTERM directly; it drains within
# ALEXNET_SHUTDOWN_TIMEOUT_S (8 s), below the stop grace period (compose: 20 s).
ENTRYPOINT ["alexnet"]
CMD ["serve"]
