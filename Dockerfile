# One image for the gateway and the stock daemon. The Python layer is built from pyproject.toml (the
# same dependency pins `make install` uses), so the image cannot drift from a local install.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY stock_daemon ./stock_daemon
RUN pip install . && useradd --system --no-create-home gateway

COPY web/index.html web/app.js web/style.css ./web/
COPY web/vendor ./web/vendor
ENV GATEWAY_WEB_ROOT=/app/web

USER gateway
EXPOSE 8181
CMD ["stomp-gateway", "--host", "0.0.0.0", "--port", "8181"]
