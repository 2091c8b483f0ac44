"""Process groups, start-up diagnostics, hang detection and preemption for multi-process training.

One training process per GPU (or per CPU worker on gloo), started by ``torchrun`` (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ... in the environment) or by Slurm's ``srun`` with one task per
GPU (``SLURM_PROCID`` / ``SLURM_STEP_NUM_TASKS`` / ``SLURM_LOCALID``; ``MASTER_ADDR`` must be
exported by the batch script). :func:`setup` turns that into a :class:`DistContext`:

- before ``init_process_group`` the first process of every node prints one line ``mixlab dist:``
  with the host, its ranks, its devices, the backend, ``MASTER_ADDR``/``MASTER_PORT`` and the
  NCCL / rendezvous environment; after it, rank 0 compares that environment across all ranks and
  warns about every variable that differs (a module system resetting ``NCCL_*`` on some nodes
  made a multi-node run hang silently before);
- collectives time out after ``parallel.timeout_s`` (``init_process_group(timeout=...)``, NCCL with
  ``TORCH_NCCL_ASYNC_ERROR_HANDLING=3``), and a :class:`Watchdog` thread of our own tracks which
  phase and step every rank is in: an error inside a phase, or a phase that outlasts its timeout,
  is reported as :class:`DistributedError` naming the rank, host, step, phase, timeout and what to
  check; a rank stuck outside any collective dumps its Python stacks and exits;
- SIGTERM / SIGUSR1 (preemption; SIGINT too when there are several ranks) set a flag
  (:class:`PreemptionFlag`); the loop agrees on it across ranks at the next step boundary, saves a
  checkpoint and stops cleanly.

Host-side waits that may legitimately take long (token-shard preparation on the first rank of a
node, checkpoint writes) run on a separate gloo group with ``parallel.io_timeout_s``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import faulthandler
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from mixlab.config import ConfigError, ParallelConfig

__all__ = [
    "DistContext",
    "DistributedError",
    "LaunchEnv",
    "PreemptionFlag",
    "Watchdog",
    "detect_launch",
    "env_report",
    "setup",
]

#: environment variables shown at start and compared across ranks
_ENV_PREFIXES = ("NCCL_", "TORCH_NCCL_", "TORCH_DISTRIBUTED_", "GLOO_", "TORCHELASTIC_", "MASTER_")
_ENV_EXTRA = ("CUDA_VISIBLE_DEVICES", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE", "OMP_NUM_THREADS")
#: differ legitimately between ranks: not compared
_ENV_PER_RANK = {
    "CUDA_VISIBLE_DEVICES",
    "TORCHELASTIC_ERROR_FILE",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
    "LOCAL_WORLD_SIZE",
    "OMP_NUM_THREADS",
}

HANG_EXIT_CODE = 3
#: the least time init_process_group waits for every rank to arrive
_INIT_TIMEOUT_S = 600.0
#: shown in the start-up line only when set to something that is not a per-process detail
_ENV_HIDDEN = {"TORCHELASTIC_ERROR_FILE", "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_SIGNALS_TO_HANDLE"}


class DistributedError(RuntimeError):
    """A collective failed or timed out; the message names the rank, step, timeout and what to check."""


# ------------------------------------------------------------------ launcher environment


@dataclass
class LaunchEnv:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` of ``local_world_size`` on
    node ``node_rank``; ``launcher``: ``torchrun`` | ``slurm`` | ``single``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    launcher: str = "single"


def _int_env(name: str, default: int | None = None) -> int | None:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise ConfigError(f"environment variable {name}={v!r} is not an integer") from None


def detect_launch() -> LaunchEnv:
    """Read the launcher's environment: torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, else an srun
    job step's ``SLURM_PROCID``/``SLURM_STEP_NUM_TASKS``/``SLURM_LOCALID`` (only with more than one
    task), else one process.

    Under Slurm the variables torch reads are exported from Slurm's (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``); ``MASTER_ADDR`` must come from the batch script (see ``examples/slurm``)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        world = _int_env("WORLD_SIZE", 1)
        rank = _int_env("RANK", 0)
        local_rank = _int_env("LOCAL_RANK", 0)
        local_world = _int_env("LOCAL_WORLD_SIZE", world)
        node = _int_env("GROUP_RANK", rank // max(local_world, 1))
        return LaunchEnv(rank, world, local_rank, local_world, node, "torchrun")  # type: ignore[arg-type]
    # Inside an srun job step (not the batch script itself, which also carries SLURM_PROCID=0).
    ntasks = _int_env("SLURM_STEP_NUM_TASKS", 1)
    if ntasks and ntasks > 1 and "SLURM_PROCID" in os.environ:
        rank = _int_env("SLURM_PROCID", 0)
        local_rank = _int_env("SLURM_LOCALID", 0)
        per_node = re.match(r"\d+", os.environ.get("SLURM_STEP_TASKS_PER_NODE", ""))
        local_world = int(per_node.group()) if per_node else ntasks // (_int_env("SLURM_STEP_NUM_NODES", 1) or 1)
        node = _int_env("SLURM_NODEID", 0)
        if "MASTER_ADDR" not in os.environ:
            raise ConfigError(
                f"srun started {ntasks} tasks but MASTER_ADDR is not set; export it in the batch script, e.g. "
                'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1) '
                "(see examples/slurm/train.sbatch)"
            )
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(ntasks)
        os.environ["LOCAL_RANK"], os.environ["LOCAL_WORLD_SIZE"] = str(local_rank), str(local_world)
        return LaunchEnv(rank, ntasks, local_rank, local_world, node, "slurm")  # type: ignore[arg-type]
    return LaunchEnv()


def _relevant_env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES) or k in _ENV_EXTRA}
    return dict(sorted(out.items()))


