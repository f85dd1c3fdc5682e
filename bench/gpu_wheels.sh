#!/usr/bin/env bash
# Download, on a machine with PyPI, the wheels bench/gpu_check.py installs on a GPU machine that
# has no network: exactly the pins `gpu_check.py --print-wheels` lists (the packages the lent
# H200's Python 3.12 lacks), for CPython 3.12 or 3.11 on manylinux x86_64, without dependencies
# (the list already names each one needed). About 56 MB for 3.12, bitsandbytes 43 MB of it; the
# device tool carries 64 MiB a call, the repository included.
#
#   bash bench/gpu_wheels.sh [DIR=.whl] [PYTHON_VERSION=3.12]
#
# then, for the device tool, `carry: [".whl"]` (.gitignore already ignores /.whl/).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="${1:-.whl}"
python_version="${2:-3.12}"
python="${PYTHON:-python3}"
mkdir -p "$dest"
mapfile -t pins < <(PYTHONPATH="$here/.." "$python" "$here/gpu_check.py" --print-wheels)
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
"$python" -m pip download --no-deps --only-binary=:all: --implementation cp \
    --python-version "$python_version" "${platforms[@]}" --platform any -d "$dest" "${pins[@]}"
du -sh "$dest"
