"""Build the training corpus from English text that Debian packages install.

Sources (see docs/MODEL_CARD.md for why this mix):
  * the King James Bible (bible-kjv-text, through its `bible` reader), one verse per line;
  * the Jargon File (dict-jargon), its prose definitions, markup removed;
  * fortunes (fortunes, fortunes-min), non-art quotations, one per line.

Every 50th document goes to the held-out split (evaluation), the 25th of every 50 to the
calibration split (routing thresholds), the rest to training — all deterministic.
Usage: python -m itt_runtime.training.corpus OUT_DIR
"""

from __future__ import annotations

import gzip
import re
import subprocess
import sys
from pathlib import Path

FORTUNE_DIR = Path("/usr/share/games/fortunes")
FORTUNE_SKIP = {"art", "ascii-art", "translate-me", "perl", "linux", "debian", "zippy"}
JARGON = Path("/usr/share/dictd/jargon.dict.dz")
HELDOUT_EVERY = 50


def clean(line: str) -> str:
    line = line.replace("\u201c", '"').replace("\u201d", '"').replace("\u2019", "'")
    line = line.replace("\u2018", "'").replace("\u2014", " - ")
    return re.sub(r"\s+", " ", line).strip()


def bible_verses() -> list[str]:
    out = subprocess.run(["bible", "Genesis1:1-Revelation22:21"], capture_output=True,
                         text=True, check=True).stdout
    verses: list[str] = []
    for raw in out.splitlines():
        if re.match(r"^\s+\d+ ", raw):                       # "  12 And God said ..."
            verses.append(re.sub(r"^\s+\d+ ", "", raw))
        elif raw.strip() and not re.match(r"^[1-3]?\s?[A-Z][a-z]+( of [A-Z][a-z]+)? \d+$",
                                          raw.strip()) and verses:
            verses[-1] += " " + raw.strip()                 # wrapped continuation line
    return [clean(v) for v in verses if v.strip()]


def jargon_paragraphs() -> list[str]:
    text = gzip.open(JARGON, "rt", encoding="utf-8", errors="replace").read()
    paras, cur = [], []
    for raw in text.splitlines():
        if raw.startswith("    ") and raw.strip():
            cur.append(raw.strip())
        else:
            if cur:
                paras.append(" ".join(cur))
            cur = []
    out = []
    for p in paras:
        p = re.sub(r"[{}]", "", p)
        p = re.sub(r"^\[[^\]]*\]\s*", "", p)                  # [etymology] prefixes
        p = re.sub(r"^\d+\.\s*", "", p)
        p = clean(p)
        letters = sum(c.isalpha() for c in p)
        if len(p) > 40 and letters > 0.7 * len(p) and "http" not in p:
            out.append(p)
    return out


def fortunes() -> list[str]:
    out = []
    for f in sorted(FORTUNE_DIR.iterdir()):
        if f.suffix or f.name in FORTUNE_SKIP or not f.is_file():
            continue
        for chunk in f.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            lines = [ln for ln in chunk.splitlines() if ln.strip()]
            if not lines or any(ln.startswith(("\t\t", "      ")) and len(ln.strip()) < 8
                                for ln in lines):
                continue
            text = clean(" ".join(lines))
            letters = sum(c.isalpha() or c == " " for c in text)
            if 20 < len(text) < 600 and letters > 0.85 * len(text):
                out.append(text)
    return out


def build(out_dir: Path) -> dict[str, int]:
    out_dir.mkdir(parents=True, exist_ok=True)
    docs = bible_verses() + jargon_paragraphs() + fortunes()
    split: dict[str, list[str]] = {"train": [], "heldout": [], "calib": []}
    for i, d in enumerate(docs):
        r = i % HELDOUT_EVERY
        split["heldout" if r == HELDOUT_EVERY - 1 else "calib" if r == HELDOUT_EVERY // 2
              else "train"].append(d)
    for name, part in split.items():
        (out_dir / f"{name}.txt").write_text("\n".join(part) + "\n", encoding="utf-8")
    return {"documents": len(docs), **{f"{k}_chars": sum(map(len, v)) for k, v in split.items()}}


if __name__ == "__main__":
    print(build(Path(sys.argv[1] if len(sys.argv) > 1 else "corpus")))
