"""The checkpoints shipped inside the package (``default``, ``arith``; one folder each, in the
format of docs/ITT_SPEC.md) and how a ``--model`` argument names one."""

from __future__ import annotations

from pathlib import Path

CHECKPOINTS_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL_DIR = CHECKPOINTS_DIR / "default"
SHIPPED_MODELS = ("default", "arith")      # names that load a model shipped in the package


def resolve_model_path(model: str | Path | None) -> Path:
    """``None`` or a shipped model's name (``SHIPPED_MODELS``) -> its directory inside the
    package; anything else is a path."""
    if model is None:
        return DEFAULT_MODEL_DIR
    if str(model) in SHIPPED_MODELS:
        return CHECKPOINTS_DIR / str(model)
    return Path(model).expanduser()
