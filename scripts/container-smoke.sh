#!/usr/bin/env bash
# Container smoke test: build the image, start it with docker-compose.yml (the CPU service,
# under podman-compose), wait until it is healthy, post a PNG to /predict and check the
# answer, stop it with SIGTERM and check it exits 0, then clean up.
#
# Not part of .ci/run: the image's PyPI torch (with CUDA) is several GB to download.
# Needs podman, podman-compose, curl and python3 (stdlib only); on the project's build
# machines run `sh ../shared/tools/container-setup.sh` once first. Run from anywhere:
#
#   bash scripts/container-smoke.sh
#
# Settings (environment):
#   SMOKE_PORT=18000        host port to publish (the compose file's PORT)
#   SMOKE_PROJECT=resnet56-smoke   compose project name (containers are labelled with it)
#   SMOKE_HEALTH_TIMEOUT=600       seconds to wait for a healthy container
#   SMOKE_STOP_TIMEOUT=60          seconds SIGTERM may take before podman sends SIGKILL
#   SMOKE_SKIP_BUILD=1             reuse the image already built
#   SMOKE_REMOVE_IMAGE=1           remove the image at the end too
set -euo pipefail

cd "$(dirname "$0")/.."
compose_file=docker-compose.yml
service=classifier-cpu
image=resnet56-cifar10:latest          # the compose file's `image:`
port=${SMOKE_PORT:-18000}
project=${SMOKE_PROJECT:-resnet56-smoke}
health_timeout=${SMOKE_HEALTH_TIMEOUT:-600}
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
container=""
cleanup() {
  status=$?
  if [[ $status -ne 0 && -n $container ]]; then
    say "container logs (last 60 lines):"
    podman logs --tail 60 "$container" 2>&1 | sed 's/^/    /' || true
  fi
  say "cleaning up"
  podman-compose -p "$project" -f "$compose_file" down >/dev/null 2>&1 || true
  # Backstop for anything the compose tool left behind.
  ids=$(podman ps -aq --filter "label=io.podman.compose.project=$project" 2>/dev/null || true)
  [[ -z $ids ]] || podman rm -f $ids >/dev/null 2>&1 || true
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

# --- 2. Start with the compose file -------------------------------------------------------------
say "starting $service with $compose_file (project $project, host port $port)"
podman-compose -p "$project" -f "$compose_file" up -d --no-build "$service" >"$workdir/up.log" 2>&1 \
  || { sed 's/^/    /' "$workdir/up.log"; fail "podman-compose up failed"; }
container=$(podman ps -a --filter "label=io.podman.compose.project=$project" \
  --filter "label=com.docker.compose.service=$service" --format '{{.Names}}' | head -n 1)
[[ -n $container ]] || fail "no container for $service after podman-compose up"
uid=$(podman exec "$container" id -u)
say "container $container, the server runs as uid $uid"
[[ $uid != 0 ]] || fail "the server runs as root"

# --- 3. Wait until healthy --------------------------------------------------------------------
# Healthchecks are not scheduled by themselves here (no systemd), so run the image's check.
say "waiting for the healthcheck (at most ${health_timeout}s)"
deadline=$((SECONDS + health_timeout))
next_report=$((SECONDS + 30))
until podman healthcheck run "$container" >/dev/null 2>&1; do
  state=$(podman inspect -f '{{.State.Status}}' "$container")
  [[ $state == running ]] || fail "container is $state before becoming healthy"
  http=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "http://127.0.0.1:$port/health" || true)
  if ((SECONDS >= deadline)); then
    say "the container's healthcheck: $(podman inspect -f '{{json .Config.Healthcheck.Test}}' "$container")"
    fail "not healthy after ${health_timeout}s (GET /health from the host: HTTP $http)"
  fi
  if ((SECONDS >= next_report)); then
    say "  not healthy yet (GET /health from the host: HTTP $http)"
    next_report=$((SECONDS + 30))
  fi
  sleep 3
done
say "healthy; GET /health:"
curl -fsS --max-time 5 "http://127.0.0.1:$port/health" | python3 -m json.tool | sed 's/^/    /'
curl -fsS --max-time 5 "http://127.0.0.1:$port/health/live" >/dev/null || fail "/health/live did not answer 200"

# --- 4. Predict -------------------------------------------------------------------------------
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
say "POST /predict with a 32x32 PNG"
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

# --- 5. SIGTERM: a clean exit -------------------------------------------------------------------
# `podman stop` sends the image's STOPSIGNAL (SIGTERM) and waits; it also marks the container
# as stopped on purpose, so the restart policy leaves it down.
say "podman stop (SIGTERM, SIGKILL after ${stop_timeout}s)"
stop_start=$SECONDS
# (podman's complaints about systemd timers for healthchecks are noise here; shown on failure.)
podman stop --time "$stop_timeout" "$container" >/dev/null 2>"$workdir/stop.err" \
  || { sed 's/^/    /' "$workdir/stop.err"; fail "podman stop failed"; }
exit_code=$(podman inspect -f '{{.State.ExitCode}}' "$container")
say "exited with code $exit_code after $((SECONDS - stop_start))s; last log lines:"
podman logs --tail 8 "$container" 2>&1 | sed 's/^/    /'
[[ $exit_code == 0 ]] || fail "exit code $exit_code after SIGTERM (137 means it was killed)"
