#!/bin/bash
# fit.sh CONFIG WARMUP SEED: configs/minilm/CONFIG.yaml as configured but for the warm-up steps
# (and seed_everything and the weights' init_seed); keeps the command's final-metrics table.
set -e
config=$1 warmup=$2 seed=$3
name=${config}_wu${warmup}_s${seed}
run=/tmp/minilm-cfg/runs/$name
[ -e /tmp/minilm-cfg/results/$name.txt ] && exit 0
rm -rf "$run"
start=$(date +%s)
nice -n 10 lightning-sae fit --config configs/minilm/$config.yaml \
  --trainer.default_root_dir "$run" --seed_everything "$seed" \
  --model.init_args.lr_warmup_steps "$warmup" --model.init_args.init_seed "$seed" > /tmp/minilm-cfg/results/$name.log 2>&1
final=$(find "$run" -name final_metrics.txt | sort | tail -1)
{ cat "$final"; echo "seconds $(( $(date +%s) - start ))"; } > /tmp/minilm-cfg/results/$name.txt
