"""Scale-out glue: torch.distributed (torchrun; NCCL for CUDA tensors, gloo for CPU) for `grams` and `merge`.

    ctx = distributed.init_from_env("cuda")   # WORLD_SIZE / RANK / LOCAL_RANK from torchrun; world 1 without
    ctx.device                                 # cuda:LOCAL_RANK (one rank per GPU) or cpu
    mine = ctx.shard(batches)                  # a disjoint, deterministic share: batches[rank::world]
    ctx.sync(error=None)                       # status all-reduce: raises DistributedError if any rank failed
    ctx.reduce_sum_(tensor)                    # SUM into rank 0, in place (rank 0's tensor holds the total)
    ctx.broadcast_(tensor)                     # rank 0's tensor into every rank's, in place
    assign_greedy(costs, world)                # largest cost first onto the least loaded rank

Failures. Every command reaches the same sequence of sync points on every rank. A rank that raises
calls ctx.fail(exc) in its handler: that takes part in the next sync point with a failure flag, so the
other ranks raise DistributedError("rank R failed: ...") there instead of waiting. A rank that dies
closes its sockets: the others' next collective fails and is reported as a DistributedError too. A rank
that hangs is caught by the process-group timeout (REGMEAN_FAST_DIST_TIMEOUT seconds, default 4 hours,
because ranks legitimately wait at a sync point for the slowest one).

A world of one (no torchrun, or WORLD_SIZE=1) makes every helper a no-op: single-process runs are
exactly what they were.
"""

from __future__ import annotations

import atexit
import datetime
import os
import sys
from dataclasses import dataclass, field
from typing import NoReturn

import torch

from .merge.errors import MergeError

TIMEOUT_ENV = "REGMEAN_FAST_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 4 * 3600
# tests: "RANK:N" makes that rank exit abruptly (os._exit) after writing N merge shards
DIE_AFTER_SHARDS_ENV = "REGMEAN_FAST_MERGE_DIE_AFTER_SHARDS"


class DistributedError(MergeError):
    """Another rank failed, died, or could not be reached; the run stops on every rank (exit status 3)."""

    exit_code = 3


