"""Executors run accuracy cells: :class:`RayExecutor` (the default; an embedded local Ray or an
existing cluster) and :class:`LocalExecutor` (in process, for debugging and unit tests).

Both run the same task functions (:mod:`ternbench.bench.tasks`) in the same order of operations
with the same thread count, so they produce identical rows.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from .tasks import CellSpec, eval_shard, quantize_cell, shard_indices

__all__ = [
    "Executor",
    "LocalExecutor",
    "RayExecutor",
    "RayStartError",
    "CellOutcome",
    "available_cpus",
    "make_executor",
]

log = logging.getLogger(__name__)


@dataclass
class CellOutcome:
    """What an accuracy cell produced: the quantize info and the per-shard counts, or an error."""

    info: dict[str, Any] | None = None
    shards: list[dict[str, Any]] | None = None
    error: BaseException | None = None


class Executor(Protocol):
    name: str

    def run_cells(
        self,
        cells: list[CellSpec],
        baselines: dict[str, dict[str, torch.Tensor]],
        indices: dict[str, np.ndarray],
    ) -> Iterator[tuple[CellSpec, CellOutcome]]:
        """Yield each cell with its outcome as it finishes (any order)."""
        ...

    def run_tasks(self, fn: Callable[..., Any], arglists: list[tuple[Any, ...]]) -> list[Any]:
        """``[fn(*args) for args in arglists]``, run as independent tasks (in order)."""
        ...

    def close(self) -> None: ...


class LocalExecutor:
    """Runs every task in this process, one after the other."""

    name = "local"

    def run_cells(
        self,
        cells: list[CellSpec],
        baselines: dict[str, dict[str, torch.Tensor]],
        indices: dict[str, np.ndarray],
    ) -> Iterator[tuple[CellSpec, CellOutcome]]:
        for cell in cells:
            threads = torch.get_num_threads()
            try:
                module, info = quantize_cell(cell, baselines[cell.baseline_key])
                shards = [
                    eval_shard(cell, module, s)
                    for s in shard_indices(indices[cell.key], cell.profile_obj.eval_shards)
                ]
                yield cell, CellOutcome(info, shards)
            except Exception as exc:  # the cell fails, the run goes on
                log.debug("cell %s failed", cell.key, exc_info=True)
                yield cell, CellOutcome(error=exc)
            finally:
                torch.set_num_threads(threads)

    def run_tasks(self, fn: Callable[..., Any], arglists: list[tuple[Any, ...]]) -> list[Any]:
        return [fn(*args) for args in arglists]

    def close(self) -> None:
        return None


def task_placement(cell: CellSpec, cluster_gpus: float) -> tuple[CellSpec, dict[str, Any]]:
    """Training-time cells ask Ray for one GPU when the cluster has any (and then train on
    ``cuda``); everything else is CPU work."""
    from ternbench.methods import get_method_info

    if cluster_gpus >= 1 and get_method_info(cell.method).kind == "qat":
        return dataclasses.replace(cell, device="cuda"), {"num_gpus": 1}
    return cell, {}


def _unwrap(exc: BaseException) -> BaseException:
    """Turn a RayTaskError into the exception the task raised, so users see the real cause."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


class RayStartError(RuntimeError):
    """Ray could not be started or reached; the message is one line saying what to do."""


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def forwarded_env() -> dict[str, str]:
    """The variables of this process that fix the ISA level kernels run at: the forced x86 rule
    level (``--isa`` / ``TERNBENCH_ISA``) and the caps it puts on torch
    (:func:`.kernels.env.cap_torch_isa`). An embedded Ray's workers inherit them; an existing
    cluster's workers get them through the job's ``runtime_env``, so that a forced run computes
    the same everywhere.

    Example:
        >>> set(forwarded_env()) <= {"TERNBENCH_ISA", "ATEN_CPU_CAPABILITY",
        ...                          "ONEDNN_MAX_CPU_ISA", "FBGEMM_ENABLE_INSTRUCTIONS"}
        True
    """
    from ternbench.schedules import ISA_ENV

    from .kernels.env import TORCH_ISA_CAPS

    names = {ISA_ENV, *(k for caps in TORCH_ISA_CAPS.values() for k in caps)}
    return {k: os.environ[k] for k in sorted(names) if os.environ.get(k)}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0].strip()


