#!/usr/bin/env bash
# The pre-registered process-reward experiment (experiments/process_reward.md), one seed per call:
#   bash experiments/process_reward_run.sh 0     # then 1, then 2
#   python experiments/process_reward_analysis.py runs/experiment --seeds 0 1 2
# Per seed s, under runs/experiment/s<s>/: SFT (sft/, also Alpha's val and test predictions); the Beta and R1
# GRPO arms from that SFT model (beta/, r1/), each kept at its best val-accuracy checkpoint
# (checkpoints/best.ckpt), then tested once on the test split with the counterfactual variants.
# A stage whose output already exists is skipped, so a stopped run resumes by calling it again.
set -euo pipefail
seed=${1:?usage: process_reward_run.sh SEED}
root=${ROOT:-runs/experiment}/s$seed
steps=${STEPS:-100}   # the pre-registered step budget
every=${EVERY:-25}    # validation interval (steps)
cli="python -m pathvlm_lightning"
seeded=(--seed_everything "$seed" --model.init_args.backbone.init_args.seed "$seed" --trainer.enable_progress_bar=false)
cf=(--data.init_args.counterfactuals=[blank,swapped,no_image,shuffled])

if [ ! -f "$root/sft/export/config.json" ]; then
  $cli fit --config configs/experiment/sft.yaml --run_dir "$root/sft" "${seeded[@]}"
fi
# `test --ckpt_path` takes the module's settings from the checkpoint, so Alpha's predictions land in
# the SFT run's own folder ($root/sft/predictions_test*.jsonl); the val ones are renamed.
if [ ! -f "$root/sft/predictions_val.jsonl" ]; then  # the item-3 measurement: per-type accuracy on val
  $cli test --config configs/experiment/sft.yaml --run_dir "$root/sft" --ckpt_path "$root/sft/checkpoints/last.ckpt" \
    --data.init_args.test_split val --trainer.enable_progress_bar=false
  mv "$root/sft/predictions_test.jsonl" "$root/sft/predictions_val.jsonl"
fi
if [ ! -f "$root/sft/predictions_test.jsonl" ]; then
  $cli test --config configs/experiment/sft.yaml --run_dir "$root/sft" --ckpt_path "$root/sft/checkpoints/last.ckpt" \
    "${cf[@]}" --trainer.enable_progress_bar=false
fi
for arm in beta r1; do
  config=configs/experiment/grpo.yaml
  [ "$arm" = r1 ] && config=configs/experiment/grpo_truth.yaml
  grpo=(--config "$config" --run_dir "$root/$arm" --model.init_args.backbone.init_args.model "$root/sft/export"
        --seed_everything "$seed" --trainer.enable_progress_bar=false)
  if [ ! -f "$root/$arm/checkpoints/best.ckpt" ]; then
    $cli fit "${grpo[@]}" --trainer.max_steps "$steps" --trainer.val_check_interval "$every"
  fi
  if [ ! -f "$root/$arm/predictions_test.jsonl" ]; then
    $cli test "${grpo[@]}" --ckpt_path "$root/$arm/checkpoints/best.ckpt" "${cf[@]}"
  fi
done
