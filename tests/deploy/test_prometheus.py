"""The Prometheus side of deploy/: the config loads, the rules parse, and every alert passes its
promtool unit tests (deploy/prometheus/tests.yml). Needs `promtool` (Debian's prometheus)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

PROM_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
ALERTS = {"ITTServerDown", "ITTQueueGrowing", "ITTHighTimeToFirstToken", "ITTKVCacheNearFull",
          "ITTHighErrorRate", "ITTHighAbortRate", "ITTThinkingReducedLong"}

pytestmark = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")


def promtool(*args: str) -> str:
    proc = subprocess.run(["promtool", *args], cwd=PROM_DIR, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, f"promtool {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}"
    return proc.stdout + proc.stderr


def test_config_is_valid():
    promtool("check", "config", "prometheus.yml")


def test_rules_are_valid():
    out = promtool("check", "rules", "alerts.yml")
    assert f"SUCCESS: {len(ALERTS)} rules found" in out


def test_alert_unit_tests_pass():
    out = promtool("test", "rules", "tests.yml")
    assert "SUCCESS" in out


def test_every_alert_has_a_unit_test():
    rules = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    defined = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert defined == ALERTS
    tests = yaml.safe_load((PROM_DIR / "tests.yml").read_text())
    firing = {case["alertname"] for t in tests["tests"] for case in t["alert_rule_test"]
              if case["exp_alerts"]}
    assert firing == ALERTS, f"alerts without a firing test: {ALERTS - firing}"
