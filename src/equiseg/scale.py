"""Where independent jobs run (a study's trainings, a search's trials): here, one after another,
or as tasks on a Ray cluster.

Ray (``pip install 'equiseg[scale]'``: ``ray[tune]`` and ``optuna``) places each job on the CPUs
and GPUs it asks for, on this machine or across the nodes of a cluster (``ray start --head`` on
one, ``ray start --address HEAD:6379`` on the others, then ``--address auto``). Jobs write into
run folders, so the nodes must share the output folder (or run on one machine). Every node
needs the same equiseg and torch installed.

Each job is a plain function and its arguments (picklable); the results come back in the order
of the jobs, whatever order they finish in. Numbers do not depend on the executor: a job seeds
everything it draws; on the CPU the float sums depend on torch's thread count, which Ray sets
to the job's ``cpus_per_run`` (OMP_NUM_THREADS), so the same count as a local run gives the
same bits.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

SCALE_EXTRA = "pip install 'equiseg[scale]'"

Done = Callable[[int, Any], None]
"""Called with (the job's index, its result) as each job finishes."""


class ExecutorKind(enum.Enum):
    """Where jobs run (``--executor``)."""

    LOCAL = "local"
    RAY = "ray"


def require(module: str):
    """Import an optional dependency of the ``scale`` extra, or say how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ModuleNotFoundError(f"{module} is not installed: {SCALE_EXTRA}") from None


@dataclass(frozen=True)
class LocalExecutor:
    """Jobs one after another in this process."""

    def map(self, fn: Callable, jobs: Sequence[tuple], on_done: Done | None = None) -> list:
        results = []
        for k, job in enumerate(jobs):
            results.append(fn(*job))
            if on_done is not None:
                on_done(k, results[-1])
        return results


@dataclass(frozen=True)
class RayExecutor:
    """Jobs as Ray tasks, each asking for ``cpus_per_run`` CPUs and ``gpus_per_run`` GPUs
    (fractions share a GPU).

    ``address``: a running cluster ("auto", or "HOST:PORT"); None starts a local one with
    ``num_cpus`` CPUs (None: all) for this process, stopped again when the jobs are done.
    """

    address: str | None = None
    cpus_per_run: float = 1.0
    gpus_per_run: float = 0.0
    num_cpus: int | None = None

    def __post_init__(self) -> None:
        if not self.cpus_per_run > 0 or self.gpus_per_run < 0:
            raise ValueError(f"a run needs CPUs > 0 and GPUs >= 0, got {self.cpus_per_run} and {self.gpus_per_run}")

    @contextlib.contextmanager
    def cluster(self) -> Iterator[Any]:
        """The ``ray`` module, connected for the block: to the Ray this process already runs, to
        ``address``, or to a local cluster started here and stopped after the block.
        """
        ray = require("ray")
        started = not ray.is_initialized()
        if started:
            ray.init(address=self.address, num_cpus=self.num_cpus if self.address is None else None,
                     include_dashboard=False, configure_logging=False, log_to_driver=True)
        try:
            yield ray
        finally:
            if started:
                ray.shutdown()

    def map(self, fn: Callable, jobs: Sequence[tuple], on_done: Done | None = None) -> list:
        if not jobs:
            return []
        with self.cluster() as ray:
            remote = ray.remote(fn).options(num_cpus=self.cpus_per_run, num_gpus=self.gpus_per_run,
                                            max_retries=0)
            refs = [remote.remote(*job) for job in jobs]
            index = {ref: k for k, ref in enumerate(refs)}
            results: list = [None] * len(refs)
            pending = list(refs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                k = index[done[0]]
                results[k] = ray.get(done[0])
                if on_done is not None:
                    on_done(k, results[k])
            return results


Executor = LocalExecutor | RayExecutor


def executor(kind: ExecutorKind | str = ExecutorKind.LOCAL, address: str | None = None, cpus_per_run: float = 1.0,
             gpus_per_run: float = 0.0) -> Executor:
    """The executor the CLI's ``--executor`` names (Ray's checked for installation here)."""
    try:
        kind = ExecutorKind(kind)
    except ValueError:
        raise ValueError(f"executor {kind!r}: use {' or '.join(k.value for k in ExecutorKind)}") from None
    if kind is ExecutorKind.LOCAL:
        return LocalExecutor()
    require("ray")
    return RayExecutor(address, cpus_per_run, gpus_per_run)
