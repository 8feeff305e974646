# Shared by launch/{torchrun,sbatch,srun,mpirun}.sh (sourced, not run).
#
# Arguments of every script:  CONFIG [section.field=value ...] [--dry-run]
#   CONFIG     a run config path, or a name under launch/configs (umm_tiny, emu2_37b, ...)
#   --dry-run  print the command and the resolved layout (megalora layout), start nothing
#
# Environment (default in brackets; export your own to change it):
#   PYTHON            interpreter with megalora and torch installed [when no venv or conda env
#                     is active: this repository's .venv/bin/python if it exists; else python
#                     (python3 when there is no python)]. Checked before anything starts.
#   GPUS_PER_NODE     processes per node [the GPUs nvidia-smi lists, else 2 for CPU runs]
#   OMP_NUM_THREADS   CPU threads per process [cores / GPUS_PER_NODE, at least 1]
#   TORCH_NCCL_ASYNC_ERROR_HANDLING [1]: a failed collective ends the job instead of hanging
#   NCCL_DEBUG        [WARN]; set INFO to see the network NCCL picked
#   NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...: not set here (site specific); exported ones pass on
# and per script: NPROC (torchrun.sh); NODES, RDZV_PORT, MAX_REQUEUES (sbatch.sh); NODES,
# MASTER_PORT (srun.sh); NP, NODES (mpirun.sh). Every number a script reads is checked before
# anything starts (megalora_check_number): a bad one stops it with exit code 2, naming the
# variable, its value and what to set.

MEGALORA_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

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

# megalora_number_rule NAME: sets MIN, MAX and HINT (what to do) for a numeric variable
megalora_number_rule() {
    MIN=1 MAX=999999999 HINT="set $1 to"
    case "$1" in
        GPUS_PER_NODE) HINT+=" the processes per node (e.g. GPUS_PER_NODE=8), or unset it"
            HINT+=" for the GPUs nvidia-smi lists (2 processes without GPUs)" ;;
        NPROC) HINT+=" the number of processes (e.g. NPROC=2), or unset it for GPUS_PER_NODE" ;;
        NP) HINT+=" the total number of MPI processes (e.g. NP=16), or unset it for"
            HINT+=" GPUS_PER_NODE x NODES" ;;
        NODES) HINT+=" the number of nodes (e.g. NODES=2), or unset it (1, or SLURM_NNODES"
            HINT+=" for srun.sh and sbatch.sh)" ;;
        OMP_NUM_THREADS) HINT+=" the CPU threads per process (e.g. OMP_NUM_THREADS=4), or"
            HINT+=" unset it for cores / processes" ;;
        RDZV_PORT|MASTER_PORT) MAX=65535
            HINT+=" a free TCP port on the first node (e.g. $1=29500), or unset it for"
            HINT+=" 20000 + job id % 20000" ;;
        MAX_REQUEUES) MIN=0
            HINT+=" how often a preempted job may requeue itself (e.g. MAX_REQUEUES=20; 0:"
            HINT+=" never), or unset it for 20" ;;
        SLURM_*) HINT="SLURM sets $1 inside a job: unset it outside one"
            case "$1" in SLURM_JOB_ID|SLURM_RESTART_COUNT) MIN=0 ;; esac ;;
        *) HINT+=" a whole number" ;;
    esac
}

# megalora_check_number NAME [VALUE]: exit 2 unless VALUE [$NAME] is empty (the default is
# used) or a whole number in NAME's range. Checked before any shell arithmetic, which would
# otherwise fail with "division by 0" or "abc: unbound variable".
megalora_check_number() {
    local name=$1 value=${2-${!1:-}} MIN MAX HINT
    if [ -z "$value" ]; then return 0; fi
    megalora_number_rule "$name"
    if [[ ! $value =~ ^[0-9]{1,9}$ ]] || (( 10#$value < MIN || 10#$value > MAX )); then
        local range="a whole number from $MIN to $MAX"
        if [ "$MAX" = 999999999 ]; then range="a whole number >= $MIN (9 digits at most)"; fi
        echo "$(basename "$0"): $name='$value' is not $range; $HINT" >&2
        exit 2
    fi
    # bash arithmetic would read 08 as a bad octal number
    if [ $# -eq 1 ]; then printf -v "$name" '%d' "$(( 10#$value ))"; fi
}

# megalora_check_python: picks PYTHON (see the header) and exits 2 with what to set unless it
# can import torch and megalora; the launchers would otherwise fail once per process with a
# bare ModuleNotFoundError.
megalora_check_python() {
    local how="PYTHON=${PYTHON:-}"
    if [ -z "${PYTHON:-}" ]; then
        if [ -z "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] && [ -x "$MEGALORA_REPO/.venv/bin/python" ]
        then PYTHON=$MEGALORA_REPO/.venv/bin/python
        elif command -v python >/dev/null 2>&1; then PYTHON=python
        else PYTHON=python3
        fi
        how="PYTHON unset, so $PYTHON"
    fi
    local fix="set PYTHON=/path/to/.venv/bin/python (an environment with megalora's"
    fix+=" requirements and megalora installed), or activate that environment"
    if [ -x "$MEGALORA_REPO/.venv/bin/python" ] \
            && [ "$PYTHON" != "$MEGALORA_REPO/.venv/bin/python" ]; then
        fix="set PYTHON=$MEGALORA_REPO/.venv/bin/python, or activate that venv"
        fix+=" (source $MEGALORA_REPO/.venv/bin/activate)"
    fi
    local where missing
    if ! where=$(command -v "$PYTHON" 2>/dev/null); then
        echo "$(basename "$0"): no interpreter $PYTHON ($how): $fix" >&2
        exit 2
    fi
    # find_spec, not import: a few milliseconds instead of torch's seconds
    if ! missing=$("$PYTHON" -c 'import importlib.util as u
print(" and ".join(m for m in ("torch", "megalora") if u.find_spec(m) is None))' 2>/dev/null)
    then
        echo "$(basename "$0"): $where ($how) does not run Python: $fix" >&2
        exit 2
    fi
    if [ -n "$missing" ]; then
        echo "$(basename "$0"): $where ($how) cannot import $missing: $fix" >&2
        exit 2
    fi
}

# megalora_defaults [NAME ...]: checks GPUS_PER_NODE, OMP_NUM_THREADS and the script's own
# numeric variables NAME..., then PYTHON, and sets the defaults
megalora_defaults() {
    local name
    for name in GPUS_PER_NODE OMP_NUM_THREADS "$@"; do megalora_check_number "$name"; done
    megalora_check_python
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
    # exec: a signal sent to this script (kill, a job runner's timeout) reaches the launcher,
    # which passes it to the processes, instead of killing the shell and leaving them running
    exec "$@"
}
