#!/bin/sh
# One sentinel of three: watches the GCS primary, promotes a replica when it is down for
# DOWN_AFTER_MS (2 of 3 agree), and answers Ray's GCS "which is the primary?"
# (SENTINEL MASTERS). Ray authenticates to the sentinel with the Redis password, so it requires it.
. "$(dirname "$0")/common.sh"
DOWN_AFTER_MS="${DOWN_AFTER_MS:-5000}"
FAILOVER_TIMEOUT_MS="${FAILOVER_TIMEOUT_MS:-60000}"
# shellcheck disable=SC2046
set -- $(current_primary)
conf="$RUN_DIR/sentinel.conf"
cat > "$conf" <<CONF
port $SENTINEL_PORT
dir $RUN_DIR
sentinel resolve-hostnames yes
sentinel announce-hostnames yes
sentinel announce-ip $SELF_HOST
sentinel announce-port $SENTINEL_PORT
requirepass "$REDIS_PASSWORD"
sentinel sentinel-pass "$REDIS_PASSWORD"
sentinel monitor $MASTER_NAME $1 $2 2
sentinel auth-pass $MASTER_NAME "$REDIS_PASSWORD"
sentinel down-after-milliseconds $MASTER_NAME $DOWN_AFTER_MS
sentinel failover-timeout $MASTER_NAME $FAILOVER_TIMEOUT_MS
sentinel parallel-syncs $MASTER_NAME 1
CONF
echo "gcs-sentinel: monitoring $1:$2 as $MASTER_NAME" >&2
exec redis-server "$conf" --sentinel
