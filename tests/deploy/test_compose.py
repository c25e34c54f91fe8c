"""deploy/compose.yaml and the Grafana provisioning it mounts agree with each other: the files it
mounts exist, Prometheus scrapes the itt-server service, Grafana's datasource points at the
Prometheus service, and the dashboards provider reads the folder the dashboards are mounted in.
(No Docker engine here: `docker compose config` cannot run, so the wiring is checked by hand.)"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


class ComposeLoader(yaml.SafeLoader):
    """Accepts Compose's merge tags (!reset, !override) as plain values."""


ComposeLoader.add_multi_constructor(
    "!", lambda loader, suffix, node: loader.construct_mapping(node)
    if isinstance(node, yaml.MappingNode) else loader.construct_object(node))


def load(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=ComposeLoader)


def mounts(service: dict) -> dict[str, Path]:
    """container path -> host path, for bind mounts (host paths relative to deploy/)."""
    out = {}
    for vol in service.get("volumes", []):
        src, dst = vol.split(":")[:2]
        if src.startswith("."):
            out[dst] = (DEPLOY / src).resolve()
    return out


def test_compose_wiring():
    compose = load(DEPLOY / "compose.yaml")
    services = compose["services"]
    assert set(services) == {"itt-server", "prometheus", "grafana"}
    for name, svc in services.items():
        for src in mounts(svc).values():
            assert src.exists(), f"{name} mounts missing {src}"

    server = services["itt-server"]
    assert (DEPLOY / server["build"]["context"] / "Dockerfile").exists()
    assert "ARG VARIANT=" in (REPO / "Dockerfile").read_text()
    assert "8000:8000" in server["ports"]
    grace = int(server["stop_grace_period"].rstrip("s"))
    assert grace > 30, "stop_grace_period must cover the server's 30 s drain"

    prom = services["prometheus"]
    config_arg = next(a for a in prom["command"] if a.startswith("--config.file="))
    config_path = config_arg.split("=", 1)[1]
    prom_dir = mounts(prom)[str(Path(config_path).parent)]
    scrape = yaml.safe_load((prom_dir / Path(config_path).name).read_text())
    targets = [t for job in scrape["scrape_configs"] for sc in job["static_configs"]
               for t in sc["targets"]]
    assert targets == ["itt-server:8000"]

    grafana = services["grafana"]
    prov = mounts(grafana)["/etc/grafana/provisioning"]
    (ds,) = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert re.fullmatch(r"http://prometheus:9090/?", ds["url"])
    assert "9090:9090" in prom["ports"]
    assert ds["jsonData"]["timeInterval"] == scrape["global"]["scrape_interval"]
    (provider,) = yaml.safe_load(
        (prov / "dashboards" / "itt-server.yml").read_text())["providers"]
    dash_dir = mounts(grafana)[provider["options"]["path"]]
    assert (dash_dir / "itt-server.json").exists()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == provider["options"]["path"] + "/itt-server.json"


def test_cpu_override():
    override = load(DEPLOY / "compose.cpu.yaml")["services"]["itt-server"]
    assert override["build"]["args"]["VARIANT"] == "cpu"
    assert "!reset" in (DEPLOY / "compose.cpu.yaml").read_text()   # drops the GPU reservation
