# Shared by launch/{torchrun,sbatch,srun,mpirun}.sh (sourced, not run).
#
# Arguments of every script:  CONFIG [section.field=value ...] [--dry-run]
#   CONFIG     a run config path, or a name under launch/configs (umm_tiny, emu2_37b, ...)
#   --dry-run  print the command and the resolved layout (megalora layout), start nothing
#
# Environment (default in brackets; export your own to change it):
#   PYTHON            interpreter with megalora installed [python]
#   GPUS_PER_NODE     processes per node [the GPUs nvidia-smi lists, else 2 for CPU runs]
#   OMP_NUM_THREADS   CPU threads per process [cores / GPUS_PER_NODE, at least 1]
#   TORCH_NCCL_ASYNC_ERROR_HANDLING [1]: a failed collective ends the job instead of hanging
#   NCCL_DEBUG        [WARN]; set INFO to see the network NCCL picked
#   NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...: not set here (site specific); exported ones pass on

megalora_usage() {
    echo "usage: $(basename "$0") CONFIG [section.field=value ...] [--dry-run]"
    echo "       (CONFIG: a path or a name under launch/configs, e.g. umm_tiny)"
}

megalora_parse_args() {
    DRY_RUN=0
    CONFIG=""
    OVERRIDES=()
    for arg in "$@"; do
        case "$arg" in
            --dry-run) DRY_RUN=1 ;;
            -h|--help) megalora_usage; exit 0 ;;
            -*) echo "$(basename "$0"): unknown option $arg" >&2; megalora_usage >&2; exit 2 ;;
            *) if [ -z "$CONFIG" ]; then CONFIG=$arg; else OVERRIDES+=("$arg"); fi ;;
        esac
    done
    if [ -z "$CONFIG" ]; then megalora_usage >&2; exit 2; fi
}

megalora_gpus() {
    local n=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    echo "${n:-0}"
}

megalora_defaults() {
    PYTHON=${PYTHON:-python}
    local gpus
    gpus=$(megalora_gpus)
    if [ "$gpus" -gt 0 ]; then GPUS_PER_NODE=${GPUS_PER_NODE:-$gpus}; fi
    GPUS_PER_NODE=${GPUS_PER_NODE:-2}
    local cores
    cores=$(nproc 2>/dev/null || echo 1)
    local threads=$(( cores / GPUS_PER_NODE ))
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    export PYTHONUNBUFFERED=1  # log lines reach SLURM's output file as they happen
}

# megalora_layout LAUNCHER NODES PROCS_PER_NODE: print the layout; fails on an impossible one
megalora_layout() {
    "$PYTHON" -m megalora layout --config "$CONFIG" --nodes "$2" --procs-per-node "$3" \
        --launcher "$1" "${OVERRIDES[@]}"
}

# megalora_run LAUNCHER NODES PROCS_PER_NODE COMMAND...: dry run, or check then run
megalora_run() {
    local launcher=$1 nodes=$2 ppn=$3
    shift 3
    echo "megalora: $launcher: $*"
    megalora_layout "$launcher" "$nodes" "$ppn" || exit 2
    if [ "$DRY_RUN" = 1 ]; then
        echo "megalora: dry run, nothing started"
        exit 0
    fi
    "$@"
}
