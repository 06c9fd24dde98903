"""Collecting Grams: forward pre-hooks on every nn.Linear and transformers Conv1D.

For each distinct input tensor X of a hooked module (modules that read the same tensor in a forward,
such as q/k/v or gate/up, share one Gram, detected at run time) the collector adds the raw fp32 sum
X[keep]^T X[keep] into an upper-triangular accumulator through regmean_fast.ops.gram_update, and the
number of kept rows into a count. keep drops padding rows: inputs shaped like the attention mask
([B, S, d], or [B*S, d]) use it, per-example inputs ([B, d], e.g. a pooler or a classifier) keep every
row. include_padding=True keeps every row everywhere (what the published codes do).
"""

from __future__ import annotations

import bisect
import itertools
import os
import re
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from .. import ops
from .fileformat import GramSet, GramsError, OnDisk, save_grams

try:  # transformers is optional for collect_grams on plain modules
    from transformers.pytorch_utils import Conv1D as _HFConv1D
except Exception:  # pragma: no cover
    _HFConv1D = None

_RECENT = 8  # distinct inputs remembered for sharing detection (q/k/v, gate/up are called back to back)
# Causal LMs whose head reads the base model's last hidden state as it is (head(hidden[:, kept positions])):
# the Grams need no logits, a vocabulary-wide product per token (a fifth of SmolLM2-135M's forward, 60% of
# gemma-3-270m's), so their forward keeps one position; an untied head's Gram is fed the whole last hidden state.
_HEAD_READS_LAST_HIDDEN = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gpt2")


class NonFiniteActivationError(GramsError):
    """A hooked module received inf or NaN inputs."""


class SharingChangedError(GramsError):
    """Modules that shared an input in one forward did not in a later one."""


def is_conv1d(module: nn.Module) -> bool:
    return _HFConv1D is not None and isinstance(module, _HFConv1D)


def logits_free_forward(model: nn.Module, targets) -> tuple[dict, str | None, nn.Module | None]:
    """-> (extra forward kwargs, the head's name when it is a target, the base model to read its input from):
    ({"logits_to_keep": 1}, ...) for a causal LM of _HEAD_READS_LAST_HIDDEN, else ({}, None, None)."""
    import inspect

    config = getattr(model, "config", None)
    base = getattr(model, getattr(model, "base_model_prefix", "") or "", None)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if (getattr(config, "model_type", None) not in _HEAD_READS_LAST_HIDDEN or not isinstance(base, nn.Module)
            or head is None or "logits_to_keep" not in inspect.signature(model.forward).parameters):
        return {}, None, None
    head_name = next((n for n, m in targets if m is head), None)
    return {"logits_to_keep": 1}, head_name, base


def find_linear_modules(model: nn.Module, include=None, exclude=None, skip_tied: bool = True):
    """-> ([(name, module)], [skipped tied names]) for nn.Linear / Conv1D modules, in model order.

    include / exclude: regexes (a string or a list) searched in the module name. With skip_tied,
    modules whose weight is tied to an earlier parameter (e.g. an lm_head tied to the embeddings,
    absent from the checkpoint) are skipped.
    """
    inc, exc = _compile(include, "include"), _compile(exclude, "exclude")
    params = {n for n, _ in model.named_parameters()}  # deduplicated: tied copies are absent
    found, tied = [], []
    for name, mod in model.named_modules():
        if not (isinstance(mod, nn.Linear) or is_conv1d(mod)):
            continue
        if inc and not any(p.search(name) for p in inc):
            continue
        if any(p.search(name) for p in exc):
            continue
        if skip_tied and (f"{name}.weight" if name else "weight") not in params:  # name "": the model is the Linear
            tied.append(name)
            continue
        found.append((name, mod))
    return found, tied


def _compile(patterns, what: str) -> list:
    out = []
    for p in _as_list(patterns):
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise GramsError(f"{what} pattern {p!r} is not a regular expression ({e})") from None
    return out


def _as_list(x):
    if x is None:
        return []
    if isinstance(x, str):
        return [x]
    return list(x)


def model_fingerprint(model: nn.Module, modules: Iterable[tuple[str, nn.Module]]) -> dict:
    cfg = getattr(model, "config", None)
    return {
        "model_type": getattr(cfg, "model_type", None) or type(model).__name__,
        "architectures": list(getattr(cfg, "architectures", None) or [type(model).__name__]),
        "weights": {n: list(m.weight.shape) for n, m in modules},
    }