class RayExecutor:
    """Runs quantize and evaluation-shard tasks on Ray.

    With ``address`` (or ``RAY_ADDRESS``) it joins that existing cluster, whose workers need
    ternbench installed. Otherwise it always starts its own isolated local Ray
    (``address="local"``, a private temp folder), sized from the process's CPU affinity, even
    when another Ray cluster runs on the machine, and shuts it down on :meth:`close`. Tasks are
    retried on worker death (``max_retries``). A failed start or connect raises
    :class:`RayStartError` with one line.
    """

    name = "ray"

    def __init__(
        self, address: str | None = None, num_cpus: int | None = None, max_retries: int = 2
    ) -> None:
        import ray

        self._ray = ray
        self.started = False
        self._temp_dir: str | None = None
        self.max_retries = max_retries
        origin = "--ray-address" if address else "RAY_ADDRESS"
        address = address or os.environ.get("RAY_ADDRESS") or None
        if not ray.is_initialized():
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            if address:
                log.info("connecting to Ray cluster at %s", address)
                env_vars = forwarded_env()
                if env_vars:
                    log.info("the cluster's workers get %s", ", ".join(
                        f"{k}={v}" for k, v in sorted(env_vars.items())))
                try:
                    ray.init(address=address, log_to_driver=False,
                             runtime_env={"env_vars": env_vars} if env_vars else None)
                except Exception as exc:
                    raise RayStartError(
                        f"cannot connect to the Ray cluster at {address} ({origin}): "
                        f"{_first_line(exc)}; check the address and RAY_AUTH_MODE/"
                        "RAY_AUTH_TOKEN, or unset it to run on an embedded Ray"
                    ) from exc
            else:
                # Ray 2.60 silently turns on token auth once ~/.ray/auth_token exists; an
                # embedded instance has no other clients, so disable it unless the user chose.
                os.environ.setdefault("RAY_AUTH_MODE", "disabled")
                import tempfile

                n = num_cpus or available_cpus()
                self._temp_dir = tempfile.mkdtemp(prefix="ternbench-ray-")
                log.info("starting an embedded Ray with %d CPUs", n)
                try:
                    # address="local": a new instance even if a cluster runs here (or a stale
                    # ray_current_cluster file points at one); its own temp folder keeps its
                    # sockets, logs and session_latest apart from any other Ray on the machine
                    ray.init(
                        address="local",
                        num_cpus=n,
                        include_dashboard=False,
                        log_to_driver=False,
                        object_store_memory=512 * 2**20,
                        _temp_dir=self._temp_dir,
                    )
                except Exception as exc:
                    self._cleanup_temp()
                    raise RayStartError(
                        f"cannot start an embedded Ray: {_first_line(exc)}; "
                        "try --executor local (in process)"
                    ) from exc
            self.started = True
        self._quantize: Any = ray.remote(num_cpus=1, max_retries=max_retries)(
            quantize_cell
        ).options(num_returns=2)
        self._eval = ray.remote(num_cpus=1, max_retries=max_retries)(eval_shard)

    def _cleanup_temp(self) -> None:
        if self._temp_dir is not None:
            import shutil

            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    def run_cells(
        self,
        cells: list[CellSpec],
        baselines: dict[str, dict[str, torch.Tensor]],
        indices: dict[str, np.ndarray],
    ) -> Iterator[tuple[CellSpec, CellOutcome]]:
        ray = self._ray
        base_refs = {k: ray.put(v) for k, v in baselines.items()}
        gpus = float(ray.cluster_resources().get("GPU", 0))
        pending: dict[Any, tuple[CellSpec, list[Any]]] = {}
        for cell in cells:
            cell, opts = task_placement(cell, gpus)
            quantize = self._quantize.options(**opts) if opts else self._quantize
            module_ref, info_ref = quantize.remote(cell, base_refs[cell.baseline_key])
            # shards depend on the module ref: Ray starts them once quantize has finished,
            # and the module never travels through the driver
            shard_refs = [
                self._eval.remote(cell, module_ref, s)
                for s in shard_indices(indices[cell.key], cell.profile_obj.eval_shards)
            ]
            pending[info_ref] = (cell, shard_refs)
        waiting = {
            ref: info_ref for info_ref, (_, srefs) in pending.items() for ref in [info_ref, *srefs]
        }
        remaining = {info_ref: 1 + len(s) for info_ref, (_, s) in pending.items()}
        while waiting:
            ready, _ = ray.wait(list(waiting), num_returns=1)
            for ref in ready:
                owner = waiting.pop(ref)
                remaining[owner] -= 1
                if remaining[owner] == 0:
                    cell, srefs = pending[owner]
                    try:
                        info = ray.get(owner)
                        shards = ray.get(srefs)
                        yield cell, CellOutcome(info, shards)
                    except Exception as exc:
                        yield cell, CellOutcome(error=_unwrap(exc))

    def run_tasks(self, fn: Callable[..., Any], arglists: list[tuple[Any, ...]]) -> list[Any]:
        task = self._ray.remote(num_cpus=1, max_retries=self.max_retries)(fn)
        try:
            return list(self._ray.get([task.remote(*args) for args in arglists]))
        except Exception as exc:
            raise _unwrap(exc) from None

    def close(self) -> None:
        if self.started and self._ray.is_initialized():
            self._ray.shutdown()
            self.started = False
        self._cleanup_temp()


def make_executor(kind: str, address: str | None = None, num_cpus: int | None = None) -> Executor:
    if kind == "local":
        return LocalExecutor()
    if kind == "ray":
        return RayExecutor(address=address, num_cpus=num_cpus)
    raise ValueError(f"executor must be 'ray' or 'local', got {kind!r}")
