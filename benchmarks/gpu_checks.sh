#!/usr/bin/env bash
# Every CUDA check still owed, in one call of the device tool (about 6 minutes on an H200):
#   run(command="bash benchmarks/gpu_checks.sh", carry=[".whl"], timeout_s=480)
# Independent memory runs go in parallel lanes: each process reads its own allocator's counters and NVML's
# per-process figure, so they do not disturb one another; the step-time benchmark runs last, alone.
# What comes back ($OUT): log.txt, results.tar.xz (records, tables, logs), traces.tar (allocator traces).
# Unpack into reports/gpu/ (records) and tests/data/ (traces) as the note of the session that ran it says.
set -uo pipefail
OUT=${OUT:-/tmp/memprof-gpu}; mkdir -p "$OUT"
R=/tmp/r; rm -rf "$R"; mkdir -p "$R/logs" "$R/traces"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q -e . --no-deps
export PYTHONUNBUFFERED=1
GPU=$(python3 -c "import torch; n=torch.cuda.get_device_name().lower(); print('h200' if 'h200' in n else 'h100' if 'h100' in n else 'gpu')")
python3 -c "import torch, transformers, peft; print(torch.__version__, torch.cuda.get_device_name(), transformers.__version__, peft.__version__)" | tee "$OUT/log.txt"

# One command of a lane: its output in the lane's log, its exit code and seconds in log.txt.
step() {
  local lane=$1; shift; local t0=$SECONDS
  echo "== $*" >>"$R/logs/$lane.log"; timeout 320 "$@" >>"$R/logs/$lane.log" 2>&1; local rc=$?
  echo "[$lane] exit $rc in $((SECONDS - t0)) s: $*" | tee -a "$OUT/log.txt"
}
pack() { tar -C "$R" -cJf "$OUT/results.tar.xz" --exclude=traces --exclude='*.pickle' . 2>/dev/null
         tar -C "$R" -cf "$OUT/traces.tar" traces 2>/dev/null; }
cmp() { local lane=$1 name=$2; shift 2; step "$lane" memprof compare "$@" --device cuda --json "$R/$name.json" --csv "$R/$name.csv"; }
trace() {  # a run with the allocator's history kept, stripped of frames into traces/
  local name=$1; shift
  step traces memprof compare "$@" --device cuda --snapshot "$R/$name.pickle" --json "$R/traces/$name.json"
  step traces python3 benchmarks/allocator_trace.py "$R/$name.pickle" "$R/traces/$name.pkl.xz"
}

