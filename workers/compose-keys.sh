#!/bin/sh
# compose.yaml's one-shot `keys` service: CURVE key pairs for the broker and
# the workers, each side's in its own directory (a volume), so that neither
# container holds the other's secret:
#
#   BROKER_DIR/broker.key_secret        the broker's --curve-secret
#   BROKER_DIR/workers/worker.key       the workers' public key (--allow-workers)
#   WORKER_DIR/worker.key_secret        the workers' --curve-secret
#   WORKER_DIR/broker.key               the broker's public key (--broker-key)
#
# Every replica of the workers service uses the same pair. Keys made once are
# kept: a new pair on each `up` would only cost reconnections. Delete the
# volumes (docker compose down -v) to make new ones.
#
# usage: compose-keys.sh BROKER_DIR WORKER_DIR
# Run as root (fresh volumes are root's), it gives the files to the image's
# user (uid 10001, or $KEYS_OWNER) at the end.
set -eu
broker=$1
worker=$2
if [ -f "$broker/broker.key_secret" ] && [ -f "$broker/workers/worker.key" ] &&
   [ -f "$worker/worker.key_secret" ] && [ -f "$worker/broker.key" ]; then
    echo "compose-keys: the keys exist, kept"
    exit 0
fi
wse-sync keys broker --dir "$broker" --force
wse-sync keys worker --dir "$worker" --force
mkdir -p "$broker/workers"
cp "$worker/worker.key" "$broker/workers/worker.key"
cp "$broker/broker.key" "$worker/broker.key"
if [ "$(id -u)" = 0 ]; then
    chown -R "${KEYS_OWNER:-10001:10001}" "$broker" "$worker"
fi
echo "compose-keys: made the broker's and the workers' keys"
