"""``python -m nemo_bard.torchrun [torchrun options] -m nemo_bard.cli RESOLVED.yaml``: torchrun's elastic agent
with nemo-bard's exit codes, for launchers that start one agent per node (examples/slurm/*.sbatch).

A SIGTERM / SIGINT that reaches the agent (SLURM signals every process of a job step) is handed on to the
workers, which save a checkpoint at the next step; the agent then exits 128 + the signal number instead of
torchrun's traceback and exit 1. A failed worker is summed up in one line (see ``nemo_bard.cli``)."""

from __future__ import annotations

import sys

from nemo_bard.cli import run_torchrun


def main(argv: list[str] | None = None) -> int:
    """Run torchrun's agent on ``argv`` (torchrun's own options); its exit code."""
    return run_torchrun(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
