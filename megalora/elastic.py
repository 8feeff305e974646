"""torchrun with a clean exit on preemption: ``python -m megalora.elastic <torchrun args>``.

    python -m megalora.elastic --standalone --nproc_per_node=2 \\
        -m megalora train --config umm_tiny

The arguments go to torchrun (``torch.distributed.run``) unchanged. torchrun answers SIGTERM or
SIGINT by passing the signal to its workers and waiting for them (30 s), then dies with a
``SignalException`` traceback and exit code 1, even when every worker finished its step and
saved a checkpoint. On such a signal this wrapper exits instead

* 0, printing ``megalora: preempted; checkpoint at step N saved; rerun to resume``, when the
  workers reported a saved checkpoint;
* 128 + the signal number (what a shell reports for a process the signal ended), printing one
  line, when they did not;

without a traceback. Every other outcome is torchrun's own: a worker failure still prints
torchrun's failure summary, with the worker's message, and exits non-zero.

Contract with the trainer (``megalora.umm.train``): the wrapper sets ``MEGALORA_PREEMPT_FILE``
to a fresh temporary file path (unless it is already set), which the workers inherit. After a
preemption checkpoint has been written by all ranks, each node's local rank 0 writes the step
number as text (``"40\\n"``) to that path. The wrapper reads the file once torchrun has shut its
workers down, and removes it. Under a multi-node torchrun each node's wrapper has its own path
and its own report, so every node exits 0.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile

from torch.distributed.elastic.multiprocessing.api import SignalException

PREEMPT_FILE_ENV = "MEGALORA_PREEMPT_FILE"


def _torchrun(argv: list[str]) -> None:
    """torchrun's entry point (tests replace this function)."""
    from torch.distributed.run import main as torchrun_main

    torchrun_main(argv)


def _raise_signal(signum, frame):
    # torchrun installs the same kind of handler only once it starts the workers; a signal
    # during argument parsing or the rendezvous would otherwise end this process outright
    # (SIGTERM) or with a KeyboardInterrupt traceback (SIGINT), leaving the report file behind.
    raise SignalException(f"Process {os.getpid()} got signal: {signal.Signals(signum)}",
                          sigval=signal.Signals(signum))


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _report_path(env) -> tuple[str, bool]:
    """The (empty) file the trainer reports a preemption checkpoint to, and whether it was
    created here (else its path was inherited)."""
    path = env.get(PREEMPT_FILE_ENV)
    if path:
        open(path, "w").close()  # an earlier run's report must not be taken for this run's
        return path, False
    fd, path = tempfile.mkstemp(prefix="megalora-preempt-", suffix=".step")
    os.close(fd)  # empty until rank 0 writes the step
    env[PREEMPT_FILE_ENV] = path
    return path, True


def _reported_step(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def main(argv: list[str] | None = None) -> int:
    """Runs torchrun with ``argv``; returns the exit code for a signal or a success, and lets
    torchrun's own errors (argument errors, worker failures) propagate as they would."""
    argv = sys.argv[1:] if argv is None else list(argv)
    path, created = _report_path(os.environ)
    previous = {s: signal.signal(s, _raise_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    signum = None
    try:
        _torchrun(argv)
    except SignalException as e:
        signum = int(e.sigval)
    finally:
        # torchrun leaves its raising handlers installed: a late signal would print a traceback
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        step = _reported_step(path)
        _remove(path)
        if created:
            os.environ.pop(PREEMPT_FILE_ENV, None)
    # A report also counts when the workers stopped before the agent saw the signal.
    if step is not None:
        print(f"megalora: preempted; checkpoint at step {step} saved; rerun to resume",
              flush=True)
        return 0
    if signum is not None:
        name = signal.Signals(signum).name
        print(f"megalora: stopped by {name}; no checkpoint was reported saved on this node "
              "(its first process reports it); a rerun resumes from out_dir's latest checkpoint, "
              "if any", file=sys.stderr, flush=True)
        return 128 + signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