def env_world() -> tuple[int, int, int]:
    """-> (world size, rank, local rank) from torchrun's variables; (1, 0, 0) without them."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        rank = int(os.environ.get("RANK", "0") or 0)
        local = int(os.environ.get("LOCAL_RANK", str(rank)) or 0)
    except ValueError:
        raise DistributedError("WORLD_SIZE / RANK / LOCAL_RANK must be integers") from None
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return world, rank, local


def timeout_s() -> float:
    v = os.environ.get(TIMEOUT_ENV)
    try:
        return float(v) if v else float(DEFAULT_TIMEOUT_S)
    except ValueError:
        raise DistributedError(f"{TIMEOUT_ENV} must be a number of seconds, got {v!r}") from None


def resolve_device(spec: str | torch.device | None, local_rank: int, world: int) -> torch.device:
    """'cuda' -> cuda:LOCAL_RANK when distributed (one rank per device); explicit cuda:N is kept."""
    dev = torch.device(spec if spec is not None else "cpu")
    if dev.type == "cuda" and dev.index is None and world > 1:
        dev = torch.device("cuda", local_rank)
    return dev


def assign_greedy(costs, world: int) -> list[int]:
    """Greedy bin packing (LPT): items by decreasing cost, each onto the least loaded rank (ties: the
    lowest rank; equal costs keep their order). Deterministic, so every rank computes the same owners."""
    owner = [0] * len(costs)
    load = [0.0] * world
    for i in sorted(range(len(costs)), key=lambda j: (-float(costs[j]), j)):
        r = min(range(world), key=lambda q: (load[q], q))
        owner[i] = r
        load[r] += float(costs[i])
    return owner


def group_cost(d_in: int, d_out: int, k: int = 1) -> float:
    """Estimated cost of one RegMean group: the solve (d_in^3) plus the products with the weights
    (d_in^2 * d_out); k models add k Gram sums (k d_in^2), small next to the rest."""
    return float(d_in) ** 3 + float(d_in) ** 2 * float(d_out) + k * float(d_in) ** 2


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """The items of rank `rank`: i = rank, rank + world, ... (disjoint, every item once, deterministic)."""
    return list(range(rank, n, world))


@dataclass
class DistContext:
    world: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    owns_group: bool = False  # we called init_process_group (and destroy it)
    failed: bool = False  # this rank already reported a failure at a sync point
    broken: bool = False  # communication is lost: no further collectives

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- data -----------------------------------------------------------------------------------
    def shard(self, items: list) -> list:
        return [items[i] for i in shard_indices(len(items), self.rank, self.world)] if self.enabled else items

    # -- collectives, with communication failures turned into DistributedError ------------------
    def _comm(self, what: str, fn, *a, **kw):
        import torch.distributed as dist

        if self.broken:
            raise DistributedError(f"rank {self.rank}: communication with the other ranks was lost earlier")
        try:
            return fn(*a, **kw)
        except DistributedError:
            raise
        except (RuntimeError, dist.DistBackendError if hasattr(dist, "DistBackendError") else RuntimeError) as e:
            self.broken = True
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DistributedError(
                f"rank {self.rank}: lost contact with another rank during {what} (did it die? see its log); "
                f"{first}") from None

    def sync(self, error: BaseException | None = None, what: str = "a sync point") -> None:
        """Every rank calls this at the same points. Raises DistributedError on the ranks that did not
        fail when some rank reports an error (the failing rank re-raises its own error itself)."""
        if not self.enabled:
            return
        import torch.distributed as dist

        flag = torch.tensor([1 if error is not None else 0], dtype=torch.int64)
        self._comm(what, dist.all_reduce, flag, op=dist.ReduceOp.SUM)
        if int(flag) == 0:
            return
        msg = None if error is None else (_one_line(error) or type(error).__name__)
        msgs = [None] * self.world
        self._comm(what, dist.all_gather_object, msgs, msg)
        if error is not None:
            self.failed = True
            return
        bad = [(r, m) for r, m in enumerate(msgs) if m is not None]
        self.failed = True
        r, m = bad[0]
        more = f" (and {len(bad) - 1} more rank(s))" if len(bad) > 1 else ""
        raise DistributedError(f"rank {r} failed: {m}{more}; stopping rank {self.rank}")

    def fail(self, error: BaseException) -> None:
        """From an exception handler: report `error` at the pending sync point (once), best effort."""
        if not self.enabled or self.failed or self.broken or isinstance(error, DistributedError):
            return
        try:
            self.sync(error, "error reporting")
        except Exception:  # noqa: BLE001 - the original error is what matters
            pass
        self.failed = True

    def reduce_sum_(self, t: torch.Tensor, what: str = "the reduction") -> torch.Tensor:
        """Sum `t` of every rank into rank 0's `t` (in place); other ranks' `t` is left unspecified."""
        if not self.enabled:
            return t
        import torch.distributed as dist

        self._comm(what, dist.reduce, t, dst=0, op=dist.ReduceOp.SUM)
        return t

    def broadcast_(self, t: torch.Tensor, what: str = "a broadcast") -> torch.Tensor:
        """Rank 0's `t` into every rank's `t` (in place; same shape and dtype everywhere, contiguous). Sent as
        bytes: any dtype, whatever the backend supports."""
        if not self.enabled:
            return t
        import torch.distributed as dist

        if not t.is_contiguous():
            raise ValueError("broadcast_ needs a contiguous tensor")
        self._comm(what, dist.broadcast, t.reshape(-1).view(torch.uint8), src=0)
        return t

    def all_sum(self, values: list[int], what: str = "the counts") -> list[int]:
        """Exact integer sums over ranks (int64)."""
        if not self.enabled:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.int64)
        self._comm(what, dist.all_reduce, t, op=dist.ReduceOp.SUM)
        return [int(v) for v in t.tolist()]

    def all_gather_object(self, obj, what: str = "an exchange"):
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        self._comm(what, dist.all_gather_object, out, obj)
        return out

    def broadcast_object(self, obj, what: str = "a broadcast"):
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        self._comm(what, dist.broadcast_object_list, box, src=0)
        return box[0]

    def barrier(self, what: str = "a barrier") -> None:
        """A barrier that names a missing rank (gloo's monitored_barrier) within the group timeout."""
        if not self.enabled:
            return
        import torch.distributed as dist

        if dist.get_backend() == "gloo":
            self._comm(what, dist.monitored_barrier, timeout=datetime.timedelta(seconds=timeout_s()),
                       wait_all_ranks=True)
        else:
            self.sync(None, what)

    def log(self, msg: str) -> None:
        """stderr line; prefixed with the rank when distributed."""
        pre = f"regmean_fast[rank {self.rank}/{self.world}]: " if self.enabled else "regmean_fast: "
        print(pre + msg, file=sys.stderr)

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            try:
                if dist.is_initialized():
                    dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass
            self.owns_group = False
            global _CTX
            _CTX = None


def _one_line(e: BaseException) -> str:
    s = str(e).strip()
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    s = s.splitlines()[0] if s else ""
    return f"{type(e).__name__}: {s}" if not isinstance(e, (MergeError, ValueError)) else s


_CTX: DistContext | None = None


def init_from_env(device=None) -> DistContext:
    """The process group of this run: created from torchrun's variables when WORLD_SIZE > 1 (or the
    one the caller already initialised), with a DistContext describing it. Idempotent."""
    global _CTX
    import torch.distributed as dist

    world, rank, local = env_world()
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
        dev = resolve_device(device, local, world)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if _CTX is not None and _CTX.world == world:
            _CTX.device = dev
            return _CTX
        _CTX = DistContext(world, rank, local, dev, dist.get_backend(), owns_group=False)
        return _CTX
    dev = resolve_device(device, local, world)
    if world == 1:
        return DistContext(1, 0, 0, dev)
    if not dist.is_available():
        raise DistributedError("torch.distributed is not available in this PyTorch build")
    for v in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(v):
            raise DistributedError(f"WORLD_SIZE={world} but {v} is not set; launch with torchrun")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DistributedError(f"device {dev}: CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DistributedError(f"rank {rank}: device {dev} but only {torch.cuda.device_count()} CUDA device(s) "
                                   "on this node; use at most one rank per GPU (--nproc_per_node)")
        torch.cuda.set_device(dev)
        backend = "cpu:gloo,cuda:nccl"  # control messages on the CPU (gloo), Grams on the GPU (NCCL)
    else:
        backend = "gloo"
    try:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s()),
                                world_size=world, rank=rank)
    except Exception as e:  # noqa: BLE001
        raise DistributedError(f"rank {rank}: cannot join the process group ({backend}): {_one_line(e)}") from None
    _CTX = DistContext(world, rank, local, dev, backend, owns_group=True)
    atexit.register(_CTX.close)
    global _CREATED_GROUP
    _CREATED_GROUP = True
    return _CTX


