#!/bin/bash
# fit.sh CONFIG SEED [OPTIONS...]: configs/CONFIG.yaml as a user runs it, with only the run folder,
# seed_everything and the weights' init_seed given (and OPTIONS); keeps the command's
# final-metrics table as $WORK/results/NAME.txt (NAME: the config with / as _, then _$TAG when
# set, then _sSEED). The recipe before this change: TAG=unit FILE=<the config as it was, with
# DecoderNormConstraint> (git show 76596e4:configs/CONFIG.yaml). A group config (SAEGroup) gets
# its members list again with init_seed SEED in each member (from FILE when given).
set -e
config=$1 seed=$2 tag=${TAG:-}
shift 2
name=${config//\//_}${tag:+_$tag}_s${seed}
work=${WORK:-/tmp/free-rows}
run=$work/runs/$name
mkdir -p "$work/results"
[ -e "$work/results/$name.txt" ] && exit 0
rm -rf "$run"
file=${FILE:-configs/$config.yaml}
mkdir -p "$run"
if grep -q 'lightning_sae.models.group.SAEGroup' "$file"; then
  python - "$file" "$seed" > "$run/members.yaml" <<'PY'
import sys
import yaml
path, seed = sys.argv[1], int(sys.argv[2])
members = yaml.safe_load(open(path))["model"]["init_args"]["members"]
for member in members:
    member.setdefault("init_args", {})["init_seed"] = seed
print(yaml.safe_dump({"model": {"init_args": {"members": members}}}, sort_keys=False))
PY
  seeds=(--config "$run/members.yaml")
else
  seeds=(--model.init_args.init_seed "$seed")
fi
start=$(date +%s)
nice -n 10 lightning-sae fit --config "$file" "$@" "${seeds[@]}" \
  --trainer.default_root_dir "$run" --seed_everything "$seed" > "$work/results/$name.log" 2>&1
{ cat "$run/final_metrics.txt"; echo "seconds $(( $(date +%s) - start ))"; } > "$work/results/$name.txt"
