#!/usr/bin/env bash
#SBATCH --job-name=megalora
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --signal=B:TERM@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=megalora-%j.out
#
# Multi-node training under sbatch. Submit from the repository root (or set MEGALORA_HOME):
#
#   sbatch --nodes=4 --gpus-per-node=8 --time=24:00:00 launch/sbatch.sh emu2_37b
#   LAUNCH_MODE=srun sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 \
#       launch/sbatch.sh emu2_37b train.steps=5000
#   bash launch/sbatch.sh emu2_37b --dry-run       # on a login node: the layout only
#
# LAUNCH_MODE=torchrun [default]: one srun task per node runs torchrun with GPUS_PER_NODE
#   processes and a c10d rendezvous on the first node (port RDZV_PORT [20000 + job id % 20000]).
# LAUNCH_MODE=srun: srun starts one task per GPU (launch/srun.sh); submit with
#   --ntasks-per-node=GPUS_PER_NODE.
#
# Preemption and time limits: SLURM sends SIGTERM to this script 120 s before the limit
# (--signal=B:TERM@120; make it longer than a step plus a checkpoint). The script forwards it
# to the training step, every rank finishes its step, checkpoints and exits, and the job is
# requeued (--requeue) at most MAX_REQUEUES [20] times; the requeued job resumes from
# out_dir's latest checkpoint (train.resume, on by default). In torchrun mode the workers have
# torchrun's 30 s after the forwarded SIGTERM; use LAUNCH_MODE=srun when a step takes longer.
# torchrun runs through megalora.elastic (exit 0 and one line when a checkpoint was saved, no
# SignalException traceback). Numbers read here (NODES, RDZV_PORT, MAX_REQUEUES, ...) are
# checked first (launch/common.sh).
set -uo pipefail
HERE=${MEGALORA_HOME:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}
if [ ! -f "$HERE/launch/common.sh" ]; then
    echo "sbatch.sh: $HERE/launch/common.sh not found: submit from the megalora repository" \
         "root or set MEGALORA_HOME" >&2
    exit 2
fi
cd "$HERE" || exit 2
source "$HERE/launch/common.sh"
megalora_parse_args "$@"
megalora_defaults NODES RDZV_PORT MAX_REQUEUES SLURM_NNODES SLURM_JOB_ID \
    SLURM_RESTART_COUNT
MODE=${LAUNCH_MODE:-torchrun}
NODES=${SLURM_NNODES:-${NODES:-1}}
JOB=${SLURM_JOB_ID:-0}
echo "megalora: job $JOB on ${SLURM_JOB_NODELIST:-(no allocation)}," \
     "restart ${SLURM_RESTART_COUNT:-0}, $(date -Is)"

HEAD=$( (scontrol show hostnames "${SLURM_JOB_NODELIST:-}" 2>/dev/null || true) | head -n 1)
HEAD=${HEAD:-$(hostname)}
case "$MODE" in
    torchrun)
        PORT=${RDZV_PORT:-$(( 20000 + JOB % 20000 ))}
        PPN=$GPUS_PER_NODE
        CMD=(srun --nodes="$NODES" --ntasks-per-node=1 --kill-on-bad-exit=1
             "$PYTHON" -m megalora.elastic --nnodes="$NODES" --nproc_per_node="$PPN"
             --rdzv_backend=c10d --rdzv_endpoint="$HEAD:$PORT" --rdzv_id="megalora-$JOB"
             -m megalora train --config "$CONFIG" "${OVERRIDES[@]}") ;;
    srun)
        PPN=${SLURM_NTASKS_PER_NODE:-$GPUS_PER_NODE}
        PPN=${PPN%%(*}  # "8(x4)" -> 8
        megalora_check_number SLURM_NTASKS_PER_NODE "$PPN"
        CMD=(srun --nodes="$NODES" --ntasks-per-node="$PPN" --kill-on-bad-exit=1
             "$PYTHON" -m megalora train --config "$CONFIG" "${OVERRIDES[@]}") ;;
    *)
        echo "sbatch.sh: LAUNCH_MODE must be torchrun or srun, got $MODE" >&2
        exit 2 ;;
esac

echo "megalora: $MODE: ${CMD[*]}"
megalora_layout "sbatch/$MODE" "$NODES" "$PPN" || exit 2
if [ "$DRY_RUN" = 1 ]; then
    echo "megalora: dry run, nothing submitted or started"
    exit 0
fi

# Every node must resolve the first one (torchrun's rendezvous, srun mode's master address):
# checked once here, so an unresolvable name stops the job with one line instead of every
# rank retrying a connection until its timeout.
if [ -n "${SLURM_JOB_ID:-}" ]; then
    UNRESOLVED=$(timeout 120 srun --nodes="$NODES" --ntasks="$NODES" --ntasks-per-node=1 \
        --kill-on-bad-exit=0 sh -c 'getent hosts "$1" >/dev/null || hostname' sh "$HEAD")
    if [ -n "$UNRESOLVED" ]; then
        echo "sbatch.sh: the first node $HEAD does not resolve on:" $UNRESOLVED "(getent hosts" \
             "$HEAD failed there); the rendezvous needs it: fix name resolution (DNS or" \
             "/etc/hosts) on those nodes, or exclude them (sbatch --exclude)" >&2
        exit 2
    fi
fi

PREEMPTED=0
forward_term() {
    PREEMPTED=1
    echo "megalora: SIGTERM (time limit or preemption) at $(date -Is): checkpointing"
    # to the tasks, not to srun: srun itself would answer SIGTERM by killing the step
    if [ -n "${SLURM_JOB_ID:-}" ]; then
        scancel --signal=TERM "$SLURM_JOB_ID"  # every step of this job, not this shell
    else
        kill -TERM "$STEP" 2>/dev/null
    fi
}
trap forward_term TERM
"${CMD[@]}" &
STEP=$!
wait "$STEP"
RC=$?
while kill -0 "$STEP" 2>/dev/null; do  # the trap interrupted wait: let the step save and exit
    wait "$STEP"
    RC=$?
done
if [ "$PREEMPTED" = 1 ]; then
    if [ "${SLURM_RESTART_COUNT:-0}" -lt "${MAX_REQUEUES:-20}" ]; then
        echo "megalora: requeueing job $JOB (resumes from the latest checkpoint)"
        scontrol requeue "$JOB"
    else
        echo "megalora: not requeued: already restarted ${SLURM_RESTART_COUNT} times"
    fi
    exit 0
fi
echo "megalora: training step exited with $RC at $(date -Is)"
exit "$RC"