_CREATED_GROUP = False  # this process joined a process group of its own (init_from_env under torchrun)


def exit_process(code: int) -> NoReturn:
    """The end of a `python -m regmean_fast` process. After a process group of our own, leave with os._exit
    (after closing the group and flushing): gloo's worker threads can drop the last reference to a finished
    collective's tensor a moment after the collective returns; that needs the GIL, and a thread that takes the GIL
    during interpreter finalisation aborts the process ("terminate called without an active exception", exit -6;
    about one 2-rank run in four here). Every file we write is closed and renamed before this point."""
    if not _CREATED_GROUP:
        raise SystemExit(code)
    if _CTX is not None:
        _CTX.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 1)


def die_after_shards_hook(ctx: DistContext):
    """Tests: on_shard_done callback that kills this rank abruptly after N shards (see DIE_AFTER_SHARDS_ENV)."""
    spec = os.environ.get(DIE_AFTER_SHARDS_ENV)
    if not spec:
        return None
    r, n = (int(x) for x in spec.split(":"))
    if r != ctx.rank:
        return None
    done = []

    def hook(fname):
        done.append(fname)
        if len(done) >= n:
            sys.stderr.write(f"rank {ctx.rank}: test hook: exiting abruptly after {fname}\n")
            sys.stderr.flush()
            os._exit(17)

    return hook


def reduce_tensor_dict(ctx: DistContext, tensors: dict, what: str = "the Grams", keep=None) -> dict:
    """Sum dicts {name: tensor} of every rank into rank 0, one tensor at a time (bounded memory: each
    rank frees its copy once sent; rank 0 sums into its own). Names missing on a rank count as zeros; a value
    may be a stand-in with .load() (a Gram kept on disk). keep(name, sum) -> what rank 0's dict holds (default:
    the sum itself). Returns the summed dict on rank 0 and {} elsewhere. Order: sorted names, identical on
    every rank."""
    if not ctx.enabled:
        return tensors
    mine = {k: (list(t.shape), str(t.dtype).replace("torch.", ""), t.device.type) for k, t in tensors.items()}
    every = ctx.all_gather_object(mine, what)
    spec: dict = {}
    dev_type = None
    for r, info in enumerate(every):
        for k, (shape, dtype, dt) in info.items():
            if k in spec and spec[k][:2] != (shape, dtype):
                raise DistributedError(f"{what}: {k} is {shape} {dtype} on rank {r} but {spec[k][0]} {spec[k][1]} "
                                       "on an earlier rank")
            spec.setdefault(k, (shape, dtype))
            dev_type = dev_type or dt
    # one device type for every rank (NCCL and gloo cannot meet): the first rank's choice
    dev = ctx.device if dev_type == "cuda" and ctx.device.type == "cuda" else torch.device("cpu")
    out = {}
    for k in sorted(spec):
        shape, dtype = spec[k]
        t = tensors.pop(k, None)
        if t is None:
            t = torch.zeros(shape, dtype=getattr(torch, dtype), device=dev)
        elif not torch.is_tensor(t):
            t = t.load().to(dev)
        elif t.device != dev:
            t = t.to(dev)
        t = t.contiguous()
        ctx.reduce_sum_(t, f"{what} ({k})")
        if ctx.is_main:
            out[k] = t if keep is None else keep(k, t)
        del t
    return out
