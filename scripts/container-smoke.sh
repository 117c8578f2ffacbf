#!/usr/bin/env bash
# Container smoke test: build the image, start the compose stack (docker-compose.yml) under
# podman-compose with three classifier replicas behind the nginx proxy, wait until every
# replica is healthy, post a PNG to /predict through the proxy and check the answer, check
# that only the proxy publishes a port, stop one replica with SIGTERM while requests keep
# coming (it must exit 0, and every request must get 200 through the proxy), then clean up.
#
# Not part of .ci/run: the image's PyPI torch (with CUDA) is several GB to download.
# Needs podman, podman-compose, curl and python3 (stdlib only); on the project's build
# machines run `sh ../shared/tools/container-setup.sh` once first. Run from anywhere:
#
#   bash scripts/container-smoke.sh
#
# Three replicas: Docker Compose users write `--scale classifier=3`; podman-compose 1.0
# parses that flag but ignores it, so this script sets `deploy.replicas: 3` in an override
# file instead (both Compose and podman-compose honour it).
#
# The proxy image: the official nginx image when it is present (or can be pulled). Where no
# registry is reachable, a local stand-in is built from this host's Debian nginx binary on
# the python:3.11-slim stand-in (Debian bookworm) and used through PROXY_IMAGE.
#
# Settings (environment):
#   SMOKE_PORT=18000        host port to publish (the compose file's PORT)
#   SMOKE_PROJECT=resnet56-smoke   compose project name (containers are labelled with it)
#   SMOKE_REPLICAS=3               classifier replicas
#   SMOKE_HEALTH_TIMEOUT=900       seconds to wait for healthy replicas
#   SMOKE_STOP_TIMEOUT=60          seconds SIGTERM may take before podman sends SIGKILL
#   SMOKE_SKIP_BUILD=1             reuse the image already built
#   SMOKE_REMOVE_IMAGE=1           remove the image at the end too
set -euo pipefail

cd "$(dirname "$0")/.."
compose_file=docker-compose.yml
image=resnet56-cifar10:latest          # the compose file's `image:`
official_proxy=docker.io/library/nginx:1.28   # the compose file's default proxy image
standin_proxy=localhost/nginx-standin:bookworm
port=${SMOKE_PORT:-18000}
project=${SMOKE_PROJECT:-resnet56-smoke}
replicas=${SMOKE_REPLICAS:-3}
health_timeout=${SMOKE_HEALTH_TIMEOUT:-900}
stop_timeout=${SMOKE_STOP_TIMEOUT:-60}
export BUILDAH_FORMAT=docker           # keep HEALTHCHECK in the built image (OCI drops it)
export PORT=$port

started=$SECONDS
say() { printf '[smoke %4ds] %s\n' "$((SECONDS - started))" "$*"; }
fail() {
  say "FAIL: $*"
  exit 1
}

for tool in podman podman-compose curl python3; do
  command -v "$tool" >/dev/null || fail "$tool not found (sh ../shared/tools/container-setup.sh installs podman and podman-compose)"
done
for file in weights/resnet56.safetensors weights/resnet56.json; do
  [[ -f $file ]] || fail "$file is missing: the image ships the trained weights (python -m model.train writes them)"
done

workdir=$(mktemp -d)
containers=()
cleanup() {
  status=$?
  if [[ $status -ne 0 ]]; then
    for container in "${containers[@]}"; do
      say "logs of $container (last 30 lines):"
      podman logs --tail 30 "$container" 2>&1 | sed 's/^/    /' || true
    done
  fi
  say "cleaning up"
  podman-compose -p "$project" -f "$compose_file" -f "$workdir/replicas.yml" down >/dev/null 2>&1 || true
  # Backstop for anything the compose tool left behind.
  ids=$(podman ps -aq --filter "label=io.podman.compose.project=$project" 2>/dev/null || true)
  [[ -z $ids ]] || podman rm -f $ids >/dev/null 2>&1 || true
  podman network rm "${project}_default" >/dev/null 2>&1 || true  # podman-compose 1.0 leaves it
  [[ -z ${SMOKE_REMOVE_IMAGE:-} ]] || podman rmi -f "$image" >/dev/null 2>&1 || true
  rm -rf "$workdir"
  if [[ $status -eq 0 ]]; then say "PASSED"; else say "FAILED (exit $status)"; fi
}
trap cleanup EXIT

# --- 1. Build -------------------------------------------------------------------------------
if [[ -z ${SMOKE_SKIP_BUILD:-} ]]; then
  say "building $image (niced; the first build downloads the dependencies, several GB)"
  build_start=$SECONDS
  if ! nice -n 10 podman build -t "$image" . >"$workdir/build.log" 2>&1; then
    tail -n 40 "$workdir/build.log" | sed 's/^/    /'
    fail "podman build failed"
  fi
  grep -E 'STEP [0-9]|^--> Using cache|COMMIT' "$workdir/build.log" | cut -c1-100 | sed 's/^/    /'
  say "built in $((SECONDS - build_start))s"