def _find_attention_mask(args, kwargs):
    m = kwargs.get("attention_mask")
    if m is None and len(args) > 1 and torch.is_tensor(args[1]) and torch.is_tensor(args[0]):
        if args[1].shape == args[0].shape:
            m = args[1]
    if m is not None and torch.is_tensor(m) and m.dim() == 2:
        return m
    return None


class GramCollector:
    """Hooks that sum x x^T of every Linear / Conv1D input; use as a context manager or call run().

        with GramCollector(model) as c:          # or collect_grams(model)
            for batch in batches:
                model(**batch)                   # the attention_mask kwarg is picked up automatically
        gs = c.gramset()                         # or c.save(path, ...)
    """

    def __init__(
        self,
        model: nn.Module,
        include=None,
        exclude=None,
        include_padding: bool = False,
        share_inputs: bool = True,
        skip_tied: bool = True,
        check_finite: bool = True,
    ):
        self.model = model
        self.include_padding = include_padding
        self.share_inputs = share_inputs
        self.check_finite_inputs = check_finite
        self.targets, self.skipped_tied = find_linear_modules(model, include, exclude, skip_tied)
        if not self.targets:
            raise GramsError(
                "no nn.Linear / Conv1D modules matched"
                + (f" (include={_as_list(include)}, exclude={_as_list(exclude)})" if include or exclude else "")
            )
        self.order = [n for n, _ in self.targets]
        # forward_kwargs: what a forward that only feeds the Grams passes (no logits; logits_free_forward)
        self.forward_kwargs, self._head_name, self._head_base = logits_free_forward(model, self.targets)
        self.conv1d = {n for n, m in self.targets if is_conv1d(m)}
        self.fingerprint = model_fingerprint(model, self.targets)
        self.grams: dict[str, torch.Tensor] = {}  # key -> fp32 [d, d], upper triangle valid
        self.counts: dict[str, int] = {}
        # keys already summed across ranks (rank 0 holds the sums, the others nothing): reduce_to_rank0
        self.summed: set[str] = set()
        self.module_map: dict[str, str] = {}  # module -> key
        self.batches = 0
        self.tokens = 0
        self.examples = 0
        self._mask = None  # current batch's 2D attention mask (bool), or None
        self._mask_dev: dict = {}
        self._recent: list = []
        self._handles: list = []
        self._seen_this_batch: set = set()
        self.enabled = True

    # ---- hooks
    def attach(self) -> "GramCollector":
        if self._handles:
            return self
        self._handles.append(self.model.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True))
        for name, mod in self.targets:
            if name != self._head_name:
                self._handles.append(mod.register_forward_pre_hook(self._make_hook(name), with_kwargs=True))
        if self._head_name is not None:  # the head sees one position: its Gram reads the whole last hidden state
            self._handles.append(self._head_base.register_forward_hook(self._head_input_hook))
        return self

    def _head_input_hook(self, module, args, output):
        if self.enabled:
            hidden = getattr(output, "last_hidden_state", None)
            self._observe(self._head_name, hidden if hidden is not None else output[0])

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._recent.clear()

    def __enter__(self) -> "GramCollector":
        """Hooks on, the model in eval mode, autograd off (what is measured: eval-mode inputs under no_grad);
        all three are undone on exit."""
        self._was_training = self.model.training
        self.model.eval()
        self._no_grad = torch.no_grad()
        self._no_grad.__enter__()
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()
        self._no_grad.__exit__(*exc)
        self.model.train(self._was_training)

    def paused(self):
        """Context manager: forwards inside it are not counted (e.g. the Fisher's own passes)."""
        import contextlib

        @contextlib.contextmanager
        def cm():
            old, self.enabled = self.enabled, False
            try:
                yield self
            finally:
                self.enabled = old

        return cm()

    def _root_pre_hook(self, module, args, kwargs):
        if not self.enabled:
            return
        ids = kwargs.get("input_ids")
        if ids is None:  # any other model: its first tensor argument
            ids = next((a for a in list(args) + list(kwargs.values()) if torch.is_tensor(a)), None)
        self.begin_batch(_find_attention_mask(args, kwargs), ids)

    def begin_batch(self, attention_mask: torch.Tensor | None, input_ids: torch.Tensor | None = None) -> None:
        """Start a new batch: its attention mask ([B, S], 1 = token) drops padding rows. Without a mask the
        batch counts input_ids.size(0) examples and its token ids (integer input_ids) or its rows (a float
        input [..., d], e.g. features) as tokens."""
        self._end_batch_checks()
        self._recent.clear()
        self._mask_dev = {}
        self._mask = None if attention_mask is None else attention_mask.detach().bool()
        self.batches += 1
        if attention_mask is not None:
            self.examples += attention_mask.size(0)
            self.tokens += int(attention_mask.sum()) if not self.include_padding else attention_mask.numel()
        elif input_ids is not None and input_ids.dim() >= 1:
            rows_only = input_ids.is_floating_point() or input_ids.is_complex()  # [..., d]: a row is a token
            self.examples += input_ids.size(0) if input_ids.dim() > 1 else 1
            self.tokens += input_ids.numel() // (input_ids.size(-1) if rows_only else 1)

    def begin_batch_same(self, attention_mask: torch.Tensor | None) -> None:
        """Switch to a batch already counted (sequential mode revisits every batch once per block)."""
        self._end_batch_checks()
        self._recent.clear()
        self._mask_dev = {}
        self._mask = None if attention_mask is None else attention_mask.detach().bool()

    def observe(self, name: str, x: torch.Tensor) -> None:
        """Feed module `name` an input by hand (what its hook does)."""
        self._observe(name, x)

    def offload_to(self, device) -> None:
        """Move the accumulators to `device` (e.g. the host once a block is done)."""
        for k, G in self.grams.items():
            if G.device != torch.device(device):
                self.grams[k] = G.to(device)

    def _mask_for(self, x: torch.Tensor):
        """-> (mask or None, kept row count) for input x [..., d]."""
        rows_shape = x.shape[:-1]
        nrows = 1
        for s in rows_shape:
            nrows *= s
        m = self._mask
        if self.include_padding or m is None:
            return None, nrows
        if tuple(rows_shape) == tuple(m.shape):
            key = ("2d", x.device)
        elif len(rows_shape) == 1 and rows_shape[0] == m.numel():
            key = ("flat", x.device)
        else:
            return None, nrows  # per-example input (pooler, classifier): every row is real
        hit = self._mask_dev.get(key)
        if hit is None:
            mm = m.to(x.device)
            if key[0] == "flat":
                mm = mm.reshape(-1)
            hit = (mm, int(m.sum()))
            self._mask_dev[key] = hit
        return hit

    def _make_hook(self, name: str) -> Callable:
        def hook(module, args, kwargs):
            if not self.enabled:
                return
            x = args[0] if args else next(iter(kwargs.values()))
            self._observe(name, x)

        return hook

    def _observe(self, name: str, x: torch.Tensor) -> None:
        x = x.detach()
        try:
            version = x._version
        except RuntimeError:  # inference tensors carry no version counter
            version = -1
        ident = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device, version)
        found = None
        if self.share_inputs:
            for rid, _ref, rkey in self._recent:
                if rid == ident:
                    found = rkey
                    break
        mapped = self.module_map.get(name)
        if mapped is None:
            if found is not None:
                self.module_map[name] = found  # shares an input already summed in this forward
                return
            self.module_map[name] = name
            mapped = name
        elif mapped != name:  # a follower: its leader must have read this very tensor
            if found != mapped:
                raise SharingChangedError(
                    f"module {name!r} shared its input with {mapped!r} in an earlier forward but not now; "
                    "collect with share_inputs=False (--no-share)"
                )
            return
        # Two leaders that read one tensor only in a later forward keep their own Grams (both summed).
        self._update(mapped, x)
        self._recent.append((ident, x, mapped))
        if len(self._recent) > _RECENT:
            self._recent.pop(0)

    def _update(self, key: str, x: torch.Tensor) -> None:
        d = x.size(-1)
        G = self.grams.get(key)
        if G is None:
            G = torch.zeros(d, d, dtype=torch.float32, device=x.device)
            self.grams[key] = G
            self.counts[key] = 0
        if x.dtype not in ops.GRAM_DTYPES:
            x = x.float()
        mask, n = self._mask_for(x)
        if n == 0:
            return
        ops.gram_update(G, x, mask)  # the op gathers the kept rows once (faster than x[mask] here)
        self.counts[key] += n
        self._seen_this_batch.add(key)

    def _end_batch_checks(self) -> None:
        if not self.check_finite_inputs or not self._seen_this_batch:
            self._seen_this_batch = set()
            return
        keys = [k for k in self.order if k in self._seen_this_batch]
        self._seen_this_batch = set()
        # x_i^2 sums on the diagonal: non-finite iff some kept input entry was (or the sum overflowed).
        # One check over all the diagonals (per-key checks cost ~3 ms a batch at BERT-base size).
        dev = self.grams[keys[0]].device
        finite = torch.isfinite(torch.cat([self.grams[k].diagonal().to(dev) for k in keys]))
        if not bool(finite.all()):
            first = int((~finite).nonzero()[0])
            ends = list(itertools.accumulate(self.grams[k].size(0) for k in keys))
            bad = keys[bisect.bisect_right(ends, first)]
            mods = [m for m in self.order if self.module_map.get(m) == bad]
            raise NonFiniteActivationError(
                f"non-finite activations (inf or NaN, or so large that their squares overflow fp32) reach "
                f"module {mods[0]!r}"
                + (f" (and {', '.join(mods[1:])})" if len(mods) > 1 else "")
            )

    def finish(self) -> None:
        """Checks the last batch; call before reading results (gramset/save do)."""
        self._end_batch_checks()

    # ---- running
    def run(self, batches: Iterable, device=None, on_batch: Callable | None = None) -> "GramCollector":
        """Forward every batch in eval mode under no_grad: a dict is passed as keyword arguments, a tuple or
        list as positional ones, anything else (a tensor) as the one argument."""
        with self:
            for batch in batches:
                if device is not None:
                    batch = _to_device(batch, device)
                if isinstance(batch, Mapping):
                    self.model(**batch, **self.forward_kwargs)
                elif isinstance(batch, (tuple, list)):
                    self.model(*batch)
                else:
                    self.model(batch)
                if on_batch is not None:
                    on_batch(batch)
        self.finish()
        return self

    # ---- results
    def module_entries(self) -> dict:
        """module -> {"key", "conv1d"} in model order, for modules that saw data."""
        out = {}
        for m in self.order:
            k = self.module_map.get(m)
            if k is not None and self.counts.get(k, 0) > 0:
                out[m] = {"key": k, "conv1d": m in self.conv1d}
        return out

    def unseen_modules(self) -> list[str]:
        return [m for m in self.order if m not in self.module_entries()]

    def gramset(self, metadata: Mapping | None = None) -> GramSet:
        self.finish()
        entries = self.module_entries()
        keys = {v["key"] for v in entries.values()}
        return GramSet.from_memory(
            {k: self.grams[k] for k in keys}, {k: self.counts[k] for k in keys}, entries,
            self.fingerprint, dict(self.provenance(), **(metadata or {})),
        )

    def provenance(self) -> dict:
        return {
            "batches": self.batches,
            "examples": self.examples,
            "tokens": self.tokens,
            "padding": "included" if self.include_padding else "excluded",
            "shared_inputs": self.share_inputs,
            "skipped_tied": self.skipped_tied,
            "unseen_modules": self.unseen_modules(),
        }

    def save(self, path, metadata: Mapping | None = None, packed=False, shard_size=None, overwrite=False,
             fisher=None) -> str:
        self.finish()
        entries = self.module_entries()
        if not entries:
            raise GramsError("no hooked module received any token; nothing to save")
        keys = {v["key"] for v in entries.values()}
        weights = self.fingerprint["weights"]
        fp = dict(self.fingerprint, weights={m: weights[m] for m in entries})
        return save_grams(
            path, {k: self.grams[k] for k in keys}, {k: self.counts[k] for k in keys}, entries, fp,
            dict(self.provenance(), **(metadata or {})), packed=packed, shard_size=shard_size, fisher=fisher,
            overwrite=overwrite,
        )

    # ---- several processes (torchrun)
    def reduce_to_rank0(self, ctx, totals: bool = True, keys: Iterable[str] | None = None) -> None:
        """Sum every rank's Grams, counts and (totals=True) batch, example and token totals into rank 0
        (regmean_fast.distributed.DistContext), one Gram at a time; the other ranks are left without those Grams. A
        no-op in a world of one. totals=False: a later reduction of the same run (RegMean++, once per block).
        keys: only these Grams (grams --sequential: the block just finished); default: every Gram not summed by an
        earlier call (self.summed), so a final call after per-block ones sums only the totals."""
        if not ctx.enabled:
            return
        from ..distributed import reduce_tensor_dict

        self.finish()
        mine = set(self.module_map.values()) - self.summed if keys is None else set(keys)
        every = ctx.all_gather_object((dict(self.module_map), sorted(mine)), "the Gram sharing maps")
        merged: dict = {}
        for mp, _ in every:
            for m, k in mp.items():
                if merged.setdefault(m, k) != k:
                    raise SharingChangedError(f"module {m!r} shares its input differently on different ranks; "
                                              "collect with share_inputs=False (--no-share)")
        keys = sorted({k for _, ks in every for k in ks})  # the same list on every rank
        run_totals = [self.batches, self.examples, self.tokens] if totals else []
        sums = ctx.all_sum([self.counts.get(k, 0) for k in keys] + run_totals, "the token counts")
        part = {k: self.grams.pop(k) for k in keys if k in self.grams}  # sent one at a time, each freed once sent
        keep = None
        spilled = [G for G in part.values() if isinstance(G, OnDisk)]
        if spilled:  # the sums go to disk as they come: rank 0 holds one Gram, not all
            from .fileformat import spill_grams

            folder, number = os.path.dirname(spilled[0].path), itertools.count()

            def keep(k, G):
                return spill_grams(os.path.join(folder, f"sum-{next(number):05d}.safetensors"), {k: G},
                                   "sum of the ranks")[k]
        grams = reduce_tensor_dict(ctx, part, "the Grams", keep)
        self.module_map = merged
        self.summed.update(keys)
        if totals:
            self.batches, self.examples, self.tokens = sums[-3:]
        for k, n in zip(keys, sums):
            if ctx.is_main and k in grams:
                self.grams[k], self.counts[k] = grams[k], n
            else:
                self.counts.pop(k, None)

    # ---- finished Grams out of memory (grams --sequential)
    def spill(self, keys: Iterable[str], path: str, signature: str) -> None:
        """Move the Grams of `keys` (no longer accumulating) to the work file `path`: they stay in self.grams
        as OnDisk stand-ins, read back one at a time when saved or summed across ranks."""
        from .fileformat import spill_grams

        self.finish()
        todo = {k: self.grams[k] for k in keys if torch.is_tensor(self.grams.get(k))}
        if todo:
            self.grams.update(spill_grams(path, todo, signature))

    # ---- checkpoints
    def state(self) -> dict:
        """Everything needed to continue: raw accumulators (upper triangle) in memory, where the spilled ones
        are, counts, mapping, totals."""
        return {
            "grams": {k: G.detach().cpu() for k, G in self.grams.items() if torch.is_tensor(G)},
            "spilled": {k: [G.path, G.name, G.shape[0], G.finite] for k, G in self.grams.items()
                        if isinstance(G, OnDisk)},
            "counts": dict(self.counts),
            "summed": sorted(self.summed),
            "module_map": dict(self.module_map),
            "batches": self.batches,
            "examples": self.examples,
            "tokens": self.tokens,
        }

    def load_state(self, state: Mapping, device=None, signature: str | None = None) -> None:
        """Continue from state(); spilled Grams must be in their work files as this run (signature) wrote
        them (GramsError naming the file otherwise)."""
        self.grams = {k: G.to(device or "cpu", torch.float32).contiguous() for k, G in state["grams"].items()}
        for k, (path, name, d, finite) in (state.get("spilled") or {}).items():
            G = OnDisk(path, name, (int(d), int(d)), bool(finite))
            why = G.check(signature)
            if why:
                raise GramsError(f"cannot resume: the Gram {k!r} kept in a work file is missing or changed ({why}); "
                                 "delete the checkpoint and rerun without --resume")
            self.grams[k] = G
        self.counts = {k: int(v) for k, v in state["counts"].items()}
        self.module_map = dict(state["module_map"])
        self.summed = set(state.get("summed", ()))  # absent: a checkpoint of a run that summed nothing early
        self.batches = int(state["batches"])
        self.examples = int(state["examples"])
        self.tokens = int(state["tokens"])


def _to_device(batch, device):
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def collect_grams(model: nn.Module, batches: Iterable | None = None, *, device=None, include=None,
                  exclude=None, include_padding: bool = False, share_inputs: bool = True, skip_tied: bool = True,
                  on_batch: Callable | None = None):
    """Grams of every nn.Linear / Conv1D input of any nn.Module.

    With batches (an iterable of dicts of model kwargs, where attention_mask drops padding rows; or of
    tuples of positional arguments; or of tensors): runs them in eval mode under no_grad and returns a
    GramSet (in memory; .gram(module) is the full raw fp32 sum, .count(module) the tokens). Without
    batches: returns a GramCollector to use as a context manager around your own forward passes (inside
    it the model is in eval mode under no_grad, as before on exit; then .gramset() or .save(path)).
    """
    c = GramCollector(model, include=include, exclude=exclude, include_padding=include_padding,
                      share_inputs=share_inputs, skip_tied=skip_tied)
    if batches is None:
        return c
    c.run(batches, device=device, on_batch=on_batch)
    return c.gramset()
