#!/usr/bin/env bash
# Runs every weir test against real services. Starts PostgreSQL and NATS (with
# JetStream) when they are not running, installing them with apt-get when absent,
# starts a Kafka-protocol broker (tansu, installed with cargo when absent) unless
# WEIR_TEST_KAFKA_BROKERS names one, and sets WEIR_REQUIRE_SERVICES=1 so that a test
# needing an unreachable service fails instead of skipping. Extra arguments go to
# `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "test.sh: $*" >&2; }

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

apt_updated=0
apt_install() {
    if [ "$apt_updated" -eq 0 ]; then
        as_root apt-get update -qq
        apt_updated=1
    fi
    say "installing $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_for_port() {
    for _ in $(seq 1 120); do
        port_open "$1" "$2" && return 0
        sleep 0.5
    done
    say "nothing is listening on $1:$2"
    return 1
}

# Everything this script starts, it stops on exit.
started_pids=()
cleanup() {
    for pid in "${started_pids[@]:-}"; do
        [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT

export WEIR_TEST_POSTGRES_URL=${WEIR_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}
export WEIR_TEST_NATS_URL=${WEIR_TEST_NATS_URL:-nats://127.0.0.1:4222}

start_postgres() {
    if port_open 127.0.0.1 5432; then
        return
    fi
    local installed_now=0
    if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
        apt_install postgresql
        installed_now=1
    fi
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    if [ "$installed_now" -eq 1 ]; then
        # A throwaway test server: let local TCP clients in without a password,
        # as the test URLs expect.
        local hba="/etc/postgresql/$version/main/pg_hba.conf"
        as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
    fi
    say "starting PostgreSQL $version"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start
    wait_for_port 127.0.0.1 5432
}

ensure_test_database() {
    command -v psql >/dev/null || return 0
    if ! psql "$WEIR_TEST_POSTGRES_URL" -qtAc 'SELECT 1' >/dev/null 2>&1; then
        local database=${WEIR_TEST_POSTGRES_URL##*/}
        database=${database%%\?*}
        say "creating database $database"
        as_root runuser -u postgres -- createdb "$database" || true
    fi
}

start_nats() {
    local hostport=${WEIR_TEST_NATS_URL#nats://}
    local port=${hostport##*:}
    if port_open 127.0.0.1 "$port"; then
        return
    fi
    if ! command -v nats-server >/dev/null && [ ! -x /usr/sbin/nats-server ]; then
        apt_install nats-server
    fi
    local server
    server=$(command -v nats-server || echo /usr/sbin/nats-server)
    local data
    data=$(mktemp -d -t weir-nats.XXXXXX)
    say "starting NATS with JetStream on port $port"
    "$server" -a 127.0.0.1 -p "$port" -js -sd "$data" >"$data/nats.log" 2>&1 &
    started_pids+=("$!")
    wait_for_port 127.0.0.1 "$port"
}

# rdkafka compiles librdkafka with its own configure script and make (no cmake,
# no libcurl); its ssl feature needs OpenSSL's headers, found with pkg-config.
install_kafka_build_deps() {
    if grep -q '^rdkafka' Cargo.toml; then
        command -v make >/dev/null || apt_install make
        command -v pkg-config >/dev/null || apt_install pkg-config
        dpkg -s libssl-dev >/dev/null 2>&1 || apt_install libssl-dev
    fi
}

# tansu keeps topics in memory only when built with its dynostore feature, and
# in a file that survives a restart (which the fault suite needs) only with its
# libsql feature.
tansu_has_storage() {
    local engines
    engines=$(tansu --help 2>/dev/null | grep '^Storage engines:') || return 1
    [[ $engines == *dynostore* && $engines == *libsql* ]]
}

free_port() {
    local port
    for port in $(seq 19092 19191); do
        port_open 127.0.0.1 "$port" || { echo "$port"; return 0; }
    done
    say "no free port for the Kafka-protocol broker in 19092-19191"
    return 1
}

# tansu, a Kafka-protocol broker, is compiled from crates.io the first time,
# with `dynostore` (topics in memory, for the shared broker) and `libsql` (topics
# in a SQLite file, for the fault suite's broker, which it kills and starts
# again); its default features only switch on the broker itself. A debug build:
# it compiles in about half the time of a release build and serves the tests'
# few thousand records easily. It compiles in the background while the tests
# compile.
tansu_install_pid=
tansu_install_log=
install_tansu_in_background() {
    export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
    if tansu_has_storage; then
        return
    fi
    tansu_install_log=$(mktemp -t weir-tansu-install.XXXXXX)
    say "installing tansu, a Kafka-protocol broker, once, in the background (log: $tansu_install_log)"
    # Without debug info: it is only run, never debugged, and compiles faster.
    CARGO_PROFILE_DEV_DEBUG=false cargo install --locked --debug --force tansu --features dynostore,libsql \
        >"$tansu_install_log" 2>&1 &
    tansu_install_pid=$!
    started_pids+=("$tansu_install_pid")
}

# Waits for the background install, saying every 30 s how far it has got.
wait_for_tansu_install() {
    [ -n "$tansu_install_pid" ] || return 0
    local waited=0
    while kill -0 "$tansu_install_pid" 2>/dev/null; do
        if [ $((waited % 30)) -eq 0 ]; then
            say "tansu: $(grep -c 'Compiling' "$tansu_install_log" || true) crates compiled so far"
        fi
        sleep 5
        waited=$((waited + 5))
    done
    if ! wait "$tansu_install_pid"; then
        tail -n 30 "$tansu_install_log" >&2
        say "installing tansu failed; see $tansu_install_log"
        return 1
    fi
    say "tansu installed"
}

# tansu with in-memory storage: on 127.0.0.1:9092 (where
# config/postgres-kafka.toml looks) when that is free, else on another free port.
# The fault suite starts tansu brokers of its own, so it is installed even when
# WEIR_TEST_KAFKA_BROKERS names a broker.
start_kafka() {
    wait_for_tansu_install
    if [ -n "${WEIR_TEST_KAFKA_BROKERS:-}" ]; then
        return
    fi
    local port=9092
    if port_open 127.0.0.1 "$port"; then
        port=$(free_port)
    fi
    local data
    data=$(mktemp -d -t weir-kafka.XXXXXX)
    say "starting tansu (Kafka protocol, in memory) on port $port"
    tansu broker \
        --listener-url "tcp://127.0.0.1:$port" \
        --advertised-listener-url "tcp://127.0.0.1:$port" \
        --storage-engine memory://tansu/ >"$data/tansu.log" 2>&1 &
    started_pids+=("$!")
    if ! wait_for_port 127.0.0.1 "$port"; then
        cat "$data/tansu.log" >&2
        return 1
    fi
    export WEIR_TEST_KAFKA_BROKERS="127.0.0.1:$port"
}

# --- Prometheus: scrape config, alert rules and their unit tests (deploy/prometheus) ---
check_prometheus_files() {
    # promtool ships with the server; its recommends (node exporter and more) are not needed.
    command -v promtool >/dev/null || apt_install --no-install-recommends prometheus
    say "checking deploy/prometheus with promtool"
    promtool check config deploy/prometheus/prometheus.yml
    promtool check rules deploy/prometheus/alerts.yml
    promtool test rules deploy/prometheus/alerts.test.yml
}
# --- end of Prometheus ---

install_tansu_in_background
check_prometheus_files
start_postgres
ensure_test_database
start_nats
install_kafka_build_deps
say "compiling the tests"
cargo test --all-features --no-run "$@"
start_kafka

export WEIR_REQUIRE_SERVICES=1
say "running every test (Postgres $WEIR_TEST_POSTGRES_URL, NATS $WEIR_TEST_NATS_URL, Kafka $WEIR_TEST_KAFKA_BROKERS)"
cargo test --all-features "$@"
