#!/bin/bash
# fit.sh CONFIG SEED [OPTIONS...]: configs/CONFIG.yaml as a user runs it, with only the run folder,
# seed_everything and the weights' init_seed given (and OPTIONS); keeps the command's
# final-metrics table as $WORK/results/NAME.txt (NAME: the config with / as _, then _$TAG when
# set, then _sSEED). The recipe before this change: TAG=unit FILE=<the config as it was, with
# DecoderNormConstraint> (git show 76596e4:configs/CONFIG.yaml).
set -e
config=$1 seed=$2 tag=${TAG:-}
shift 2
name=${config//\//_}${tag:+_$tag}_s${seed}
work=${WORK:-/tmp/free-rows}
run=$work/runs/$name
mkdir -p "$work/results"
[ -e "$work/results/$name.txt" ] && exit 0
rm -rf "$run"
start=$(date +%s)
nice -n 10 lightning-sae fit --config "${FILE:-configs/$config.yaml}" "$@" \
  --trainer.default_root_dir "$run" --seed_everything "$seed" \
  --model.init_args.init_seed "$seed" > "$work/results/$name.log" 2>&1
{ cat "$run/final_metrics.txt"; echo "seconds $(( $(date +%s) - start ))"; } > "$work/results/$name.txt"
