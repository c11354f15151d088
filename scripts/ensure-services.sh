#!/usr/bin/env bash
# Make sure the test suite's real parts exist: RabbitMQ (installed and running on 127.0.0.1:5672), Debian's
# Chromium, and Debian's HAProxy (the cluster tests put it in front of two gateways; they start their own
# RabbitMQ nodes with the rabbitmq-server scripts and never touch the one on 5672). Installs with apt-get when
# missing (the machines run as root).
set -euo pipefail

apt_updated=0
apt_install() {
  if [[ $apt_updated == 0 ]]; then apt-get update -qq; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

amqp_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

if ! command -v rabbitmq-server >/dev/null 2>&1 && [[ ! -x /usr/sbin/rabbitmq-server ]]; then
  echo "installing rabbitmq-server"
  apt_install rabbitmq-server
fi
if ! amqp_up; then
  echo "starting RabbitMQ"
  rabbitmq-server -detached || true
  for _ in $(seq 1 60); do amqp_up && break; sleep 1; done
  amqp_up || { echo "RabbitMQ did not come up on 127.0.0.1:5672" >&2; exit 1; }
  # the node accepts TCP a little before it accepts logins
  rabbitmqctl await_startup >/dev/null 2>&1 || sleep 3
fi
if ! command -v chromium >/dev/null 2>&1; then
  echo "installing chromium"
  apt_install chromium
fi
if ! command -v haproxy >/dev/null 2>&1 && [[ ! -x /usr/sbin/haproxy ]]; then
  echo "installing haproxy"
  apt_install haproxy
fi
if ! command -v docker-compose >/dev/null 2>&1; then
  echo "installing docker-compose (used only to validate docker-compose.yml)"
  apt_install docker-compose || echo "docker-compose unavailable: its validation test will be skipped" >&2
fi
