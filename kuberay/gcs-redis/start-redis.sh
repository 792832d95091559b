#!/bin/sh
# One Redis of the GCS set: the primary if the sentinels say so (or on the very first start, the
# bootstrap pod), else a replica of the current primary. Sentinels do the failovers from there.
. "$(dirname "$0")/common.sh"
: "${REDIS_CONF:=/etc/genserve-gcs/redis.conf}"
# shellcheck disable=SC2046
set -- $(current_primary)
conf="$RUN_DIR/redis.conf"
{
  echo "include $REDIS_CONF"
  echo "port $REDIS_PORT"
  echo "requirepass \"$REDIS_PASSWORD\""
  echo "masterauth \"$REDIS_PASSWORD\""
  # Announce the stable name, not the pod IP: a pod that comes back has a new IP.
  echo "replica-announce-ip $SELF_HOST"
  echo "replica-announce-port $REDIS_PORT"
  if [ "$1" != "$SELF_HOST" ] || [ "$2" != "$REDIS_PORT" ]; then
    echo "replicaof $1 $2"
  fi
} > "$conf"
echo "gcs-redis: primary is $1:$2; this is $SELF_HOST:$REDIS_PORT" >&2
exec redis-server "$conf"
