# TRACE env server: the forkable ReAct search/QA environment (DESIGN §2), no torch.
#
#   docker build -t trace-env .
#   docker run -p 8000:8000 trace-env                                   # built-in synthetic world
#   docker run -p 8000:8000 -v $PWD/data:/data trace-env \
#       --data nq=/data/nq_test.jsonl --corpus /data/wiki.jsonl --index-dir /index
#
# Arguments after the image name are appended to the ENTRYPOINT, so they override its defaults (the last
# --port/--host wins). /health needs no token; the HEALTHCHECK probes it on port 8000 and turns unhealthy
# (503) while the server drains on SIGTERM. Volumes: /data (question sets, corpora), /index (on-disk search
# indexes), /cache (the synthetic world and indexes built on first use, TRACE_CACHE_DIR).
#
# Keep the RUN pip/ENTRYPOINT/HEALTHCHECK lines one JSON/shell line each: tests/test_container.py parses them
# and runs these exact install and start steps (there is no Docker engine in CI).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
ENV TRACE_CACHE_DIR=/cache

WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY env_server ./env_server
RUN pip install .

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin trace && mkdir -p /data /index /cache && chown trace:trace /data /index /cache
USER trace
VOLUME ["/data", "/index", "/cache"]
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["trace-env", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD []
