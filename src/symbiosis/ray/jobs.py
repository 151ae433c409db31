"""``symbiosis finetune`` as a Ray task: the same command, run on a node with the resources it asks for.

The task runs ``symbiosis finetune`` with the given arguments in a Ray worker (its executor is
typically ``--executor symbiosis+ray://NAME``, resolved from inside the cluster) and returns the
exit code and what the command printed. Ray retries the task if its node dies; a retry continues
the job from its newest checkpoint (``--resume``) when the output directory is on storage the new
node sees (a shared file system), else it starts over there.
"""

from __future__ import annotations

import contextlib
import io
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..transport.ray_directory import init_ray

#: The file a task leaves in the job's output directory so that a retry knows it is one.
ATTEMPT_MARKER = ".ray-task-{run}"


@dataclass(frozen=True)
class TaskResult:
    """The command's exit code and its standard output and error."""

    returncode: int
    stdout: str
    stderr: str


def finetune(
    argv: Sequence[str],
    *,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    memory: int | None = None,
    max_retries: int = 3,
    address: str | None = None,
) -> TaskResult:
    """Run ``symbiosis finetune *argv`` as a Ray task with these resources and wait for it."""
    init_ray(address)
    import ray

    task = ray.remote(_finetune_task).options(num_cpus=num_cpus, num_gpus=num_gpus, memory=memory, max_retries=max_retries)
    return ray.get(task.remote(list(argv), uuid.uuid4().hex))


def _finetune_task(argv: list[str], run: str) -> TaskResult:
    from ..cli.main import build_parser

    args = build_parser().parse_args(["finetune", *argv])
    marker = args.output / ATTEMPT_MARKER.format(run=run)
    if marker.exists():  # Ray retried this task: continue from the checkpoint the last attempt wrote
        args.resume = True
    Path(args.output).mkdir(parents=True, exist_ok=True)
    marker.touch()
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = int(args.func(args) or 0)
    finally:
        marker.unlink(missing_ok=True)
    return TaskResult(code, out.getvalue(), err.getvalue())
