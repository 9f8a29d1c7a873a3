#!/usr/bin/env bash
# Start PostgreSQL, Redis and RabbitMQ for the test suite if they are not listening already,
# then wait until each answers. Says clearly which one is missing and exits non-zero if any.
set -uo pipefail

listening() { # host port
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

wait_for() { # name port seconds
    local name=$1 port=$2 seconds=$3 waited=0
    while ! listening 127.0.0.1 "$port"; do
        if (( waited >= seconds * 5 )); then
            return 1
        fi
        sleep 0.2
        waited=$((waited + 1))
    done
    echo "services: $name is up on 127.0.0.1:$port"
}

missing=()

start_postgres() {
    if listening 127.0.0.1 5432; then echo "services: PostgreSQL already listening on 5432"; return; fi
    if ! command -v pg_ctlcluster >/dev/null || [ ! -d /etc/postgresql ]; then
        missing+=("PostgreSQL (install the postgresql package, or set DATABASE_URL to a running server)")
        return
    fi
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    echo "services: starting PostgreSQL $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    wait_for PostgreSQL 5432 30 || missing+=("PostgreSQL (pg_ctlcluster $version main start did not bring up 127.0.0.1:5432)")
}

start_redis() {
    if listening 127.0.0.1 6379; then echo "services: Redis already listening on 6379"; return; fi
    if ! command -v redis-server >/dev/null; then
        missing+=("Redis (install the redis-server package)")
        return
    fi
    echo "services: starting Redis"
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
    wait_for Redis 6379 20 || missing+=("Redis (redis-server did not bring up 127.0.0.1:6379; see /var/log/redis/ci.log)")
}

start_rabbitmq() {
    if listening 127.0.0.1 5672; then echo "services: RabbitMQ already listening on 5672"; return; fi
    if ! command -v rabbitmq-server >/dev/null; then
        missing+=("RabbitMQ (install the rabbitmq-server package)")
        return
    fi
    echo "services: starting RabbitMQ (this takes a few seconds)"
    rabbitmq-server -detached || true
    wait_for RabbitMQ 5672 90 || missing+=("RabbitMQ (rabbitmq-server -detached did not bring up 127.0.0.1:5672)")
}

start_postgres
start_redis
start_rabbitmq

if (( ${#missing[@]} )); then
    echo "services: NOT AVAILABLE:" >&2
    for item in "${missing[@]}"; do echo "  - $item" >&2; done
    exit 1
fi