fi
podman image exists "$image" || fail "image $image not found (unset SMOKE_SKIP_BUILD to build it)"
say "image: $(podman image inspect -f '{{.Size}}' "$image" | awk '{printf "%.2f GB", $1/1e9}'), cmd $(podman image inspect -f '{{json .Config.Cmd}}' "$image")"
# podman shows the HEALTHCHECK at the top level of `inspect`, Docker under Config.
healthcheck=$(podman image inspect "$image" | python3 -c '
import json, sys
image = json.load(sys.stdin)[0]
print(json.dumps(image.get("Healthcheck") or image.get("Config", {}).get("Healthcheck")))')
[[ $healthcheck == *"/health"* ]] || fail "the image has no HEALTHCHECK on /health (built without BUILDAH_FORMAT=docker?): $healthcheck"
user=$(podman image inspect -f '{{.Config.User}}' "$image")
if [[ $user =~ ^(0|root)?$ ]]; then fail "the image runs as root"; fi

# --- 2. The proxy image ------------------------------------------------------------------------
if podman image exists "$official_proxy" || timeout 120 podman pull -q "$official_proxy" >/dev/null 2>&1; then
  say "proxy image: $official_proxy"
else
  command -v nginx >/dev/null || fail "no $official_proxy and no local nginx to build a stand-in from (apt-get install nginx)"
  podman image exists docker.io/library/python:3.11-slim \
    || fail "no python:3.11-slim stand-in to build the nginx stand-in on (sh ../shared/tools/container-setup.sh)"
  say "no registry: building $standin_proxy from this host's $(nginx -v 2>&1 | cut -d' ' -f3)"
  mkdir -p "$workdir/proxy"
  cp "$(command -v nginx)" /etc/nginx/mime.types "$workdir/proxy/"
  # The official image's layout: conf.d/*.conf included in http{}, logs to the console.
  cat >"$workdir/proxy/nginx.conf" <<'CONF'
user nginx;
worker_processes auto;
error_log stderr notice;
pid /run/nginx.pid;
events { worker_connections 1024; }
http {
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    access_log /dev/stdout;
    include /etc/nginx/conf.d/*.conf;
}
CONF
  cat >"$workdir/proxy/Containerfile" <<'CF'
FROM docker.io/library/python:3.11-slim
COPY nginx /usr/sbin/nginx
COPY nginx.conf mime.types /etc/nginx/
RUN useradd --system --no-create-home nginx && mkdir -p /etc/nginx/conf.d /var/lib/nginx /var/log/nginx
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
CF
  nice -n 10 podman build --pull=never -q -t "$standin_proxy" "$workdir/proxy" >/dev/null \
    || fail "could not build the nginx stand-in"
  export PROXY_IMAGE=$standin_proxy
fi

# --- 3. Start the stack -------------------------------------------------------------------------
cat >"$workdir/replicas.yml" <<YML
services:
  classifier:
    deploy:
      replicas: $replicas
YML
say "starting $replicas classifier replicas and the proxy (project $project, host port $port)"
podman-compose -p "$project" -f "$compose_file" -f "$workdir/replicas.yml" up -d --no-build \
  >"$workdir/up.log" 2>&1 || { sed 's/^/    /' "$workdir/up.log"; fail "podman-compose up failed"; }
mapfile -t replica_names < <(podman ps -a --filter "label=io.podman.compose.project=$project" \
  --filter "label=com.docker.compose.service=classifier" --format '{{.Names}}' | sort)
proxy=$(podman ps -a --filter "label=io.podman.compose.project=$project" \
  --filter "label=com.docker.compose.service=proxy" --format '{{.Names}}' | head -n 1)
containers=("${replica_names[@]}" "$proxy")
((${#replica_names[@]} == replicas)) || fail "${#replica_names[@]} classifier containers, not $replicas"
[[ -n $proxy ]] || fail "no proxy container after podman-compose up"
for container in "${replica_names[@]}"; do
  uid=$(podman exec "$container" id -u)
  [[ $uid != 0 ]] || fail "$container: the server runs as root"
  published=$(podman port "$container")  # exposed to the network only: no host port
  [[ -z $published ]] || fail "$container publishes a port: $published"
done
say "replicas ${replica_names[*]} (no published port, servers run as uid $uid); proxy $proxy"

# --- 4. Wait until healthy ----------------------------------------------------------------------
# Healthchecks are not scheduled by themselves here (no systemd), so run the image's check.
say "waiting for every replica's healthcheck (at most ${health_timeout}s)"
deadline=$((SECONDS + health_timeout))
next_report=$((SECONDS + 30))
for container in "${replica_names[@]}"; do
  until podman healthcheck run "$container" >/dev/null 2>&1; do
    state=$(podman inspect -f '{{.State.Status}}' "$container")
    [[ $state == running ]] || fail "$container is $state before becoming healthy"
    ((SECONDS < deadline)) || fail "$container not healthy after ${health_timeout}s"
    if ((SECONDS >= next_report)); then
      say "  $container not healthy yet"
      next_report=$((SECONDS + 30))
    fi
    sleep 3
  done
done
say "all healthy; GET /health through the proxy:"
until curl -fsS --max-time 5 "http://127.0.0.1:$port/health" >"$workdir/health.json" 2>/dev/null; do
  ((SECONDS < deadline)) || fail "the proxy did not answer /health with 200"
  sleep 1
done
python3 -m json.tool "$workdir/health.json" | sed 's/^/    /'
curl -fsS --max-time 5 "http://127.0.0.1:$port/health/live" >/dev/null || fail "/health/live did not answer 200"

# --- 5. Predict through the proxy ---------------------------------------------------------------
# A 32x32 RGB PNG written with the standard library (no Pillow needed on the host).
python3 - "$workdir/smoke.png" <<'PY'
import struct, sys, zlib

width = height = 32
rows = b"".join(
    b"\x00" + bytes(v for x in range(width) for v in (8 * x, 8 * y, 128)) for y in range(height)
)

def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
png += chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
open(sys.argv[1], "wb").write(png)
PY
say "POST /predict with a 32x32 PNG, through the proxy"
code=$(curl -sS --max-time 30 -o "$workdir/predict.json" -w '%{http_code}' \
  -F "file=@$workdir/smoke.png;type=image/png" "http://127.0.0.1:$port/predict")
sed 's/^/    /' "$workdir/predict.json"; echo
[[ $code == 200 ]] || fail "/predict answered HTTP $code"
python3 - "$workdir/predict.json" <<'PY' || fail "/predict's answer is not a valid prediction"
import json, math, sys

classes = {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"}
answer = json.load(open(sys.argv[1]))
probabilities = answer["probabilities"]
assert set(probabilities) == classes, f"classes {sorted(probabilities)}"
assert answer["label"] in classes, f"label {answer['label']!r}"
assert math.isclose(sum(probabilities.values()), 1.0, abs_tol=1e-3), "probabilities do not sum to 1"
assert answer["label"] == max(probabilities, key=probabilities.get), "label is not the most probable class"
assert math.isclose(answer["probability"], probabilities[answer["label"]], abs_tol=1e-6)
print(f"    ok: {answer['label']} ({answer['probability']:.3f}), probabilities sum to "
      f"{sum(probabilities.values()):.6f}")
PY

# --- 6. SIGTERM to one replica under load ------------------------------------------------------
# A client posting the PNG in a loop through the proxy while one replica is stopped: every
# answer must be 200 (the proxy passes requests a draining or stopped replica cannot take).
python3 - "$workdir/smoke.png" "http://127.0.0.1:$port/predict" "$workdir/stop-now" \
  >"$workdir/load.log" 2>&1 <<'PY' &
import sys, time, urllib.error, urllib.request, uuid, os

png, url, stop_file = open(sys.argv[1], "rb").read(), sys.argv[2], sys.argv[3]
boundary = uuid.uuid4().hex
body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="s.png"\r\n'
        "Content-Type: image/png\r\n\r\n").encode() + png + f"\r\n--{boundary}--\r\n".encode()
statuses = {}
deadline = time.monotonic() + 300  # bounded whatever happens
while not os.path.exists(stop_file) and time.monotonic() < deadline:
    request = urllib.request.Request(
        url, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            status = answer.status
    except urllib.error.HTTPError as error:
        status = error.code
    except OSError as error:
        status = type(error).__name__
    statuses[status] = statuses.get(status, 0) + 1
print(statuses)
sys.exit(0 if set(statuses) == {200} else 1)
PY
load_pid=$!
sleep 3
stopped=${replica_names[0]}
say "podman stop $stopped (SIGTERM, SIGKILL after ${stop_timeout}s) while a client posts through the proxy"
stop_start=$SECONDS
# `podman stop` marks the container as stopped on purpose, so the restart policy leaves it
# down. (podman's complaints about systemd timers for healthchecks are noise; shown on failure.)
podman stop --time "$stop_timeout" "$stopped" >/dev/null 2>"$workdir/stop.err" \
  || { sed 's/^/    /' "$workdir/stop.err"; fail "podman stop failed"; }
exit_code=$(podman inspect -f '{{.State.ExitCode}}' "$stopped")
say "$stopped exited with code $exit_code after $((SECONDS - stop_start))s; its last log lines:"
podman logs --tail 5 "$stopped" 2>&1 | sed 's/^/    /'
sleep 5  # the load goes on against the remaining replicas
touch "$workdir/stop-now"
wait "$load_pid" && load_ok=1 || load_ok=""
say "the client's answers through the proxy (status: count): $(cat "$workdir/load.log")"
[[ $exit_code == 0 ]] || fail "exit code $exit_code after SIGTERM (137 means it was killed)"
[[ -n $load_ok ]] || fail "a request failed while a replica stopped"
