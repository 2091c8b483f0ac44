#!/usr/bin/env bash
# One-call GPU check-and-benchmark driver (used on the lent H100; each stage is time-boxed).
#   bash benchmarks/run-gpu.sh OUT_DIR STAGE...
# Stages: env kernels kernels-profile kernels-gdn13b conv-l2 kernels-mamba train-baseline bench-train train-compile train-mem
#         decode graphs mqar scaling1
# Results land in OUT_DIR (JSON/PNG/logs); copy them into benchmarks/results/ afterwards.
set -u
out=${1:?usage: run-gpu.sh OUT_DIR STAGE...}; shift
mkdir -p "$out"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
stage() { local name=$1 limit=$2; shift 2; echo "=== $name (limit ${limit}s)"; local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1; local rc=$?
  echo "=== $name rc=$rc $((SECONDS - t0))s"; tail -n 25 "$out/$name.log"; }
for s in "$@"; do case $s in
  env) nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
       python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)";;
  kernels) stage kernels 180 python3 -m mixlab bench kernels --check --out-dir "$out";;
  kernels-profile) stage kernels-profile 150 python3 -m mixlab bench kernels --ops gdn --seqlens 2048 --modes fwdbwd \
       --profile 2048,32768 --profile-ops gdn,dn,ssd --out-dir "$out/profile";;
  train-mem) stage train-mem 150 python3 -m mixlab bench train --steps 2 --warmup 1 --shapes 2048x4 --no-plot \
       --presets transformer-1.3b,gated_deltanet-1.3b,mamba2-1.3b --out-dir "$out/train-mem";;
  scaling1) stage scaling1 240 python3 -m mixlab bench scaling --gpus 1 --presets gated_deltanet-1.3b \
       --seq-len 4096 --batch-per-gpu 2 --steps 6 --warmup 2 --out-dir "$out/scaling";;
  conv-l2) stage conv-l2 150 python3 -m mixlab.bench.conv_l2 --out-dir "$out";;
  kernels-mamba) stage kernels-mamba 60 python3 -m mixlab bench kernels-mamba --sections loss --out-dir "$out";;
  train-baseline) for m in gated_deltanet-125m transformer-125m mamba2-125m; do
       stage "train-$m" 90 python3 -m mixlab train -c configs/train/gpu-125m.yaml model=$m train.batch_size=8 \
         train.max_steps=200 train.eval_every=0 log.progress=false run.dir="/tmp/mixlab-runs/$m"
       cp "/tmp/mixlab-runs/$m/metrics.jsonl" "$out/train-$m.metrics.jsonl" 2>/dev/null; done;;
  bench-train) stage bench-train 230 python3 -m mixlab bench train --steps 3 --warmup 1 --long --out-dir "$out";;
  train-compile) stage train-compile 560 python3 -m mixlab bench train --compile --profile --long --steps 3 --warmup 3 \
       --presets transformer-1.3b,gated_deltanet-1.3b,gdn_h1-1.3b,mamba2-1.3b --out-dir "$out/train-compile";;
  kernels-gdn13b) stage kernels-gdn13b 150 python3 -m mixlab bench kernels --shape gdn-1.3b --ops gdn --seqlens 4096 \
       --profile 4096 --profile-ops gdn --no-peers --out-dir "$out/gdn13b";;
  decode) stage decode 150 python3 -m mixlab bench decode --steps 8 --warmup 2 --prefill-repeats 1 --out-dir "$out";;
  graphs) stage graphs 50 python3 -m pytest -q -x tests/test_generate.py -k cuda -p no:cacheprovider;;
  mqar) stage mqar 470 python3 -m mixlab.eval.mqar_sweep --budget-min 6.25 --jobs 16 --device cuda \
         --work-dir /tmp/mixlab-mqar --fresh --out-dir "$out"
       tar czf "$out/mqar-logs.tgz" -C /tmp/mixlab-mqar logs 2>/dev/null;;  # one file: the device returns 8 at most
  *) echo "unknown stage $s";;
esac; done
