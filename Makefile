# make run   – the ticker at http://127.0.0.1:$(PORT)/ with the embedded broker (no RabbitMQ needed)
# make run-tokens – the same, with tokens: anonymous visitors read the ticks, a token is needed for the rest
# make test  – installs what the tests need (Python and Node packages, RabbitMQ, Chromium, HAProxy) and runs them
#              all, the cluster tests included (a private 3-node RabbitMQ cluster: about two minutes more)
# make test-quick – the same without the cluster tests (pytest -m "not cluster")
PORT ?= 8181
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Running needs the package alone; tests, lint and the benchmark add the dev and test extras.
RUN_STAMP := $(VENV)/.installed-run
STAMP := $(VENV)/.installed

.PHONY: install install-run run run-rabbitmq run-tokens test test-quick test-unit lint up up-cluster bench bench-cluster bench-smoke services clean

$(RUN_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $(RUN_STAMP)

$(STAMP): pyproject.toml $(RUN_STAMP)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install-run: $(RUN_STAMP)

install: $(STAMP)

node_modules/.installed: package.json
	npm install --no-audit --no-fund --silent
	touch node_modules/.installed

# Last values for the page's first paint, and a history to recover from after a reconnect (README, "Continuity").
CONTINUITY := --retain stocks --history-size 500

run: $(RUN_STAMP)
	@echo "Open http://127.0.0.1:$(PORT)/  (embedded broker + stock daemon; Ctrl-C stops)"
	PORT=$(PORT) $(PY) -m gateway --broker memory --with-stock-daemon $(CONTINUITY)

# AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/) is passed on, never printed: it holds a password.
run-rabbitmq: $(RUN_STAMP)
	@echo "Open http://127.0.0.1:$(PORT)/  (RabbitMQ from AMQP_URL, or the local one; Ctrl-C stops)"
	PORT=$(PORT) $(PY) -m gateway --broker rabbitmq --with-stock-daemon $(CONTINUITY)

# The ticker under tokens (README "Tokens and permissions"): a secret made once in .jwt-secret (never printed),
# anonymous read on the ticks, anything else (the snapshot) with a token minted from that secret.
ANONYMOUS_SCOPE ?= rabbitmq.read:%2F/stocks/*
run-tokens: $(RUN_STAMP)
	@test -s .jwt-secret || (umask 077 && $(PY) -c "import secrets; print(secrets.token_urlsafe(32))" > .jwt-secret)
	@echo "Open http://127.0.0.1:$(PORT)/  (anonymous: ticks only); a token: see README 'Tokens and permissions'"
	PORT=$(PORT) $(PY) -m gateway --broker memory --with-stock-daemon --jwt-secret-file .jwt-secret \
		--anonymous-scope '$(ANONYMOUS_SCOPE)'

services:
	bash scripts/ensure-services.sh

test: $(STAMP) node_modules/.installed services
	$(PY) -m pytest -q -W error::DeprecationWarning -p no:cacheprovider

test-quick: $(STAMP) node_modules/.installed services
	$(PY) -m pytest -q -W error::DeprecationWarning -p no:cacheprovider -m "not cluster"

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

lint: $(STAMP)
	$(VENV)/bin/ruff check gateway stock_daemon tests bench
	$(VENV)/bin/mypy gateway stock_daemon

up:
	docker compose up --build

# three RabbitMQ nodes, two gateways behind HAProxy (http://localhost:8080/), the stock daemon
up-cluster:
	docker compose -f docker-compose.cluster.yml up --build

# Every scenario against one gateway process, then the two throughput scenarios with --workers 2
# (one process per core, SO_REUSEPORT), each side by side with RabbitMQ's Web-STOMP (bench/RESULTS.md);
# then the pipe on AMQP alone: RabbitMQ's own CPU per relayed message, whoever is in front of it.
bench: $(STAMP) services
	$(PY) -m bench $(BENCH_ARGS)
	$(PY) -m bench --scenarios pipe,fanout --gateway-arg=--workers=2 --profile none $(BENCH_ARGS)
	$(PY) -m bench.amqp_pipe
	$(PY) -m bench.cluster $(BENCH_CLUSTER_ARGS)

# fan-out through one gateway, then two behind HAProxy, on a private 3-node RabbitMQ cluster
bench-cluster: $(STAMP) services
	$(PY) -m bench.cluster $(BENCH_CLUSTER_ARGS)

clean:
	rm -rf $(VENV) node_modules .pytest_cache test-artifacts
