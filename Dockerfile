# stompgate: STOMP over TCP (61613) and HTTP (8000: WebSocket /stomp, REST, /health, /ready, /metrics).
# Settings come from the environment (STOMPGATE_STORE, STOMPGATE_USERS_FILE, STOMPGATE_TLS_CERTFILE, ...).
# On 0.0.0.0 the gateway refuses to start without users: mount a users file and set STOMPGATE_USERS_FILE,
# or set STOMPGATE_ALLOW_ANONYMOUS=true for a trusted network.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    STOMPGATE_STORE=sqlite:////data/stompgate.db

RUN useradd --system --create-home --uid 10001 stompgate \
    && mkdir /data && chown stompgate:stompgate /data

WORKDIR /src
COPY pyproject.toml README.md ./
COPY stomp_core ./stomp_core
COPY app ./app
RUN pip install ".[mongodb]" && rm -rf /src

USER stompgate
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000 61613

HEALTHCHECK --interval=10s --timeout=3s --start-period=10s \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status != 200)"

CMD ["stompgate", "serve", "--host", "0.0.0.0"]
