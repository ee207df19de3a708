#!/usr/bin/env bash
# The main job on the embedded default, end to end on CPU:
#   1. SFT ("Alpha") on the built-in synthetic tissue set, exported to runs/demo/sft/export (skipped if present);
#   2. GRPO with format + accuracy rewards ("Beta") from that export (skipped if present);
#   3. greedy test of the GRPO model on the held-out split.
# Watch it: tensorboard --logdir runs/demo
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f runs/demo/sft/export/config.json ]; then
  python -m pathvlm_lightning fit --config configs/demo/sft.yaml
fi
if [ ! -f runs/demo/grpo/export/config.json ]; then  # a finished export is never overwritten silently
  python -m pathvlm_lightning fit --config configs/demo/grpo.yaml
fi
python -m pathvlm_lightning test --config configs/demo/grpo.yaml \
  --model.init_args.backbone.init_args.model runs/demo/grpo/export
