# One image for the gateway and the stock daemon. The Python layer is built from pyproject.toml (the
# same dependency pins `make install` uses), so the image cannot drift from a local install.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

COPY pyproject.toml README.md LICENSE ./
COPY gateway ./gateway
COPY stock_daemon ./stock_daemon
COPY web/index.html web/app.js web/style.css web/favicon.svg ./web/
COPY web/vendor ./web/vendor
# the page is installed with the package (share/stomp-ws-gateway/web), like any `pip install .`
RUN pip install . && rm -rf /app/* && useradd --system --no-create-home gateway

USER gateway
EXPOSE 8181
# Alone (docker run -p 8181:8181 stomp-ws-gateway) it serves a working ticker: the embedded broker and the
# stock daemon in the gateway. docker-compose.yml runs it against RabbitMQ with the daemon as its own service.
CMD ["stomp-gateway", "--host", "0.0.0.0", "--port", "8181", "--with-stock-daemon"]
