"""The ITT definition is vendored in docs/ITT_SPEC.md; code and tests cite it, so it must be in
the repository and must not drift from the shared copy it came from (../shared/ITT_SPEC.md, next
to the repository on the development machines; absent in CI, where only existence is checked)."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SPEC = REPO / "docs" / "ITT_SPEC.md"
SHARED_SPEC = REPO.parent / "shared" / "ITT_SPEC.md"


def test_spec_is_vendored():
    assert SPEC.is_file()
    assert SPEC.read_text(encoding="utf-8").startswith("# ITT")


def test_spec_matches_shared_copy():
    if not SHARED_SPEC.is_file():
        pytest.skip(f"no shared copy at {SHARED_SPEC}")
    assert SPEC.read_bytes() == SHARED_SPEC.read_bytes(), (
        f"docs/ITT_SPEC.md differs from {SHARED_SPEC}: cp it over (the shared copy is the source)"
    )
