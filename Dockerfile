# The gateway in a slim image, installed the way the README installs it.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN useradd --create-home --uid 10001 proxy
WORKDIR /app
COPY setup.cfg pyproject.toml README.md ./
COPY proxy ./proxy
COPY bench ./bench
RUN pip install .

USER proxy
EXPOSE 8080
# Liveness only: /healthz does no upstream I/O (see README, "Health").
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"
ENTRYPOINT ["proxy"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
