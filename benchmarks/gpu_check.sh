#!/usr/bin/env bash
# The first thing to run on a lent GPU (one H100/H200, <= 10 min), then commit its output:
#
#   bash benchmarks/gpu_check.sh                 # appends JSON lines to benchmarks/results/gpu_check.json
#   git add benchmarks/results/gpu_check.json
#
# One process per step (benchmarks/gpu_check.py has what each checks), each under its own time limit, so a hang
# or a crash costs one step, not the check: versions + DLPack, cuCIM GPU vs CPU decode, end-to-end extraction
# (resnet18_in, GPU vs CPU, bf16), MIL and fine-tuning on the GPU with a forced resume, two actors on one GPU.
# Without a GPU every step says "no GPU" and exits 0 (tests/test_gpu_check.py runs that dry run).
# Env: GPU_CHECK_OUT (the JSON lines file), GPU_CHECK_WORK (scratch folder, default: a temp folder), PYTHON.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${GPU_CHECK_OUT:-benchmarks/results/gpu_check.json}"
WORK="${GPU_CHECK_WORK:-$(mktemp -d)}"
PYTHON="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$(dirname "$OUT")" "$WORK"
printf '{"step": "start", "date": "%s", "commit": "%s", "host": "%s"}\n' "$(date -u +%FT%TZ)" \
    "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" "$(hostname)" | tee -a "$OUT"
timeout -k 10 30 "$PYTHON" benchmarks/gpu_check.py probe --work "$WORK"
probe=$?  # 0: torch and cupy see a GPU; 3: no GPU; else the probe itself failed (a broken install)
# step:seconds: 510 s, + 30 s of probe and 10 s a process to be killed after its limit: <= 600 s
for entry in versions:30 decode:80 extract:160 share:80 train:160; do
    name="${entry%%:*}" limit="${entry##*:}"
    if [ "$probe" -eq 3 ]; then
        echo "{\"step\": \"$name\", \"status\": \"no GPU\"}" | tee -a "$OUT"
        continue
    fi
    line="$(timeout -k 10 "$limit" "$PYTHON" benchmarks/gpu_check.py "$name" --work "$WORK" | tail -n 1)"
    rc=$?
    if [ -z "$line" ]; then
        line="{\"step\": \"$name\", \"status\": \"no output (exit $rc; 124 = over its ${limit} s)\"}"
    fi
    echo "$line" | tee -a "$OUT"
done
exit 0
