#!/usr/bin/env bash
# Runs the Kafka integration tests against a throw-away broker on 127.0.0.1 (tansu, built once
# and cached in ~/.cache; see scripts/kafka-up.sh), with a SCRAM-SHA-512 listener, then stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(KAFKA_SASL=plaintext KAFKA_FRESH=1 scripts/kafka-up.sh)"
export BOOTSTRAP SASL_BOOTSTRAP SASL_USERNAME SASL_PASSWORD
trap 'scripts/kafka-up.sh stop "$KAFKA_PIDS" >/dev/null 2>&1 || scripts/kafka-up.sh stop >/dev/null 2>&1 || true' EXIT
cargo test --test kafka "$@"
