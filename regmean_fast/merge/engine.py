"""The engine: stream the plan's items one at a time through their method, write each result.

Only the current item (a group's Grams and weights, or one tensor of every model) is in memory,
and only it is moved to the compute device."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext

import torch

from .. import ops
from ..solve import solve_tolerance
from .errors import MergeError, message_of
from .methods import METHODS, GroupInputs, TensorInputs
from .plan import GroupItem, Plan


def _round(x):
    """A float for the report: 3 significant digits (None when unknown or not finite: JSON has no inf)."""
    return None if x is None or not math.isfinite(x) else float(f"{x:.3g}")


def _finite_or_raise(t: torch.Tensor, what: str) -> None:
    if not ops.all_finite(t):
        raise MergeError(f"{what} has non-finite values")


# Per-tensor items larger than this free the group scratch buffers first (embeddings, heads); the small
# ones between groups (norms, biases) keep them. The per-tensor items' own buffers (names starting with
# TENSOR_SCRATCH: a model's tensor as read) are kept from one per-tensor item to the next
# and freed by a group.
SCRATCH_KEEP_BYTES = 1 << 20
TENSOR_SCRATCH = "tensor."


@contextmanager
def _per_tensor_threads():
    """A per-tensor item on one CPU thread fewer than torch's: the shard writer's thread has a core of its own.
    Its operations are streaming, memory-bound passes, and each parallel one ends at a barrier where the
    threads spin until the slowest is done; with the writer (or another process) on a core torch counts,
    those waits dominated (2 cores, load average 5-6: a 322M-parameter linear merge 4.9 s on one thread, 13-20 s
    on two; a 4-layer ties merge 12 s against 43-56 s). A large machine keeps the rest of its cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(max(1, n - 1))
    try:
        yield
    finally:
        torch.set_num_threads(n)


# Tensors under glibc's mmap threshold (up to 32 MB) come from the heap, and what per-tensor items free stays
# there, scattered: a 322M-parameter ties merge peaked at 2.1 GB resident after 20 layers against 1.25 GB with
# the free pages returned. Returned when more than this is free (after every item, the page faults cost ~10%).
HEAP_FREE_RETURN_BYTES = 128 << 20


