#!/usr/bin/env bash
# SLURM, one task per GPU (srun starts every process; megalora.distributed reads SLURM_*).
# Inside an allocation (salloc, or an sbatch script) or from a login node:
#
#   NODES=2 GPUS_PER_NODE=8 SRUN_ARGS="--gpus-per-node=8 --partition=gpu" \
#       launch/srun.sh emu2_37b
#   launch/srun.sh umm_tiny --dry-run
#
# NODES [SLURM_NNODES or 1]; SRUN_ARGS: extra srun flags (partition, account, GPU binding).
# The rendezvous is the step's first node, port MASTER_PORT [20000 + job id % 20000].
set -euo pipefail
source "$(dirname "$0")/common.sh"
megalora_parse_args "$@"
megalora_defaults NODES SLURM_NNODES MASTER_PORT
NODES=${NODES:-${SLURM_NNODES:-1}}
# shellcheck disable=SC2086  # SRUN_ARGS is a list of flags
megalora_run srun "$NODES" "$GPUS_PER_NODE" \
    srun --nodes="$NODES" --ntasks-per-node="$GPUS_PER_NODE" --kill-on-bad-exit=1 ${SRUN_ARGS:-} \
    "$PYTHON" -m megalora train --config "$CONFIG" "${OVERRIDES[@]}"
