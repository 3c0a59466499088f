#!/usr/bin/env bash
# Every GPU benchmark in one go, results under $OUT (default ./gpu-results), one file per run
# ending in "exit <status>":
#   - train_step, train_step_bf16, train_step_compile(_bf16): every variant's step time, as a
#     fraction of the six-product roofline and as a multiple of one encoder GEMM, float32 and
#     bf16 autocast, eager and torch.compile;
#   - vs_sparsify(_bf16): TopK against EleutherAI sparsify's own trainer (its Triton decoder);
#   - vs_saelens(_l0): against SAELens 6.x; then DDP, nearest neighbours, cache, sharding.
#
#   benchmarks/gpu_suite.sh              on a lent GPU machine that has torch and lightning but
#                                        no network: the missing pure-Python packages come as
#                                        wheels in .devwheels/ (made beforehand with `pip download
#                                        --no-deps --python-version 3.12 ...`, docs/benchmarks.md)
#   benchmarks/gpu_suite.sh --dry-run    on CPU, in the current environment, every command once at
#                                        tiny shapes and one step, to check the suite itself
#                                        (tests/test_gpu_suite.py). Peers run only when their
#                                        interpreters are given (SPARSIFY_PYTHON, SAELENS_PYTHON);
#                                        the cache and sharding benchmarks are left out;
#                                        DRY_ONLY="topk matryoshka" limits the step benchmarks
#                                        to those variants.
# ONLY=<regex> runs the benchmarks whose result names match it.
set -u
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-gpu-results}; mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
cd "$(dirname "$0")/.."

run() {
  name=$1; shift
  if [ -n "${ONLY:-}" ] && ! [[ $name =~ $ONLY ]]; then return; fi
  echo "== $*" > "$OUT/$name.txt"
  timeout "${LIMIT:-150}" "$@" >> "$OUT/$name.txt" 2>&1
  echo "exit $?" >> "$OUT/$name.txt"
}

if [ $DRY = 1 ]; then
  device=cpu
  shapes="--device cpu --d_in 16 --d_sae 64 --batch 64"
  steps="--steps 1 --warmup 0"
  # DRY_ONLY: variant names (prefixes) for the step benchmarks, e.g. "topk matryoshka".
  variants="--k 4 --l0 8 ${DRY_ONLY:+--only $DRY_ONLY}"
  compiled="--only topk"  # compiling every variant takes minutes on a CPU
  l0=8
  kflag="--k 4"
  gpus=0
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  $PYTHON -c "import torch, lightning; print('dry run on CPU: torch', torch.__version__, 'lightning', lightning.__version__)" > "$OUT/machine.txt" 2>&1
else
  device=cuda
  shapes="--device cuda --d_in 768 --d_sae 24576 --batch 4096"
  steps="--steps 10 --warmup 3"
  compiled=""
  variants=""
  kflag=""
  l0=64
  gpus=$(nvidia-smi -L | wc -l)
  W=.devwheels
  common="beartype fancy_einsum typeguard datasets dill multiprocess wandb"
  pick() { for name in "$@"; do ls $W/${name}-*.whl; done; }
  $PYTHON -m pip install -q --no-index --no-deps --target /tmp/ours \
    $(pick $common jsonargparse typeshed_client docstring_parser) $W/transformer_lens-4.3.0-*.whl
  $PYTHON -m pip install -q --no-index --no-deps --target /tmp/saelens \
    $(pick $common sae_lens babe nltk plotly plotly_express python_dotenv simple_parsing tenacity better_abc) \
    $W/transformer_lens-3.9.0-*.whl
  # sparsify imports transformers, accelerate and datasets, which the machine has.
  $PYTHON -m pip install -q --no-index --no-deps --target /tmp/sparsify \
    $(pick eai_sparsify natsort schedulefree simple_parsing einops)
  printf '#!/bin/sh\nPYTHONPATH=/tmp/saelens exec python3 "$@"\n' > /tmp/saelens-python
  printf '#!/bin/sh\nPYTHONPATH=/tmp/sparsify exec python3 "$@"\n' > /tmp/sparsify-python
  chmod +x /tmp/saelens-python /tmp/sparsify-python
  SAELENS_PYTHON=${SAELENS_PYTHON:-/tmp/saelens-python}
  SPARSIFY_PYTHON=${SPARSIFY_PYTHON:-/tmp/sparsify-python}
  export PYTHONPATH=/tmp/ours:$PWD
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PYTHON -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"; } > "$OUT/machine.txt" 2>&1
fi

run train_step $PYTHON benchmarks/train_step.py $shapes $steps $variants
run train_step_bf16 $PYTHON benchmarks/train_step.py $shapes $steps --bf16 $variants
run train_step_compile $PYTHON benchmarks/train_step.py $shapes $steps --compile $variants $compiled
run train_step_compile_bf16 $PYTHON benchmarks/train_step.py $shapes $steps --compile --bf16 $variants $compiled
if [ -n "${SPARSIFY_PYTHON:-}" ]; then
  peer="--sparsify-python $SPARSIFY_PYTHON"
  run vs_sparsify $PYTHON benchmarks/vs_sparsify.py $shapes $steps --rounds 2 $kflag $peer
  run vs_sparsify_bf16 $PYTHON benchmarks/vs_sparsify.py $shapes $steps --rounds 2 --bf16 $kflag $peer
fi
if [ -n "${SAELENS_PYTHON:-}" ]; then
  peer="--saelens-python $SAELENS_PYTHON"
  run vs_saelens $PYTHON benchmarks/vs_saelens.py $shapes $steps --repeats 2 $kflag $peer
  run vs_saelens_bf16 $PYTHON benchmarks/vs_saelens.py $shapes $steps --repeats 2 --bf16 $kflag $peer
  run vs_saelens_l0 $PYTHON benchmarks/vs_saelens.py $shapes $steps --repeats 2 --variants standard --l0 $l0 $peer
fi
run ddp_scaling $PYTHON benchmarks/ddp_scaling.py $shapes --processes 1 $([ $DRY = 1 ] || echo "$gpus")
if [ $DRY = 1 ]; then
  run nearest_neighbour $PYTHON benchmarks/nearest_neighbour.py --device cpu --backends torch --sizes 256
  exit 0
fi
run nearest_neighbour $PYTHON benchmarks/nearest_neighbour.py --device cuda --backends torch --sizes 16384 65536 1048576
run cache_throughput $PYTHON benchmarks/cache_throughput.py --device cuda --random pythia-70m --n-tokens 262144
# Latent sharding needs two GPUs or more (a one-GPU machine has only the unsharded run).
if [ "$gpus" -ge 2 ]; then
  sizes="1 2"; [ "$gpus" -ge 4 ] && sizes="$sizes 4"; [ "$gpus" -ge 8 ] && sizes="$sizes 8"
  run sharded $PYTHON benchmarks/sharded.py --accelerator gpu --d_in 4096 --d_sae 262144 --batch 4096 --sizes $sizes
  # Member placement against replication: per-GPU bytes, rows exchanged per step, step time
  # (8 members of 4096 x 16384 replicated hold about 17 GB per GPU with Adam).
  run member_parallel $PYTHON benchmarks/member_parallel.py --accelerator gpu --members 8 --d_in 4096 --d_sae 16384 --batch 4096 --k 64 --sizes ${sizes#1 }
fi
