#!/usr/bin/env bash
# MPI: mpiexec/mpirun starts the processes; megalora.distributed reads the MPI rank variables
# and broadcasts rank 0's address with mpi4py (pip install mpi4py mpich, or your site's MPI).
#
#   NP=2 launch/mpirun.sh umm_tiny
#   NP=16 NODES=2 MPI_ARGS="-f hosts -ppn 8" launch/mpirun.sh emu2_37b     # MPICH
#   NP=16 NODES=2 MPI_ARGS="--hostfile hosts -x PATH" launch/mpirun.sh emu2_37b  # Open MPI
#
# NP [GPUS_PER_NODE x NODES]; NODES [1] (for the layout check); MPIEXEC [mpiexec];
# MPI_ARGS: extra launcher flags (host file, processes per node, environment export).
set -euo pipefail
source "$(dirname "$0")/common.sh"
megalora_parse_args "$@"
megalora_defaults NODES NP
NODES=${NODES:-1}
NP=${NP:-$(( GPUS_PER_NODE * NODES ))}
if [ $(( NP % NODES )) -ne 0 ]; then
    echo "mpirun.sh: NP=$NP processes do not split evenly over NODES=$NODES" >&2
    exit 2
fi
# shellcheck disable=SC2086  # MPI_ARGS is a list of flags
megalora_run mpirun "$NODES" $(( NP / NODES )) \
    "${MPIEXEC:-mpiexec}" -n "$NP" ${MPI_ARGS:-} \
    "$PYTHON" -m megalora train --config "$CONFIG" "${OVERRIDES[@]}"
