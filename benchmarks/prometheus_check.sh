#!/usr/bin/env bash
# The real Prometheus against the real app, on loopback: scrape the router's /metrics and Ray's
# metrics export with configs/prometheus.yml, send a few requests, query two metrics back
# through Prometheus's HTTP API, print them, and stop everything this script started.
#
#   benchmarks/prometheus_check.sh        (from the repo root, after `make setup`)
#
# Ports: 8000 (router, serve_config.yaml) and 8080 (Ray metrics export) are the ones
# configs/prometheus.yml scrapes; Prometheus itself listens on 127.0.0.1:$PROM_PORT (19090).
# Ray runs in its own temp dir and session, so `ray.init()` elsewhere on this machine never
# attaches to it, and it is stopped by killing this session's processes, never `ray stop`.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
PROM_PORT=${PROM_PORT:-19090}
RAY_METRICS_PORT=8080
ROUTER=http://127.0.0.1:8000
PROM=http://127.0.0.1:$PROM_PORT
REQUESTS=${REQUESTS:-4}
WORK=$(mktemp -d /tmp/awq-prom.XXXXXX)
SERVE_PID="" PROM_PID="" RAY_SID=""
# Explicit, for every Ray process here: a head turns token auth on when ~/.ray/auth_token exists
# but a driver given an address does not, so unset it would depend on the home folder.
export RAY_AUTH_MODE=token
exec 3>&2  # for messages from checks whose own output wait_for discards

free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port_busy() { python -c "import socket,sys; s=socket.socket(); sys.exit(s.connect_ex(('127.0.0.1',$1))!=0)"; }
get() { python -c "import sys,httpx; print(httpx.get(sys.argv[1], timeout=10).text)" "$1"; }

# Wait (bounded) until a command succeeds: readiness of a thing we started, checked on itself.
wait_for() {
  local what=$1 deadline=$(($(date +%s) + $2)); shift 2
  until "$@" >/dev/null 2>&1; do
    if [ "$(date +%s)" -gt "$deadline" ]; then echo "timed out waiting for $what" >&2; return 1; fi
    sleep 1
  done
}

# Fail at once, with its log, when a process this script started has died.
alive() {
  kill -0 "$1" 2>/dev/null && return 0
  echo "$2 exited; the end of its log:" >&3
  tail -40 "$3" >&3
  exit 1
}
app_ready() {
  alive "$SERVE_PID" "serve run" "$WORK/serve.log"
  python -c "import httpx,sys; sys.exit(httpx.get('$ROUTER/health', timeout=5).status_code != 200)"
}
prom_ready() {
  alive "$PROM_PID" prometheus "$WORK/prometheus.log"
  get "$PROM/-/ready"
}

# TERM every live process of session $1, then KILL what is still there after 5 s. (SIGINT would
# not do for `serve run`: a background job of a script starts with SIGINT ignored.)
stop_session() {
  local sid=$1 pids
  live() { ps -o pid=,stat= -s "$sid" | awk '$2 !~ /^Z/ {print $1}' | tr '\n' ' '; }
  pids=$(live)
  [ -z "${pids// /}" ] && return 0
  kill $pids 2>/dev/null
  for _ in 1 2 3 4 5; do
    sleep 1
    pids=$(live)
    [ -z "${pids// /}" ] && return 0
  done
  kill -9 $pids 2>/dev/null
}

cleanup() {
  set +e
  [ -n "$PROM_PID" ] && kill "$PROM_PID" 2>/dev/null
  [ -n "$SERVE_PID" ] && stop_session "$SERVE_PID"
  [ -n "$RAY_SID" ] && stop_session "$RAY_SID"
  rm -rf "$WORK"
}
trap cleanup EXIT

for port in 8000 "$RAY_METRICS_PORT" "$PROM_PORT"; do
  if port_busy "$port"; then echo "port $port is in use; stop what holds it first" >&2; exit 1; fi
done

if ! command -v prometheus >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q prometheus
fi
prometheus --version 2>&1 | head -1

echo "== starting Ray (metrics export on 127.0.0.1:$RAY_METRICS_PORT)"
ray get-auth-token --generate >/dev/null  # Ray's own default: creates ~/.ray/auth_token if missing
GCS_PORT=$(free_port)
setsid ray start --head --node-ip-address=127.0.0.1 --port="$GCS_PORT" \
  --metrics-export-port="$RAY_METRICS_PORT" --include-dashboard=false \
  --ray-client-server-port="$(free_port)" --dashboard-agent-listen-port="$(free_port)" \
  --num-cpus=2 --temp-dir="$WORK/ray" --disable-usage-stats >"$WORK/ray.log" 2>&1 &
