# The app alone; `docker compose up` adds PostgreSQL (see compose.yaml).
FROM python:3.11-slim-bookworm

WORKDIR /app
COPY requirements.txt .
# Only the runtime block of requirements.txt (its lines up to the first blank one): the image's
# DATABASE_URL always names compose's PostgreSQL, so it needs neither the embedded server nor pytest.
# --no-deps installs exactly the pinned lines; pip check fails the build if a dependency is missing.
RUN sed '/^$/q' requirements.txt > runtime.txt \
 && pip install --no-cache-dir --no-deps -r runtime.txt \
 && pip check

COPY app.py schema.sql index.html ./
RUN useradd --system --no-create-home --uid 10001 newsletter
USER 10001

ENV HOST=0.0.0.0 PORT=8000 PYTHONUNBUFFERED=1
EXPOSE 8000
# No curl in a slim image: Python itself asks /healthz (503 while the listener is down).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"PORT\"]}/healthz', timeout=2)"]
CMD ["python", "app.py"]
