#!/usr/bin/env bash
# Start a Redis server in a container for redflow (benchmarks or local development), configured
# as redflow wants it: AOF with fsync every second and no eviction.
#
#   scripts/redis-container.sh [--name NAME] [--port PORT] [--image IMAGE] [--dry-run]
#
# --dry-run prints the docker command instead of running it. Prints the REDIS_URL to use.
set -euo pipefail

name="redflow-redis"
port="6379"
image="redis:7.2"
dry_run=0

while [ $# -gt 0 ]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --image) image="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
done

case "$port" in
  ''|*[!0-9]*) echo "--port must be a number, got '$port'" >&2; exit 2 ;;
esac

cmd=(docker run --detach --name "$name" --publish "127.0.0.1:${port}:6379"
  --volume "${name}-data:/data" "$image"
  redis-server --appendonly yes --appendfsync everysec --maxmemory-policy noeviction)

if [ "$dry_run" -eq 1 ]; then
  printf '%q ' "${cmd[@]}"
  printf '\n'
else
  "${cmd[@]}"
fi
echo "REDIS_URL=redis://127.0.0.1:${port}"
