#!/usr/bin/env bash
# CI, second step: the prompt-sharing equality tests and a 2-step GRPO fit on the oldest transformers
# pyproject.toml allows (the GPU machines' 5.17), in an environment of its own (.venv-floor, kept
# between runs; pip reuses its cached wheels). Run from anywhere: bash .ci/floor.sh
set -euo pipefail
cd "$(dirname "$0")/.."
FLOOR_TRANSFORMERS=5.17.0
VENV=${FLOOR_VENV:-.venv-floor}
if ! "$VENV/bin/python" -c "import transformers, pathvlm_lightning, sys; sys.exit(transformers.__version__ != '$FLOOR_TRANSFORMERS')" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0 "transformers==$FLOOR_TRANSFORMERS" -e ".[test]"
fi
"$VENV/bin/python" -c "import torch, transformers; print(f'floor: torch {torch.__version__}, transformers {transformers.__version__}')"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's code and tests, whatever the venv points at
# Shared vs copies (one process and FSDP2 on 2 processes), every fallback's warning, and a 2-step demo
# GRPO fit through the CLI that logs its sharing mode (tests/test_sharing_fallbacks.py).
"$VENV/bin/python" -m pytest -q tests/test_prefix_group.py tests/test_sharing_fallbacks.py \
  "tests/test_backbone.py::test_shared_prompts_give_the_same_logprobs_and_gradients" \
  "tests/test_families.py::test_shared_prompts_give_the_same_logprobs_and_gradients"
