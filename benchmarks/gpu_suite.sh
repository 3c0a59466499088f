#!/usr/bin/env bash
# Every GPU benchmark in one go, for a lent GPU machine that has torch and lightning but no
# network: the missing pure-Python packages come as wheels in .devwheels/ (made beforehand with
# `pip download --no-deps --python-version 3.12 ...`, see docs/benchmarks.md). Results go to
# $OUT (or ./gpu-results).
set -u
OUT=${OUT:-gpu-results}; mkdir -p "$OUT"
W=.devwheels
common="beartype fancy_einsum typeguard datasets dill multiprocess wandb"
pick() { for name in "$@"; do ls $W/${name}-*.whl; done; }
python3 -m pip install -q --no-index --no-deps --target /tmp/ours \
  $(pick $common jsonargparse typeshed_client docstring_parser) $W/transformer_lens-4.3.0-*.whl
python3 -m pip install -q --no-index --no-deps --target /tmp/saelens \
  $(pick $common sae_lens babe nltk plotly plotly_express python_dotenv simple_parsing tenacity better_abc) \
  $W/transformer_lens-3.9.0-*.whl
printf '#!/bin/sh\nPYTHONPATH=/tmp/saelens exec python3 "$@"\n' > /tmp/saelens-python
chmod +x /tmp/saelens-python
export PYTHONPATH=/tmp/ours:$PWD
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"; } > "$OUT/machine.txt" 2>&1
run() { name=$1; shift; echo "== $*" > "$OUT/$name.txt"; timeout "${LIMIT:-150}" "$@" >> "$OUT/$name.txt" 2>&1; echo "exit $?" >> "$OUT/$name.txt"; }
shapes="--device cuda --d_in 768 --d_sae 24576 --batch 4096"
run train_step python3 benchmarks/train_step.py $shapes --steps 10 --warmup 3
run train_step_bf16 python3 benchmarks/train_step.py $shapes --steps 10 --warmup 3 --bf16
run vs_saelens python3 benchmarks/vs_saelens.py $shapes --steps 30 --warmup 5 --repeats 2 --saelens-python /tmp/saelens-python
run vs_saelens_l0 python3 benchmarks/vs_saelens.py $shapes --steps 30 --warmup 5 --repeats 2 --variants standard --l0 64 --saelens-python /tmp/saelens-python
run ddp_scaling python3 benchmarks/ddp_scaling.py $shapes --processes 1 $(nvidia-smi -L | wc -l)
run nearest_neighbour python3 benchmarks/nearest_neighbour.py --device cuda --backends torch --sizes 16384 65536 1048576
run cache_throughput python3 benchmarks/cache_throughput.py --device cuda --random pythia-70m --n-tokens 262144
# Latent sharding needs two GPUs or more (a one-GPU machine has only the unsharded run).
gpus=$(nvidia-smi -L | wc -l)
if [ "$gpus" -ge 2 ]; then
  sizes="1 2"; [ "$gpus" -ge 4 ] && sizes="$sizes 4"; [ "$gpus" -ge 8 ] && sizes="$sizes 8"
  run sharded python3 benchmarks/sharded.py --accelerator gpu --d_in 4096 --d_sae 262144 --batch 4096 --sizes $sizes
fi
