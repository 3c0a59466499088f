#!/bin/bash
# fit.sh CONFIG WARMUP SEED: configs/minilm/CONFIG.yaml as configured but for the warm-up steps
# (and seed_everything and the weights' init_seed); keeps the command's final-metrics table.
# A group config (SAEGroup) gets its members list again with, in each member, init_seed SEED and,
# where the member sets lr_warmup_steps, WARMUP instead (members without one keep the default).
set -e
config=$1 warmup=$2 seed=$3
name=${config}_wu${warmup}_s${seed}
run=/tmp/minilm-cfg/runs/$name
[ -e /tmp/minilm-cfg/results/$name.txt ] && exit 0
rm -rf "$run"
mkdir -p "$run" /tmp/minilm-cfg/results
if grep -q 'lightning_sae.models.group.SAEGroup' configs/minilm/$config.yaml; then
  python - configs/minilm/$config.yaml "$warmup" "$seed" > "$run.members.yaml" <<'PY'
import sys
import yaml
path, warmup, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
members = yaml.safe_load(open(path))["model"]["init_args"]["members"]
for member in members:
    init_args = member.setdefault("init_args", {})
    if "lr_warmup_steps" in init_args:
        init_args["lr_warmup_steps"] = warmup
    init_args["init_seed"] = seed
print(yaml.safe_dump({"model": {"init_args": {"members": members}}}, sort_keys=False))
PY
  overrides=(--config "$run.members.yaml")
else
  overrides=(--model.init_args.lr_warmup_steps "$warmup" --model.init_args.init_seed "$seed")
fi
start=$(date +%s)
nice -n 10 lightning-sae fit --config configs/minilm/$config.yaml "${overrides[@]}" \
  --trainer.default_root_dir "$run" --seed_everything "$seed" > /tmp/minilm-cfg/results/$name.log 2>&1
final=$(find "$run" -name final_metrics.txt | sort | tail -1)
{ cat "$final"; echo "seconds $(( $(date +%s) - start ))"; } > /tmp/minilm-cfg/results/$name.txt