def _heap_trimmer():
    """-> a function that returns the heap's free pages to the system (glibc's malloc_trim) when more than
    HEAP_FREE_RETURN_BYTES are free, or None where there is no glibc >= 2.33."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        trim, info = libc.malloc_trim, libc.mallinfo2
    except (OSError, AttributeError):
        return None

    class MallInfo2(ctypes.Structure):
        _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]

    info.restype = MallInfo2
    trim.argtypes = [ctypes.c_size_t]

    def release():
        if info().fordblks > HEAP_FREE_RETURN_BYTES:
            trim(0)
    return release


_RELEASE_FREED = _heap_trimmer()


def _item_bytes(src, item) -> int:
    n = 1
    for s in src.shape(item.name):
        n *= int(s)
    return 4 * n


class Engine:
    def __init__(self, plan: Plan, sources, *, base=None, gramsets=None, gram_paths=None,
                 compute_dtype=torch.float32, solve_dtype=torch.float32, device="cpu", allow_missing=False,
                 scratch: dict | None = None):
        self.plan = plan
        self.sources = sources
        self.base = base
        self.gramsets = gramsets
        self.gram_paths = gram_paths or [None] * len(sources)
        self.compute_dtype = compute_dtype
        self.solve_dtype = solve_dtype
        self.device = torch.device(device)
        self.k = len(sources)
        self.allow_missing = allow_missing
        # _scratch's buffers; a dict passed in is shared with other engines (RegMean++: one engine per block)
        self._buffers: dict[str, torch.Tensor] = {} if scratch is None else scratch
        self._out_dtypes = {n: d for n, d, _ in plan.outputs}

    # -- loading, with the checks that name the tensor -------------------------------------------
    def _src_label(self, i):
        p = getattr(self.sources[i], "path", None)
        return f"model {i} ({p})" if p else f"model {i}"

    def _load(self, i: int, name: str, stored_dtype: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
        """Model i's tensor on the device, in the compute dtype or as stored; out: read it (as stored) into
        this buffer instead."""
        if out is not None:
            t = self.sources[i].get(name, out=out) if out.device.type == "cpu" else out.copy_(self.sources[i].get(name))
            _finite_or_raise(t, f"{self._src_label(i)}: tensor {name}")
            return t
        t = self.sources[i].get(name)
        _finite_or_raise(t, f"{self._src_label(i)}: tensor {name}")
        return t.to(device=self.device, dtype=None if stored_dtype else self.compute_dtype)

    def _load_stored(self, i: int, name: str) -> torch.Tensor:
        """Model i's tensor on the device as stored, read into the per-tensor scratch buffer: valid until the
        next call."""
        src = self.sources[i]
        return self._load(i, name, out=self._scratch(TENSOR_SCRATCH + "stored", tuple(src.shape(name)),
                                                     src.dtype(name)))

    def _load_base(self, name: str) -> torch.Tensor:
        t = self.base.get(name)
        _finite_or_raise(t, f"base model: tensor {name}")
        return t.to(device=self.device, dtype=self.compute_dtype)

    def _gram_label(self, i):
        p = self.gram_paths[i]
        return f"Gram file {p}" if p else f"Gram set {i}"

    def _load_gram(self, i: int, key, module: str) -> torch.Tensor:
        """Model i's raw fp32 Gram on the device, contiguous. Not yet validated when its GramSet has
        raw_gram: the method's pass over it computes the stats and hands them to _check_gram."""
        gs = self.gramsets[i]
        try:
            G = gs.raw_gram(key) if hasattr(gs, "raw_gram") else gs.gram(key)  # gram() validates itself
        except MergeError:
            raise
        except (ValueError, KeyError, OSError, RuntimeError) as e:
            raise MergeError(f"{self._gram_label(i)}: cannot read the Gram for {module}: "
                             f"{message_of(e, self.gram_paths[i])}") from None
        return G.to(device=self.device, dtype=torch.float32).contiguous()

    def _check_gram(self, i: int, key, module: str, stats) -> None:
        gs = self.gramsets[i]
        if stats is None or not hasattr(gs, "check_gram"):
            return
        try:
            gs.check_gram(key, stats)
        except (ValueError, KeyError) as e:
            raise MergeError(f"{self._gram_label(i)}: cannot read the Gram for {module}: "
                             f"{message_of(e, self.gram_paths[i])}") from None

    def _scratch(self, name: str, shape, dtype) -> torch.Tensor:
        """A buffer reused from group to group (one per name, grown to the largest request), so the
        large per-group arrays do not cost fresh pages (page faults) every time. Contents undefined."""
        n = 1
        for s in shape:
            n *= int(s)
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < n:
            self._buffers.pop(name, None)
            buf = self._buffers[name] = torch.empty(n, dtype=dtype, device=self.device)
        return buf[:n].view(shape)

    def _load_fisher(self, i: int, name: str):
        try:
            f = self.gramsets[i].fisher(name)
        except (ValueError, KeyError, OSError, RuntimeError) as e:
            raise MergeError(f"{self._gram_label(i)}: cannot read the Fisher of {name}: "
                             f"{message_of(e, self.gram_paths[i])}") from None
        if f is None:
            return None
        if tuple(f.shape) != tuple(self.sources[i].shape(name)):
            raise MergeError(f"{self._gram_label(i)}: the Fisher of {name} has shape {list(f.shape)}, "
                             f"the tensor {list(self.sources[i].shape(name))}")
        f = f.to(device=self.device, dtype=self.compute_dtype)
        _finite_or_raise(f, f"{self._gram_label(i)}: the Fisher of {name}")
        if bool((f < 0).any()):
            raise MergeError(f"{self._gram_label(i)}: the Fisher of {name} has negative entries")
        return f

    # -- one item ----------------------------------------------------------------------------------
    def compute(self, item) -> tuple[dict, dict]:
        """-> ({output name: tensor (compute/solve dtype, device)}, report entry)."""
        plan = self.plan
        if isinstance(item, GroupItem):
            g = GroupInputs(
                members=item.members, conv1d=item.conv1d, k=self.k,
                load_weight=lambda i, m, out=None: self._load(i, item.members[m], stored_dtype=True, out=out),
                weight_dtype=lambda i, m: self.sources[i].dtype(item.members[m]),
                weight_shape=lambda m: tuple(self.sources[0].shape(item.members[m])),
                d_in=item.d_in, device=self.device,
                load_gram=lambda i: self._load_gram(i, item.keys[i], item.modules[0]),
                check_gram=lambda i, stats: self._check_gram(i, item.keys[i], item.modules[0], stats),
                scratch=self._scratch,
                count=lambda i: int(self.gramsets[i].count(item.keys[i])),
                coeffs=item.resolved.coeffs,
                tol=min(solve_tolerance(self._out_dtypes.get(m)) for m in item.members))
            try:
                outs, rep = METHODS["regmean"].merge_group(g, item.resolved.params, self.solve_dtype)
            except FloatingPointError as e:
                raise MergeError(f"{item.members[0]}: {e}") from None
            info = {"method": "regmean", "gram": str(item.keys[0]), "group": list(item.members), "solve": rep.method,
                    "ridge": rep.ridge, "attempts": rep.attempts, "cond": _round(rep.cond),
                    "expected_error": _round(rep.error), "tolerance": _round(rep.tolerance), "solve_dtype": rep.dtype,
                    "escalated": rep.escalated}
            if rep.escalated:
                info["fp32_expected_error"] = _round(rep.fp32_error)
            if not rep.precise:
                why = (f"expected relative error {rep.error:.1e} (condition ~{rep.cond:.1e})" if rep.error is not None
                       else "least squares (the summed Gram is not positive semi-definite)")
                rep.notes.append(f"the {rep.dtype} solve could not reach the relative tolerance "
                                 f"{rep.tolerance:g}: {why}")
                self.plan.warnings.append(f"{item.members[0]} (group of {len(item.members)}): {rep.notes[-1]}")
            if rep.notes:
                info["notes"] = list(rep.notes)
            return dict(zip(item.members, outs)), info
        name = item.name
        if item.method == "copy":
            return {name: self.sources[0].get(name)}, {"method": "copy"}
        method = METHODS[item.method]
        r = item.resolved
        inputs = TensorInputs(
            name=name, k=self.k, load=lambda i: self._load(i, name), coeffs=r.coeffs, raw_weights=r.weights,
            base=(lambda: self._load_base(name)) if self.base is not None else (lambda: None),
            fisher=(lambda i: self._load_fisher(i, name)) if self.gramsets is not None else (lambda i: None),
            model_params=r.model_params, seed=plan.seed,
            load_stored=lambda i: self._load_stored(i, name),
            compute_dtype=self.compute_dtype)
        if item.method == "fisher":
            fs = [self._load_fisher(i, name) for i in range(self.k)]
            have = [f is not None for f in fs]
            if not all(have):
                if any(have):
                    i = have.index(False)
                    if not self.allow_missing:
                        raise MergeError(f"{self._gram_label(i)} has no Fisher for {name} "
                                         f"(pass --allow-missing-grams to average it)")
                    self.plan.warnings.append(f"{name}: no Fisher in {self._gram_label(i)}; averaged")
                return {name: METHODS["average"].merge(inputs, {})}, {"method": "average", "note": "no Fisher"}
            inputs.fisher = lambda i: fs[i]
        out = method.merge(inputs, r.params)
        info = {"method": item.method}
        if item.note:
            info["note"] = item.note
        return {name: out}, info

    def run(self, write, skip=None, progress=None) -> dict:
        """write(name, cpu tensor in the output dtype) for every output, in plan order.
        skip(name) -> True for outputs already written (resume); their items are not recomputed
        unless a sibling in the same item still needs writing. Returns {name: report entry}."""
        report = {}
        for item in self.plan.items:
            names = item.outputs()
            if skip is not None and all(skip(n) for n in names):
                for n in names:
                    report[n] = {"method": "reused"}
                if progress is not None:
                    progress(item)
                continue
            group = isinstance(item, GroupItem)
            # Each kind's buffers would add to the other's working set: a group drops the per-tensor ones, a
            # large tensor the group ones.
            if group or _item_bytes(self.sources[0], item) > SCRATCH_KEEP_BYTES:
                for key in [k for k in self._buffers if k.startswith(TENSOR_SCRATCH) == group]:
                    del self._buffers[key]
            with _per_tensor_threads() if not group and self.device.type == "cpu" else nullcontext():
                t0 = time.perf_counter()
                outs, info = self.compute(item)
                dt = time.perf_counter() - t0
                for n in names:
                    report[n] = dict(info, time_s=round(dt, 6))
                    if skip is not None and skip(n):
                        _finite_or_raise(outs[n], f"merged tensor {n}")
                        continue
                    # A group's outputs may live in the scratch buffers: always a copy of those. Checked as
                    # written (half the bytes for bf16; an fp32 value that overflows the output dtype is caught).
                    t = outs[n].to(device="cpu", dtype=self._out_dtypes[n], copy=group)
                    _finite_or_raise(t, f"merged tensor {n}")
                    write(n, t)
                del outs
            if not group and _RELEASE_FREED is not None and self.device.type == "cpu":
                _RELEASE_FREED()
            if progress is not None:
                progress(item)
        return report
