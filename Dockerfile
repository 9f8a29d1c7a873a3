# mailplatform: one image for web, smtp, worker, beat and the one-shot jobs (docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DJANGO_SETTINGS_MODULE=mailplatform.settings \
    DATA_DIR=/data \
    SPOOL_DIR=/spool \
    STATIC_ROOT=/app/staticfiles

WORKDIR /app

# Dependencies first, so a code change does not reinstall them.
COPY requirements.txt .
RUN pip install -r requirements.txt

# A user of its own; /data and /spool belong to it (a new named volume copies this ownership).
RUN groupadd --system --gid 10001 mailplatform \
    && useradd --system --uid 10001 --gid mailplatform --home-dir /app --shell /usr/sbin/nologin mailplatform \
    && mkdir -p /data /spool \
    && chown mailplatform:mailplatform /data /spool

COPY . .

# Static files are collected into the image (whitenoise serves them). The throwaway DATA_DIR
# takes the secrets settings would otherwise generate, so none is baked into a layer.
RUN DATA_DIR=/tmp/build python manage.py collectstatic --noinput --verbosity 0 \
    && rm -rf /tmp/build \
    && python -m compileall -q /app

USER mailplatform
EXPOSE 8000 2525

HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"

# --no-proxy-headers: only TRUSTED_PROXIES decides whose X-Forwarded-For is believed (uvicorn
# would otherwise believe anyone on loopback). --lifespan off: Django has no lifespan events.
CMD ["uvicorn", "mailplatform.asgi:application", "--host", "0.0.0.0", "--port", "8000", "--workers", "2", "--no-server-header", "--no-proxy-headers", "--lifespan", "off"]