def env_report(launch: LaunchEnv, backend: str) -> str:
    """The one-line ``mixlab dist:`` description of this node (printed by its first rank)."""
    first = launch.rank - launch.local_rank
    ranks = f"{first}" if launch.local_world_size == 1 else f"{first}-{first + launch.local_world_size - 1}"
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        names = sorted({torch.cuda.get_device_name(i) for i in range(n)})
        devices = f"{n} cuda ({', '.join(names)})"
    else:
        devices = f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    env = {k: v for k, v in _relevant_env().items() if k not in _ENV_HIDDEN}
    master = f"MASTER_ADDR={env.pop('MASTER_ADDR', '(unset)')} MASTER_PORT={env.pop('MASTER_PORT', '(unset)')}"
    rest = " ".join(f"{k}={v}" for k, v in env.items()) or "(no NCCL_*/TORCH_NCCL_*/rendezvous variables set)"
    nccl = ""
    if backend == "nccl":
        with contextlib.suppress(Exception):
            nccl = " (NCCL " + ".".join(str(x) for x in torch.cuda.nccl.version()) + ")"
    return (
        f"mixlab dist: host {socket.gethostname()} node {launch.node_rank} ranks {ranks} of {launch.world_size} "
        f"({launch.launcher}); devices {devices}; backend {backend}{nccl}; torch {torch.__version__}; {master}; {rest}"
    )


# ------------------------------------------------------------------ hints


def hang_hints(timeout_s: float) -> str:
    """What to check when a collective hangs or fails (shared by every distributed error)."""
    return (
        "What to check:\n"
        "  - did another rank fail first? Its error is above (torchrun prefixes lines with the rank); a rank that "
        "died or is stuck leaves the others waiting in the next collective.\n"
        "  - is the environment the same on every node? Compare the 'mixlab dist:' lines printed at start: a module "
        "system (`module load ...`) or a shell rc file that resets NCCL_*, MASTER_ADDR/MASTER_PORT, "
        "CUDA_VISIBLE_DEVICES or the network settings on some nodes has made a multi-node run hang before.\n"
        "  - network: NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME / NCCL_IB_HCA must name interfaces that exist on "
        "every node, and MASTER_ADDR:MASTER_PORT must be reachable from all of them; rerun with NCCL_DEBUG=INFO "
        "to see what NCCL picked.\n"
        "  - every rank must run the same command and config (model, data, train.batch_size), or ranks issue "
        "different collectives.\n"
        f"  - a step that is legitimately slower than parallel.timeout_s={timeout_s:g} (first-step compilation, "
        "a very large batch): raise parallel.timeout_s."
    )