# Lane 1: the engine's CUDA checks (composition adds up under every recipe, blocks vs tensors, CPU==CUDA state,
# isolation) and the SMMF Triton kernel against torch.
lane_tests() {
  step tests python3 -m pytest -q -rA -m gpu -p no:cacheprovider -n 2 tests/test_gpu.py
  step tests python3 -m pytest -q -rA -m gpu -p no:cacheprovider tests/optim/test_smmf.py
}
# Lane 2: the training recipes on CUDA, each against its estimate afterwards (issue 20).
lane_recipes() {
  local g="--model gpt2 --opt adam,smmf --batch-size 4 --seq-len 512 --steps 3"
  cmp recipes gpt2-none $g
  cmp recipes gpt2-ckpt-full $g --checkpointing full
  cmp recipes gpt2-ckpt-selective $g --checkpointing selective
  cmp recipes gpt2-ckpt-every2 $g --checkpointing every:2
  cmp recipes gpt2-lora $g --lora r=8
  cmp recipes gpt2-qlora-nf4 $g --lora r=8,quant=nf4
  cmp recipes gpt2-accum2 --model gpt2 --opt adam,smmf --batch-size 2 --grad-accum 2 --seq-len 512 --steps 3
  cmp recipes gpt2-bf16-ckpt-full $g --amp bf16 --checkpointing full
  cmp recipes resnet50-ckpt-full --model resnet50 --opt adam,smmf --batch-size 32 --steps 3 --checkpointing full
}
# Lane 3: allocator traces for the simulator (issue 22) and the snapshot checks (memory_viz, T5 + Adafactor).
lane_traces() {
  trace t5-adafactor --model t5-small --opt hf_adafactor --batch-size 1 --seq-len 128 --steps 3
  step traces python3 benchmarks/snapshot_peak.py "$R/t5-adafactor.pickle" --min-mib 8 --frames 6
  step traces python3 -c "import pickle, torch.cuda._memory_viz as v; d=pickle.load(open('$R/t5-adafactor.pickle','rb')); print('memory_viz trace_plot chars', len(v.trace_plot(d)))"
  trace gpt2-adam --model gpt2 --opt adam --batch-size 4 --seq-len 512 --steps 3
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True trace gpt2-adam-expandable --model gpt2 --opt adam --batch-size 4 --seq-len 512 --steps 3
  PYTORCH_CUDA_ALLOC_CONF=max_split_size_mb:64,roundup_power2_divisions:4 trace gpt2-adam-split64-pow4 --model gpt2 --opt adam --batch-size 4 --seq-len 512 --steps 3
  trace roberta-io-adam --model reports/configs/roberta-base-cola/config.json --opt io_adam:buffer_size=16 --batch-size 16 --seq-len 128 --steps 3
  trace llama-350m-smmf-bf16 --model llama-350m --opt smmf --amp bf16 --batch-size 4 --seq-len 512 --steps 3
  trace gpt2-smmf-ckpt-full --model gpt2 --opt smmf --batch-size 4 --seq-len 512 --steps 3 --checkpointing full
  trace resnet50-adam --model resnet50 --opt adam --batch-size 32 --steps 3
  # The simulator against every history just recorded: same segments, same max_memory_reserved (issue 22).
  step traces python3 benchmarks/allocator_replay.py "$R/traces"
  rm -f "$R"/*.pickle
}
# Lanes 4-7: the papers' peak cells (issue 24), as reports/README.md's GPU commands. The largest runs (Adapprox's
# GPT-2 345M at 16 x 1024, GPT2-XL) share a lane so that the lanes together stay well inside the GPU's memory.
lane_papers_a() { cmp papers-a smmf-table1-gpu --config reports/smmf-table1.toml; }
lane_papers_b() {
  cmp papers-b smmf-table4-gpu --config reports/smmf-table4.toml
  cmp papers-b smmf-table6-gpu --config reports/smmf-table6.toml
  cmp papers-b io-adam-table4-gpu --config reports/io-adam-table4.toml
}
lane_papers_c() {
  cmp papers-c smmf-table8-gpu --config reports/smmf-table8.toml
  cmp papers-c llama-350m-bf16 --model llama-350m --opt adam,smmf --amp bf16 --batch-size 4 --seq-len 512 --steps 2
}
lane_papers_d() {
  cmp papers-d adapprox-table2-gpu --config reports/adapprox-table2.toml
  cmp papers-d alada-table4-gpt2-xl-gpu --model gpt2-xl --opt adam,hf_adafactor,alada --batch-size 1 --seq-len 1024 --steps 3
}

for lane in lane_tests lane_recipes lane_traces lane_papers_a lane_papers_b lane_papers_c lane_papers_d; do $lane & done
while [ -n "$(jobs -r)" ] && [ $SECONDS -lt 330 ]; do sleep 5; pack; done
if [ -n "$(jobs -r)" ]; then echo "lanes still running at ${SECONDS} s: stopped" | tee -a "$OUT/log.txt"; kill $(jobs -p) 2>/dev/null; fi
pack
# Last and alone: seed optimizers vs fused AdamW, step ms and ratios measured in one run.
if [ $SECONDS -lt 360 ]; then
  step bench python3 benchmarks/optimizers.py --model gpt2 --steps 12 --json "$R/benchmark-gpt2-$GPU.json" \
    --out "$R/benchmark-gpt2-$GPU.md"
fi
pack
echo "done in $SECONDS s" | tee -a "$OUT/log.txt"
