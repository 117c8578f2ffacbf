"""docker-compose.yml and docker-compose.gpu.yml: what `docker compose up` promises on a host
with or without a GPU. (scripts/container-smoke.sh runs the stack itself.)"""

from __future__ import annotations

import re
from typing import Any

import yaml

from deploy.proxy import CLASSIFIER_CONF
from service.config import Settings
from tests.support.tools import PROJECT_ROOT


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load((PROJECT_ROOT / name).read_text())["services"]


def _default(value: str) -> str:
    """The default of a `${NAME:-default}` interpolation, or the value itself."""
    match = re.fullmatch(r"\$\{\w+:-(.*)\}", value)
    return match.group(1) if match else value


def test_plain_up_needs_no_gpu_and_only_the_proxy_publishes_a_port() -> None:
    services = _load("docker-compose.yml")
    assert set(services) == {"classifier", "proxy"}
    classifier, proxy = services["classifier"], services["proxy"]
    assert "deploy" not in classifier  # no device reservation: any Docker host starts it
    assert "profiles" not in classifier
    assert [name for name, service in services.items() if "ports" in service] == ["proxy"]
    assert _default(proxy["ports"][0]).endswith(":8000")
    assert _default(proxy["image"]).startswith("nginx:")  # the official image
    # The proxy runs the very file the loopback tests run, and reaches the replicas by the
    # service's name on the service's port.
    [mount] = proxy["volumes"]
    source, target, _ = mount.split(":")
    assert (PROJECT_ROOT / source).resolve() == CLASSIFIER_CONF
    assert target == "/etc/nginx/conf.d/default.conf"
    assert re.search(r"^\s*server classifier:8000 ", CLASSIFIER_CONF.read_text(), re.MULTILINE)
    assert classifier["expose"] == [str(Settings().port)]
    assert "classifier" in proxy["depends_on"]


def test_replicas_take_real_settings_and_get_time_to_drain() -> None:
    classifier = _load("docker-compose.yml")["classifier"]
    environment = classifier["environment"]
    unknown = {name for name in environment if name[8:].lower() not in Settings.model_fields}
    assert not unknown  # pydantic-settings would silently ignore a misspelt variable
    # Strings, as the environment gives them: Settings parses them.
    defaults: dict[str, Any] = {
        name[8:].lower(): _default(value) for name, value in environment.items()
    }
    settings = Settings(**defaults)
    grace = int(classifier["stop_grace_period"].removesuffix("s"))
    assert grace > settings.shutdown_timeout_s


def test_gpu_override_reserves_a_gpu_and_insists_on_it() -> None:
    classifier = _load("docker-compose.gpu.yml")["classifier"]
    [device] = classifier["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert _default(classifier["environment"]["SERVICE_DEVICE"]) == "cuda"
