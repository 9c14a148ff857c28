#!/usr/bin/env bash
# The main job: set up, pretrain MoCo v3 (ResNet) on Fashion-MNIST, report test kNN, plot the curves.
# Extra arguments are passed to `moco pretrain` (e.g. a config name or key=value overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# No config named (nothing, or only key=value overrides and --flags): the demo preset.
config=""
previous=""
for arg in "$@"; do
  # --resume may take a checkpoint path: that word is not a config name.
  if [[ "$arg" != -* && "$arg" != *=* && "$previous" != "--resume" ]]; then config="$arg"; break; fi
  previous="$arg"
done
if [ -z "$config" ]; then set -- fmnist_v3 "$@"; fi
exec .venv/bin/moco pretrain "$@"
