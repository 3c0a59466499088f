#!/bin/bash
# The runs of docs/defaults.md, "The toy configs' own settings": each config as a user runs it,
# on init seeds 0 and 1, as configured and with one setting at the class default. Each
# invocation kept its own --out and --runs (several ran at once); the results.json files were
# then merged: python -m experiments.toy_configs --merge <out>/*/results.json --out docs/experiments/toy_configs_open
# approx_l0.yaml as configured on seed 0 is docs/experiments/toy_configs/results.json's run.
M=model.init_args
run() { python -m experiments.toy_configs --out "$OUT/$1" --runs "$RUNS/$1" --configs "$2" --set $M.init_seed=$1 seed_everything=$1 "${@:3}"; }
OUT=${OUT:-/tmp/toy_configs_open/out} RUNS=${RUNS:-/tmp/toy_configs_open/runs}
for s in 0 1; do
  run $s jumprelu
  run $s jumprelu $M.lr_warmup_steps=0
  run $s jumprelu $M.bandwidth=0.1
  [ $s = 0 ] || run $s approx_l0
  run $s approx_l0 $M.lr_warmup_steps=0
  run $s approx_l0 $M.epsilon=0.3
  for c in topk batchtopk matryoshka; do  # matryoshka: session 18
    run $s $c
    run $s $c $M.dead_window_tokens=100000
  done
done
# topk-sharded.yaml (4 gloo processes; not a toy_configs config), session 18: as configured and
# with --model.init_args.dead_window_tokens 100000, each with --model.init_args.init_seed S
# --seed_everything S; its final-metrics tables: sharded_{asconf,w100k}_s{0,1}.txt here.
