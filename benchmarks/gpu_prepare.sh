#!/usr/bin/env bash
# Gather what benchmarks/gpu_check.py needs on a GPU machine that reaches nothing: the corpus
# and nanoGPT's train.py, model.py, configurator.py and config/ in build/gpu/ (ignored by git;
# the device call carries it), and the server's packages as wheels in .whl/ (the machine's
# python3 lacks starlette, uvicorn, pydantic, optuna and openai).
#
#   bash benchmarks/gpu_prepare.sh /path/to/nanoGPT      # a checkout, or a bare git directory of it
#
# then, on the GPU machine, from the repository's root (carrying build/gpu and .whl):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   PYTHONPATH=src:$PYTHONPATH python3 benchmarks/gpu_check.py --out "$OUT/gpu-check" \
#       --text build/gpu/tinyshakespeare.txt --nanogpt build/gpu/nanoGPT
set -euo pipefail
cd "$(dirname "$0")/.."
nanogpt=${1:?usage: gpu_prepare.sh NANOGPT_PATH}
mkdir -p build/gpu/nanoGPT .whl
cp ../shared/data/tinyshakespeare.txt build/gpu/tinyshakespeare.txt
files=(train.py model.py configurator.py config)
if [ -f "$nanogpt/train.py" ]; then
    cp -r "${files[@]/#/$nanogpt/}" build/gpu/nanoGPT/
else
    git --git-dir "$nanogpt" archive HEAD "${files[@]}" | tar -x -C build/gpu/nanoGPT
fi
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl starlette uvicorn h11 anyio sniffio click pydantic pydantic-core annotated-types typing-inspection \
    typing-extensions
du -sh build/gpu .whl