# ------------------------------------------------------------------ watchdog


@dataclass
class _Phase:
    name: str
    step: int
    start: float
    timeout: float
    reported: bool = False


class Watchdog:
    """A daemon thread that knows which phase (``train step``, ``eval``, ``checkpoint``, ...) and
    step this rank is in.

    ``phase(name, step)`` is a context manager: an exception inside it that comes from a collective
    (a timeout, a closed connection, an NCCL error) is re-raised as :class:`DistributedError` with
    the diagnostic; a phase still running after its timeout is reported (with every thread's Python
    stack) and, if it is still running after twice its timeout (longer than any collective timeout,
    so this rank is stuck outside collectives), the process exits with code 3.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        timeout_s: float,
        log: Callable[[str], None] | None = None,
        exit_on_hang: bool = True,
    ) -> None:
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.host = socket.gethostname()
        self.exit_on_hang = exit_on_hang
        self._log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self._phase: _Phase | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mixlab-watchdog", daemon=True)
        self._thread.start()

    def describe(self, phase: _Phase, waited: float, what: str) -> str:
        return (
            f"rank {self.rank}/{self.world_size} on {self.host}: {what} in {phase.name} (step {phase.step}) "
            f"after {waited:.1f} s (limit {phase.timeout:g} s; parallel.timeout_s={self.timeout_s:g}).\n"
            + hang_hints(self.timeout_s)
        )

    @contextlib.contextmanager
    def phase(self, name: str, step: int, timeout: float | None = None) -> Iterator[None]:
        """Track ``name`` at ``step`` for the duration of the block (``timeout`` default ``timeout_s``)."""
        ph = _Phase(name, step, time.monotonic(), float(timeout or self.timeout_s))
        with self._lock:
            outer, self._phase = self._phase, ph
        try:
            yield
        except DistributedError:
            raise
        except Exception as e:
            if not _is_collective_error(e):
                raise
            waited = time.monotonic() - ph.start
            raise DistributedError(
                self.describe(ph, waited, f"a collective failed ({type(e).__name__}: {_first_line(e)})")
            ) from e
        finally:
            with self._lock:
                self._phase = outer

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, max(0.05, self.timeout_s / 20))):
            with self._lock:
                ph = self._phase
            if ph is None:
                continue
            waited = time.monotonic() - ph.start
            if waited > ph.timeout and not ph.reported:
                ph.reported = True
                self._log(
                    "mixlab dist: HANG: "
                    + self.describe(ph, waited, "no progress")
                    + "\nPython stacks of this rank follow."
                )
                with contextlib.suppress(Exception):
                    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            if self.exit_on_hang and waited > 2 * ph.timeout:
                self._log(
                    f"mixlab dist: rank {self.rank} on {self.host} is still stuck in {ph.name} (step {ph.step}) "
                    f"after {waited:.1f} s; exiting with code {HANG_EXIT_CODE} so the launcher can stop the job."
                )
                with contextlib.suppress(Exception):
                    sys.stderr.flush()
                    sys.stdout.flush()
                os._exit(HANG_EXIT_CODE)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""


def _is_collective_error(e: BaseException) -> bool:
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(e, dist_error):
        return True
    if not isinstance(e, RuntimeError):
        return False
    msg = str(e).lower()
    return any(
        s in msg
        for s in ("timed out", "timeout", "gloo", "nccl", "connection closed", "connection reset", "peer", "socket")
    )


# ------------------------------------------------------------------ preemption


class PreemptionFlag:
    """Installs handlers for SIGTERM and SIGUSR1 (and SIGINT when ``sigint``) that set ``requested``;
    a second signal of the same kind restores the default action and re-delivers it. ``restore()``
    puts the previous handlers back. Only the main thread can install handlers; elsewhere this is inert."""

    def __init__(self, sigint: bool = False, log: Callable[[str], None] | None = None) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}
        self._log = log
        if threading.current_thread() is not threading.main_thread():
            return
        sigs = [signal.SIGTERM]
        if hasattr(signal, "SIGUSR1"):
            sigs.append(signal.SIGUSR1)
        if sigint:
            sigs.append(signal.SIGINT)
        for s in sigs:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except (ValueError, OSError):
                continue

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested == name:  # the second time: give up on a clean stop
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL) or signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested = name
        msg = f"mixlab: received {name}: saving a checkpoint at the end of this step, then stopping\n"
        with contextlib.suppress(Exception):
            os.write(2, msg.encode())

    def restore(self) -> None:
        for s, h in self._previous.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(s, h)
        self._previous.clear()


# ------------------------------------------------------------------ the context


@dataclass
class DistContext:
    """The process group of a run (or a group of one). ``device`` is this rank's device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: no process group (strategy none, one process)
    strategy: str
    timeout_s: float
    io_timeout_s: float
    io_group: Any = None  # gloo group with io_timeout_s for host-side waits
    owns_group: bool = False
    watchdog: Watchdog | None = None
    preempt: PreemptionFlag | None = None
    launch: LaunchEnv = field(default_factory=LaunchEnv)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    def phase(self, name: str, step: int, timeout: float | None = None) -> contextlib.AbstractContextManager:
        """The watchdog's phase context (a no-op without a process group)."""
        if self.watchdog is None:
            return contextlib.nullcontext()
        return self.watchdog.phase(name, step, timeout)

    def barrier(self, io: bool = True) -> None:
        """Wait for every rank (on the gloo I/O group by default)."""
        if not self.distributed or self.world_size == 1:
            return
        dist.barrier(group=self.io_group if io else None)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """``obj`` of rank ``src`` on every rank (I/O group; small JSON-like objects only)."""
        if not self.distributed or self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.io_group)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.distributed or self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.io_group)
        return out

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks of a tensor on ``device`` (returns it)."""
        if self.distributed and self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.close()
            self.watchdog = None
        if self.preempt is not None:
            self.preempt.restore()
            self.preempt = None
        if self.owns_group and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
            self.owns_group = False


def _resolve_device(spec: str, launch: LaunchEnv) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(spec)
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise ConfigError(f"run.device={spec!r} but CUDA is not available; use run.device=auto or cpu")
    if launch.world_size > 1 or launch.launcher != "single":
        n = torch.cuda.device_count()
        if launch.local_rank >= n:
            raise ConfigError(
                f"rank {launch.rank} has LOCAL_RANK={launch.local_rank} but this node sees only {n} CUDA device(s) "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}); start at most {n} "
                "processes per node (torchrun --nproc_per_node, or srun --ntasks-per-node)"
            )
        return torch.device("cuda", launch.local_rank)
    return torch.device("cuda", torch.cuda.current_device()) if dev.index is None else dev


def setup(pcfg: ParallelConfig, device_spec: str, log: Callable[[str], None] | None = None) -> DistContext:
    """Join (or create) the process group that ``parallel`` and the launcher ask for.

    - ``strategy=none`` in one process: no process group.
    - a process group already initialised by the caller: used as is (not destroyed at the end).
    - otherwise ``init_process_group`` from the launcher's environment, or, when started as one
      plain process with ``ddp``/``fsdp``, a group of one (same code path, no network).
    """
    say = log or (lambda m: print(m, flush=True))
    launch = detect_launch()
    preexisting = dist.is_available() and dist.is_initialized()
    if preexisting:
        launch = LaunchEnv(
            dist.get_rank(), dist.get_world_size(), launch.local_rank, launch.local_world_size, launch.node_rank,
            launch.launcher if launch.launcher != "single" else "caller",
        )  # fmt: skip
    if pcfg.strategy == "none":
        if launch.world_size > 1:
            raise ConfigError(
                f"{launch.world_size} processes were started ({launch.launcher}) but parallel.strategy=none; "
                "set parallel.strategy=ddp or fsdp, or start a single process"
            )
        device = _resolve_device(device_spec, launch)
        return DistContext(0, 1, 0, device, None, "none", pcfg.timeout_s, pcfg.io_timeout_s, launch=launch)

    device = _resolve_device(device_spec, launch)
    backend = pcfg.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError(f"parallel.backend=nccl needs CUDA devices, but run.device is {device}; use gloo on the CPU")
    if backend == "nccl":
        torch.cuda.set_device(device)
        # Since torch 2.2 the default; older versions hang forever on a timed-out collective without it.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")

    if launch.local_rank == 0:
        say(env_report(launch, backend if not preexisting else dist.get_backend()))
    # Ranks reach init_process_group at different times (imports, container start-up on other nodes):
    # the rendezvous gets at least _INIT_TIMEOUT_S, the collectives then parallel.timeout_s.
    init_timeout = max(pcfg.timeout_s, _INIT_TIMEOUT_S)
    owns = False
    if not preexisting:
        kwargs: dict[str, Any] = {"backend": backend, "timeout": _dt.timedelta(seconds=init_timeout)}
        if backend == "nccl":
            kwargs["device_id"] = device
        if launch.world_size == 1 and "MASTER_ADDR" not in os.environ:
            kwargs.update(store=dist.HashStore(), rank=0, world_size=1)
        try:
            dist.init_process_group(**kwargs)
        except Exception as e:
            raise DistributedError(
                f"rank {launch.rank}/{launch.world_size} on {socket.gethostname()}: init_process_group(backend="
                f"{backend}) failed (it waits up to {init_timeout:g} s for every rank): {type(e).__name__}: "
                f"{_first_line(e)}\n"
                "Every rank must reach the same MASTER_ADDR:MASTER_PORT (or rendezvous endpoint) with the same "
                "WORLD_SIZE.\n" + hang_hints(pcfg.timeout_s)
            ) from e
        owns = True
        if init_timeout > pcfg.timeout_s:
            _set_collective_timeout(pcfg.timeout_s, say)
    else:
        backend = dist.get_backend()
    rank, world = dist.get_rank(), dist.get_world_size()
    io_group = dist.new_group(backend="gloo", timeout=_dt.timedelta(seconds=pcfg.io_timeout_s)) if world > 1 else None
    ctx = DistContext(
        rank=rank,
        world_size=world,
        local_rank=launch.local_rank,
        device=device,
        backend=backend,
        strategy=pcfg.strategy,
        timeout_s=pcfg.timeout_s,
        io_timeout_s=pcfg.io_timeout_s,
        io_group=io_group,
        owns_group=owns,
        launch=launch,
    )
    if world > 1:
        _check_env_consistency(ctx, say)
        ctx.watchdog = Watchdog(rank, world, pcfg.timeout_s)
    return ctx


def _set_collective_timeout(timeout_s: float, say: Callable[[str], None]) -> None:
    try:
        from torch.distributed.distributed_c10d import _set_pg_timeout

        _set_pg_timeout(_dt.timedelta(seconds=timeout_s))
    except Exception as e:  # a private API: without it collectives keep the (longer) init timeout
        say(
            f"mixlab dist: note: could not set the collective timeout to {timeout_s:g} s ({e}); using {_INIT_TIMEOUT_S} s"
        )


def _check_env_consistency(ctx: DistContext, say: Callable[[str], None]) -> None:
    """Warn (on rank 0) about NCCL / rendezvous variables and versions that differ between ranks."""
    mine = {k: v for k, v in _relevant_env().items() if k not in _ENV_PER_RANK}
    mine["(torch version)"] = torch.__version__
    everyone = ctx.all_gather_object((socket.gethostname(), mine))
    if not ctx.is_main:
        return
    keys = sorted(set().union(*(e[1].keys() for e in everyone)))
    for k in keys:
        values: dict[str, list[str]] = {}
        for r, (host, env) in enumerate(everyone):
            values.setdefault(env.get(k, "(unset)"), []).append(f"{r}@{host}")
        if len(values) > 1:
            detail = "; ".join(
                f"{v!r} on ranks {', '.join(rs[:8])}{' ...' if len(rs) > 8 else ''}" for v, rs in values.items()
            )
            say(
                f"mixlab dist: WARNING: {k} differs between ranks: {detail}. A module system or shell rc file that "
                "sets it on some nodes only can make collectives hang; set it the same way everywhere."
            )
