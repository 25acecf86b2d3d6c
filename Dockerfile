# The gateway in a slim image, installed the way the README installs it: into a venv,
# with pip (not editable: nobody edits the source inside the image).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv && useradd --create-home --uid 10001 proxy

# setup.cfg (metadata, dependencies) and pyproject.toml (build system) describe the
# package, README.md is its long description. The demo mode (no provider configured)
# answers from the package's own mock upstream (proxy/mock/).
WORKDIR /src
COPY setup.cfg pyproject.toml README.md ./
COPY proxy ./proxy
# With the redis extra: the image can use a shared Redis for rate limits and the cache
# (redis.url / PROXY_REDIS_URL); without one configured, redis is never imported.
RUN pip install '.[redis]'

# Run from an empty directory (a mounted /app/proxy.yaml is picked up): workers start as
# `python -m proxy`, which would otherwise import the source tree in the working
# directory instead of the installed package.
WORKDIR /app
USER proxy
# The environment rather than --host/--port flags, which would silently override a
# PROXY_PORT given to `docker run -e`; the HEALTHCHECK reads the same variable.
ENV PROXY_HOST=0.0.0.0 PROXY_PORT=8080
EXPOSE 8080
# Liveness only: /healthz does no upstream I/O (see README). No curl in the slim image:
# Python's urllib, ignoring any HTTP(S)_PROXY set for the gateway's own traffic; an
# error status or a refused connection raises, so the check exits 1 (unhealthy).
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:%s/healthz' % os.environ.get('PROXY_PORT', '8080'), timeout=2)"]
ENTRYPOINT ["proxy"]
CMD ["serve"]
