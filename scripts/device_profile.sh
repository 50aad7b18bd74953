#!/usr/bin/env bash
# On a lent GPU machine (H100/H200, through the device tool): profile the GPU-sized reference model, fit its
# continuous-batching step model, and benchmark the engine; everything lands in $OUT. Uses that machine's python3 and torch; pydantic and its
# needs travel as wheels in .whl/ (see docs/profiles.md, "On a lent GPU machine").
#   MODEL=gpt2-small DTYPE=bfloat16 MAXB=64 bash scripts/device_profile.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/capsim-device-out}
MODEL=${MODEL:-gpt2-small}
DTYPE=${DTYPE:-bfloat16}
MAXB=${MAXB:-64}
PY=${PYTHON:-python3}
mkdir -p "$OUT"

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    "$PY" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available())' || true
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

# The profile first: it is what analysts plan with. Then the continuous engine's steps fitted onto it
# (capsim profile-steps: the step-time model continuous-mode scenarios read), then the engine benchmark
# (batching speedup, busy share; each row warms up first) and the cold-shape benchmark (which attention
# backend pays for a shape's first pass; docs/benchmarks.md). The timeouts sum to 570 s, inside one device
# call's 600 s; on the H200 in stop 47 the first three took about 150 s. Eight files come back at most:
# this script leaves eight in $OUT.
timeout 180 "$PY" -m capsim.cli profile --model "$MODEL" --dtype "$DTYPE" --max-batch-size "$MAXB" \
    --out-dir "$OUT" 2>&1 | grep -v '^profiling' | tail -20
for prof in "$OUT"/*-"$MODEL"-"$DTYPE".csv; do
    [ -e "$prof" ] || continue
    timeout 120 "$PY" -m capsim.cli profile-steps "$prof" --model "$MODEL" --dtype "$DTYPE" \
        --out "${prof%.csv}-steps.csv" 2>&1 | tail -5 | tee "$OUT/profile_steps.txt"
done
timeout 120 "$PY" benchmarks/bench_engine.py --model "$MODEL" --dtype "$DTYPE" 2>&1 | tail -15 \
    | tee "$OUT/bench_engine.txt"
timeout 150 "$PY" benchmarks/bench_engine_cold.py --quick --model "$MODEL" --dtype "$DTYPE" 2>&1 | tail -20 \
    | tee "$OUT/bench_engine_cold.txt"
cp benchmarks/results/engine-*.json "$OUT/" 2>/dev/null || true
ls -la "$OUT"
