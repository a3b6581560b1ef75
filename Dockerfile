# The zoedge fleet server: FastAPI + uvicorn, SQLite in /data by default or PostgreSQL via ZOEDGE_DATABASE_URL.
# No torch: the server replays trajectories and averages patches with numpy only.
#   docker build -t zoedge-server .
#   docker run -p 8080:8080 -v zoedge-data:/data -e ZOEDGE_ADMIN_TOKEN=change-me zoedge-server
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    ZOEDGE_DATA_DIR=/data

WORKDIR /app
COPY pyproject.toml README.md ./
COPY zoedge ./zoedge
RUN pip install ".[server]" \
    && useradd --system --uid 10001 --home /data zoedge \
    && mkdir -p /data && chown zoedge /data

USER zoedge
VOLUME ["/data"]
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/v1/health', timeout=4)"
CMD ["zoedge", "serve", "--host", "0.0.0.0"]
