# Shared by start-redis.sh and start-sentinel.sh (POSIX sh: the redis:7.4-alpine image has busybox).
# Environment (set by redis.yaml; the test sets them for processes on 127.0.0.1):
#   REDIS_PASSWORD  the one password: Redis, replication, sentinels, and the clients (Ray's GCS)
#   SELF_HOST       this pod's stable DNS name (what the others and Ray reach it at)
#   REDIS_PORT      6379;   SENTINEL_PORT 26379
#   SENTINELS       "host:port ..." of every sentinel
#   BOOTSTRAP_PRIMARY  host:port that is primary when no sentinel knows one (the very first start)
#   MASTER_NAME     the name the sentinels monitor (gcs)
#   RUN_DIR         where the generated configs go (not the data volume: they hold the password)
set -eu
: "${REDIS_PASSWORD:?}" "${SELF_HOST:?}" "${SENTINELS:?}" "${BOOTSTRAP_PRIMARY:?}"
REDIS_PORT="${REDIS_PORT:-6379}"
SENTINEL_PORT="${SENTINEL_PORT:-26379}"
MASTER_NAME="${MASTER_NAME:-gcs}"
RUN_DIR="${RUN_DIR:-/run/redis}"
mkdir -p "$RUN_DIR"
umask 077

# The primary as the sentinels see it ("host port"), else the bootstrap one. Asking the sentinels
# first means a restarted pod rejoins the current primary instead of starting a second one.
current_primary() {
  for s in $SENTINELS; do
    out=$(redis-cli -h "${s%:*}" -p "${s##*:}" -a "$REDIS_PASSWORD" --no-auth-warning \
          SENTINEL get-master-addr-by-name "$MASTER_NAME" 2>/dev/null) || continue
    # shellcheck disable=SC2086
    set -- $out
    if [ $# -eq 2 ] && [ "$1" != "ERR" ]; then
      echo "$1 $2"
      return 0
    fi
  done
  echo "${BOOTSTRAP_PRIMARY%:*} ${BOOTSTRAP_PRIMARY##*:}"
}
