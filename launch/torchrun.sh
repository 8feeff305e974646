#!/usr/bin/env bash
# One node, any number of processes: torchrun (a free port on localhost, no SLURM needed).
#
#   launch/torchrun.sh umm_tiny                          # 2 CPU processes (TP=2 + SP)
#   GPUS_PER_NODE=8 launch/torchrun.sh emu2_37b train.steps=1000
#   launch/torchrun.sh emu2_37b --dry-run                # the layout, nothing started
#
# NPROC overrides GPUS_PER_NODE; see launch/common.sh for the other variables. torchrun runs
# through megalora.elastic: on SIGTERM/SIGINT it exits 0 once the workers saved a checkpoint
# ("megalora: preempted; checkpoint at step N saved; rerun to resume"), else 128 + the signal.
set -euo pipefail
source "$(dirname "$0")/common.sh"
megalora_parse_args "$@"
megalora_defaults NPROC
NPROC=${NPROC:-$GPUS_PER_NODE}
megalora_run torchrun 1 "$NPROC" \
    "$PYTHON" -m megalora.elastic --standalone --nproc_per_node="$NPROC" \
    -m megalora train --config "$CONFIG" "${OVERRIDES[@]}"
