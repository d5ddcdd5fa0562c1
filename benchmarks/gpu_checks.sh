#!/usr/bin/env bash
# Every GPU check issue 12 (and the estimate's accuracy) owes, in one call of the device tool:
#   run(command="bash benchmarks/gpu_checks.sh", carry=[".whl"], timeout_s=570)
# Outputs land in $OUT (the device tool brings them back); copy them into reports/gpu/.
set -uo pipefail
OUT=${OUT:-/tmp/memprof-gpu}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q -e . --no-deps
GPU=$(python3 -c "import torch; n=torch.cuda.get_device_name().lower(); print('h200' if 'h200' in n else 'h100' if 'h100' in n else 'gpu')")
step() { echo "== $*" | tee -a "$OUT/log.txt"; timeout 240 "$@" >>"$OUT/log.txt" 2>&1; echo "exit $?" | tee -a "$OUT/log.txt"; }
# 1. The engine's CUDA checks (attribution adds up, tensor bytes vs blocks, stability across two runs).
step python3 -m pytest -q -m gpu tests/test_gpu.py
# 2. Seed optimizers vs fused AdamW: step ms, ratios, state and transient bytes (Triton SMMF included).
step python3 benchmarks/optimizers.py --model gpt2 --steps 12 --json "$OUT/benchmark-gpt2-$GPU.json" \
  --out "$OUT/benchmark-gpt2-$GPU.md"
# 3. --snapshot loads with torch's own memory_viz tooling.
step memprof compare --model gpt2 --opt smmf --steps 2 --batch-size 2 --seq-len 128 --snapshot "$OUT/snap.pickle"
step python3 -c "import pickle, torch.cuda._memory_viz as v; d=pickle.load(open('$OUT/snap.pickle','rb')); print(len(v.trace_plot(d)))"
# 4. The estimate against this GPU: real runs and their estimates, same settings.
step memprof compare --model llama-350m --opt adam,smmf --amp bf16 --batch-size 4 --seq-len 512 --steps 2 \
  --json "$OUT/llama-350m-$GPU.json"
step memprof estimate --model llama-350m --opt adam,smmf --amp bf16 --batch-size 4 --seq-len 512 --steps 2 \
  --json "$OUT/llama-350m-$GPU-estimate.json"
# 5. T5-small + transformers' Adafactor: the real step holds one more 62.75 MiB temporary than the estimate
#    (reports/estimate-accuracy.md, -8.8 %). What is live at the peak, and which frames allocated it:
step memprof compare --model t5-small --opt hf_adafactor --batch-size 1 --seq-len 128 --steps 2 \
  --snapshot "$OUT/t5.pickle" --json "$OUT/t5-adafactor-$GPU.json"
step python3 benchmarks/snapshot_peak.py "$OUT/t5.pickle" --min-mib 8 --frames 6
rm -f "$OUT/snap.pickle" "$OUT/t5.pickle"