RAY_SID=$!  # setsid made the ray process a session leader: its pid is the session id
wait "$RAY_SID" || { cat "$WORK/ray.log"; exit 1; }

echo "== serve run serve_config.yaml (audit log in $WORK)"
python - "$WORK/serve_config.yaml" <<'EOF'
import sys, yaml
config = yaml.safe_load(open("serve_config.yaml"))
config["applications"][0]["args"]["audit"]["path"] = sys.argv[1].replace(".yaml", "-audit.jsonl")
yaml.safe_dump(config, open(sys.argv[1], "w"), sort_keys=False)
EOF
setsid serve run --address="127.0.0.1:$GCS_PORT" "$WORK/serve_config.yaml" >"$WORK/serve.log" 2>&1 &
SERVE_PID=$!
wait_for "the app's /health" 300 app_ready || { tail -40 "$WORK/serve.log"; exit 1; }

echo "== prometheus with configs/prometheus.yml on $PROM"
prometheus --config.file="$REPO/configs/prometheus.yml" --storage.tsdb.path="$WORK/prom" \
  --web.listen-address="127.0.0.1:$PROM_PORT" >"$WORK/prometheus.log" 2>&1 &
PROM_PID=$!
wait_for "prometheus" 60 prom_ready || { tail -20 "$WORK/prometheus.log"; exit 1; }

MODEL=$(python -c "import httpx; print(httpx.get('$ROUTER/v1/models').json()['data'][0]['id'])")
echo "== sending $REQUESTS requests to $MODEL"
# Prints each response's usage to stderr and the total completion tokens to stdout.
TOKENS=$(python - "$ROUTER" "$MODEL" "$REQUESTS" <<'EOF'
import sys, httpx
url, model, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
total = 0
for i in range(n):
    body = {"model": model, "messages": [{"role": "user", "content": f"Count to {i + 1}."}],
            "max_tokens": 8}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    print(f"  {r.status_code} {r.json().get('usage', r.text)}", file=sys.stderr)
    r.raise_for_status()
    total += r.json()["usage"]["completion_tokens"]
print(total)
EOF
)
echo "  completion tokens in the responses: $TOKENS"

query() {  # instant query; prints "labels value" per series, fails while there are none
  python - "$PROM" "$1" <<'EOF'
import sys, httpx
r = httpx.get(sys.argv[1] + "/api/v1/query", params={"query": sys.argv[2]}, timeout=10).json()
series = r["data"]["result"]
for s in series:
    labels = {k: v for k, v in s["metric"].items() if k in ("__name__", "job", "model", "status")}
    print(f"  {labels} = {s['value'][1]}")
sys.exit(0 if series else 1)
EOF
}
ROUTER_Q='sum by (job, model, status) (inference_requests_total{status="2xx"})'
REPLICA_Q='sum by (job, model) (ray_awq_serve_engine_generated_tokens_total)'
total_is() {  # succeeds when the sum of query $1's series in Prometheus equals $2
  python -c 'import httpx, sys
r = httpx.get(sys.argv[1] + "/api/v1/query", params={"query": f"sum({sys.argv[2]})"}).json()
hits = r["data"]["result"]
sys.exit(not hits or float(hits[0]["value"][1]) != float(sys.argv[3]))' "$PROM" "$1" "$2"
}
# Prometheus scrapes every 5 s and Ray exports on its report interval: wait for the totals.
wait_for "inference_requests_total == $REQUESTS in Prometheus" 90 total_is "$ROUTER_Q" "$REQUESTS"
wait_for "the replicas' generated tokens == $TOKENS in Prometheus" 90 \
  total_is "$REPLICA_Q" "$TOKENS"

echo "== targets"
python -c "import httpx; [print(' ', t['labels']['job'], t['scrapeUrl'], t['health']) for t in httpx.get('$PROM/api/v1/targets').json()['data']['activeTargets']]"
echo "== $ROUTER_Q"
query "$ROUTER_Q"
echo "== $REPLICA_Q"
query "$REPLICA_Q"
echo "== ray_awq_serve_replica_memory_bytes"
query 'ray_awq_serve_replica_memory_bytes'
echo "prometheus_check: OK"
