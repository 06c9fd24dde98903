"""The merge plan: which tensors, by which method, which ones share a Gram, in what order.

Everything here reads only headers (tensor names, shapes, dtypes; Gram file metadata), so every
incompatibility is found before any heavy I/O."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

import torch

from .errors import MergeError
from .methods import METHODS
from .settings import evaluate, is_plain, layer_positions


@dataclass
class Resolved:
    """The method's parameters for one tensor (mergekit's settings evaluated at its name and layer):
    params: the global ones; weights: per model, as given; coeffs: the weights scaled to sum to 1 (None when
    they sum to 0 and the method does not scale them); model_params: per model, the other per-model ones."""

    params: dict
    weights: list
    coeffs: list | None
    model_params: list

    def describe(self):
        return [self.params, self.weights, self.model_params]


@dataclass
class TensorItem:
    name: str
    method: str  # a METHODS name, or "copy" (non-float tensors: taken from the first model)
    note: str | None = None
    resolved: Resolved | None = None

    def outputs(self):
        return [self.name]

    def describe(self):
        return ["tensor", self.name, self.method] + ([self.resolved.describe()] if self.resolved else [])


@dataclass
class GroupItem:
    """Modules reading the same input in every model: one Gram per model, one solve."""

    members: list  # parameter names ("<module>.weight"), in model order
    modules: list
    conv1d: list
    keys: tuple  # the Gram key of the group in each model
    d_in: int
    resolved: Resolved  # the same for every member (members resolved otherwise make another group)

    def outputs(self):
        return list(self.members)

    def describe(self):
        return ["group", list(self.members), list(self.keys), list(self.conv1d), self.resolved.describe()]


@dataclass
class Plan:
    items: list
    outputs: list  # (name, out dtype, shape) in write order
    method: str
    params: dict  # the global parameters as given (settings), defaults filled in
    coeffs: list | None  # the weights scaled to sum to 1 when they are plain numbers, else None
    raw_weights: list  # the models' weights as given (numbers or settings)
    warnings: list = field(default_factory=list)
    seed: int = 0

    def describe(self):
        return {"method": self.method, "params": self.params, "coeffs": self.coeffs, "raw_weights": self.raw_weights,
                "seed": self.seed,
                "items": [it.describe() for it in self.items],
                "outputs": [[n, str(d), list(s)] for n, d, s in self.outputs]}

    def n_groups(self):
        return sum(isinstance(it, GroupItem) for it in self.items)


def natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _where(src, i):
    return f"model {i} ({src.path})" if getattr(src, "path", None) else f"model {i}"


def _gram_where(gs, i, path):
    return f"Gram file {path}" if path else f"Gram set {i}"


def check_same_architecture(sources, base=None) -> list[str]:
    """Same config architecture, same tensor names and shapes across models (and the base)."""
    all_src = list(sources) + ([base] if base is not None else [])
    labels = [_where(s, i) for i, s in enumerate(sources)] + (
        [f"base model ({base.path})" if getattr(base, "path", None) else "base model"] if base is not None else [])
    ref = all_src[0]
    rc = ref.config or {}
    for s, lab in zip(all_src[1:], labels[1:]):
        c = s.config or {}
        for key in ("model_type", "architectures"):
            if rc.get(key) and c.get(key) and rc.get(key) != c.get(key):
                raise MergeError(f"{lab} is a different architecture: {key} {c.get(key)} vs {rc.get(key)} in {labels[0]}")
    names = sorted(ref.names(), key=natural_key)
    nameset = set(names)
    for s, lab in zip(all_src[1:], labels[1:]):
        other = set(s.names())
        if other != nameset:
            missing = sorted(nameset - other, key=natural_key)
            extra = sorted(other - nameset, key=natural_key)
            what = (f"lacks {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")) if missing \
                else (f"has the extra tensor {extra[0]}" + (f" and {len(extra) - 1} more" if len(extra) > 1 else ""))
            raise MergeError(f"{lab} is a different architecture: it {what} compared with {labels[0]}")
        for n in names:
            if tuple(s.shape(n)) != tuple(ref.shape(n)):
                raise MergeError(f"{lab} is a different architecture: {n} has shape {list(s.shape(n))}, "
                                 f"{list(ref.shape(n))} in {labels[0]}")
            if s.dtype(n).is_floating_point != ref.dtype(n).is_floating_point:
                raise MergeError(f"{lab}: {n} has dtype {s.dtype(n)}, {ref.dtype(n)} in {labels[0]}")
    return names


def _tied(param, shape, shapes, config, src=None) -> bool:
    """A head weight absent from the checkpoint because it is tied to the input embeddings (or, in
    memory, known to be another tensor of the model: `src.tied`)."""
    if param in (getattr(src, "tied", None) or {}):
        return True
    if config.get("tie_word_embeddings", True) is False or shape is None:
        return False
    return any(tuple(shape) == s and any(t in n for t in ("embed", "wte", "word_embeddings", "shared"))
               for n, s in shapes.items())


def _fisher_names(gs):
    for attr in ("fisher_params", "fisher_names"):
        f = getattr(gs, attr, None)
        if callable(f):
            return set(f())
    return None


def _pairing_warnings(sources, gramsets, gram_paths) -> list[str]:
    """Gram files whose provenance names another of the input models (the Grams given in the wrong
    order: same architecture, so nothing else tells)."""
    names = [os.path.basename(getattr(s, "adapter_path", None) or s.path) if getattr(s, "path", None) else None
             for s in sources]  # a LoRA adapter by its own name, as `grams` records it
    out = []
    for i, gs in enumerate(gramsets):
        made_on = (getattr(gs, "metadata", None) or {}).get("model")
        if made_on and names[i] and made_on != names[i] and made_on in names:
            out.append(f"{_gram_where(gs, i, gram_paths[i])} was collected on {made_on}, model "
                       f"{names.index(made_on)}, but is paired with model {i} ({names[i]}); check the order")
    return out


def build_plan(cfg, sources, gramsets=None, gram_paths=None, base=None) -> Plan:
    """cfg: a validated MergeConfig; sources: per-model tensor sources; gramsets: per-model GramSets."""
    k = len(sources)
    method = METHODS[cfg.method]
    params = {**{key: v for key, v in method.params.items() if key not in cfg.parameters}, **cfg.parameters}
    raw = [1.0 if m.weight is None else m.weight for m in cfg.models]
    total = sum(raw) if all(is_plain(w) for w in raw) else None
    coeffs = [w / total for w in raw] if total else None
    names = check_same_architecture(sources, base)
    ref = sources[0]
    float_names = [n for n in names if ref.dtype(n).is_floating_point]
    positions = layer_positions(names)
    res = {n: resolve_tensor(cfg, method, n, positions[n], tuple(ref.shape(n))) for n in float_names}
    warnings: list[str] = []
    gram_paths = gram_paths or [None] * k
    group_of: dict[str, GroupItem] = {}
    per_tensor: dict[str, TensorItem] = {}

    if method.needs_stats:
        if gramsets is None or len(gramsets) < k:
            raise MergeError(f"method {cfg.method} needs one Gram file per model: got "
                             f"{0 if gramsets is None else len(gramsets)} for {k} models")
        if len(gramsets) > k:
            raise MergeError(f"got {len(gramsets)} Gram files for {k} models")
        shapes = {n: tuple(ref.shape(n)) for n in names}
        warnings += _pairing_warnings(sources, gramsets, gram_paths)
        _check_fingerprints(sources, gramsets, gram_paths, shapes)
        if cfg.method == "regmean":
            _regmean_groups(cfg, sources, gramsets, gram_paths, shapes, warnings, per_tensor, group_of, res)
        elif cfg.method == "fisher":
            _fisher_items(cfg, gramsets, gram_paths, float_names, warnings, per_tensor)
    items, outputs = _items_and_outputs(cfg, names, ref, group_of, per_tensor, res)
    return Plan(items, outputs, cfg.method, params, coeffs, raw, warnings, seed=cfg.seed)


def resolve_tensor(cfg, method, name: str, t: float, shape: tuple) -> Resolved:
    """The method's parameters for one tensor: each per-model one from the model's settings, else the global
    ones, else the default; each global one from the global settings, else the default (mergekit's order)."""
    def value(setting):
        return evaluate(setting, name, t)

    try:
        params = method.check_params({key: v for key in method.params
                                      if (v := value(cfg.parameters.get(key))) is not None})
        mps = []
        for m in cfg.models:
            mp = {}
            for key in method.model_params:
                v = value(m.weight if key == "weight" else m.parameters.get(key))
                if v is None:
                    v = value(cfg.parameters.get(key))
                if v is not None:
                    mp[key] = v
            mps.append(method.check_model_params(mp))
    except MergeError as e:
        raise MergeError(f"{name}: {e}") from None
    weights = [mp.pop("weight") for mp in mps]
    total = sum(weights)
    if total == 0 and method.uses_coeffs(params):
        raise MergeError(f"model weights must not all be zero (they sum to 0 for {name})")
    for mp in mps:  # ties: mergekit refuses to keep no entry (int(density * n) == 0)
        d = mp.get("density", 1.0)
        if method.name == "ties" and d < 1.0 and int(d * math.prod(shape)) == 0:
            raise MergeError(f"ties: density {d} keeps no entry of {name} ({math.prod(shape)} entries; mergekit "
                             "refuses this too); raise the density, e.g. with a filter for this tensor")
    return Resolved(params, weights, [w / total for w in weights] if total else None, mps)


def _check_fingerprints(sources, gramsets, gram_paths, shapes: dict) -> None:
    """Each Gram file was made on its model: model type, architectures and the weights' shapes."""
    for i, gs in enumerate(gramsets):
        lab = _gram_where(gs, i, gram_paths[i])
        fp = getattr(gs, "fingerprint", None) or {}
        mc = sources[i].config or {}
        for key in ("model_type", "architectures"):
            if fp.get(key) and mc.get(key) and fp.get(key) != mc.get(key):
                raise MergeError(f"{lab} was made on another model: {key} {fp.get(key)}, the model is {mc.get(key)}")
        for mod, shp in (fp.get("weights") or {}).items():
            p = f"{mod}.weight"
            if p not in shapes and _tied(p, shp, shapes, mc, sources[i]):
                continue
            if p not in shapes or tuple(shp) != shapes[p]:
                have = list(shapes[p]) if p in shapes else "absent"
                raise MergeError(f"{lab} was made on another model: {p} was {list(shp)}, the model has {have}")


def _tied_modules(sources, gramsets, gram_paths, shapes: dict, mod_sets: list) -> set:
    """Modules with a Gram whose weight is tied to the embeddings (not stored); any other module with a Gram
    must have its weight in the model."""
    tied = set()
    for i, gs in enumerate(gramsets):
        fpw = (getattr(gs, "fingerprint", None) or {}).get("weights") or {}
        for mod in mod_sets[i]:
            if f"{mod}.weight" not in shapes and _tied(f"{mod}.weight", fpw.get(mod), shapes,
                                                       sources[i].config or {}, sources[i]):
                tied.add(mod)
                continue
            if f"{mod}.weight" not in shapes:
                raise MergeError(f"{_gram_where(gs, i, gram_paths[i])} was made on another model: "
                                 f"{mod}.weight is not in the model")
    return tied


def _averaged(r: Resolved) -> Resolved:
    """A tensor of a RegMean or Fisher merge averaged instead (no Gram, no Fisher): the same weights."""
    return Resolved({"normalize": True}, r.weights, r.coeffs, r.model_params)


def _regmean_groups(cfg, sources, gramsets, gram_paths, shapes, warnings, per_tensor, group_of, res) -> None:
    """Every weight with a Gram in every file joins the group of its shared inputs (group_of); the others are
    averaged (per_tensor), with a warning or an error for a missing Gram."""
    k = len(sources)
    excl = [re.compile(r) for r in cfg.regmean_exclude]
    mod_sets = [set(gs.modules()) for gs in gramsets]
    all_mods = set().union(*mod_sets)
    tied = _tied_modules(sources, gramsets, gram_paths, shapes, mod_sets)
    groups: dict[tuple, GroupItem] = {}
    for mod in sorted(tied, key=natural_key):
        warnings.append(f"{mod}.weight is tied to the embeddings and not stored; its Gram is not used")
    for mod in sorted(all_mods - tied, key=natural_key):
        p = f"{mod}.weight"
        if any(r.search(p) for r in excl):
            per_tensor[p] = TensorItem(p, "average", "regmean_exclude", _averaged(res[p]))
            continue
        lacking = [i for i in range(k) if mod not in mod_sets[i]]
        if lacking:
            i = lacking[0]
            where = _gram_where(gramsets[i], i, gram_paths[i])
            if not cfg.allow_missing_grams:
                raise MergeError(f"{where} has no Gram for {mod} (pass --allow-missing-grams to average it)")
            warnings.append(f"{p}: no Gram in {where}; averaged instead of RegMean")
            per_tensor[p] = TensorItem(p, "average", "missing Gram", _averaged(res[p]))
            continue
        keys, d_in, conv = _gram_keys(mod, p, shapes[p], gramsets, gram_paths)
        gkey = (keys, repr(res[p].describe()))  # members with other parameters (alpha by filter): another solve
        g = groups.get(gkey)
        if g is None:
            g = groups[gkey] = GroupItem([], [], [], keys, d_in, res[p])
        g.members.append(p)
        g.modules.append(mod)
        g.conv1d.append(conv)
        group_of[p] = g


def _gram_keys(mod: str, p: str, shp: tuple, gramsets, gram_paths):
    """The Grams of one weight, checked against it -> (per-file Gram keys, d_in, whether it is a Conv1D)."""
    if len(shp) != 2:
        raise MergeError(f"{p}: RegMean needs a 2-D weight, got shape {list(shp)}")
    conv = [bool(gs.is_conv1d(mod)) for gs in gramsets]
    if len(set(conv)) > 1:
        raise MergeError(f"Gram files disagree on whether {mod} is a Conv1D")
    d_in = shp[0] if conv[0] else shp[1]
    keys = []
    for i, gs in enumerate(gramsets):
        key = gs.gram_key(mod)
        where = _gram_where(gs, i, gram_paths[i])
        d = int(gs.dim(key))
        if d != d_in:
            raise MergeError(f"{where}: the Gram for {mod} has size {d}, but {p} takes inputs of size {d_in}")
        n = int(gs.count(key))
        if n <= 0:
            raise MergeError(f"{where}: the Gram for {mod} has token count {n}")
        keys.append(key)
    return tuple(keys), d_in, conv[0]


def _fisher_items(cfg, gramsets, gram_paths, float_names, warnings, per_tensor) -> None:
    """Every file holds a Fisher; a tensor without one in every file is averaged (or refused)."""
    for i, gs in enumerate(gramsets):
        if not getattr(gs, "has_fisher", False):
            raise MergeError(f"{_gram_where(gs, i, gram_paths[i])} has no Fisher information")
    known = [_fisher_names(gs) for gs in gramsets]
    if not all(s is not None for s in known):
        return
    for n in float_names:
        have = [n in s for s in known]
        if all(have):
            continue
        if not any(have):
            per_tensor[n] = TensorItem(n, "average", "no Fisher")
        elif cfg.allow_missing_grams:
            i = have.index(False)
            warnings.append(f"{n}: no Fisher in {_gram_where(gramsets[i], i, gram_paths[i])}; averaged")
            per_tensor[n] = TensorItem(n, "average", "missing Fisher")
        else:
            i = have.index(False)
            raise MergeError(f"{_gram_where(gramsets[i], i, gram_paths[i])} has no Fisher for {n} "
                             f"(pass --allow-missing-grams to average it)")


def _items_and_outputs(cfg, names, ref, group_of, per_tensor, res):
    """The work items in the model's tensor order (a group where its first member stands) and the output
    tensors (name, dtype, shape) in the order the items produce them."""
    items, outputs, emitted = [], [], set()
    out_dtype = cfg.torch_out_dtype()
    for n in names:
        if n in group_of:
            g = group_of[n]
            if id(g) in emitted:
                continue
            emitted.add(id(g))
            items.append(g)
        elif not ref.dtype(n).is_floating_point:
            items.append(TensorItem(n, "copy"))
        elif n in per_tensor:
            it = per_tensor[n]
            if it.resolved is None:
                it.resolved = _averaged(res[n]) if it.method != cfg.method else res[n]
            items.append(it)
        elif cfg.method == "regmean":  # embeddings, norms, biases: averaged, and reported as such
            items.append(TensorItem(n, "average", "no Gram", _averaged(res[n])))
        else:
            items.append(TensorItem(n, cfg.method, resolved=res[n]))
    for it in items:
        for n in it.outputs():
            dt = out_dtype if (out_dtype is not None and ref.dtype(n).is_floating_point) else ref.dtype(n)
            outputs.append((n, dt, tuple(ref.shape(n))))
    return items, outputs


def estimate_working_bytes(plan: Plan, sources, compute_dtype: torch.dtype, solve_dtype: torch.dtype, k: int) -> int:
    """A bound on the merge's working set, excluding the interpreter itself: the group buffers the engine
    keeps from group to group (each at its largest: A, the term S, M, the right-hand side, model 0's and the
    current model's stacked weights, the rows of W_i - W_0 being multiplied) plus the largest item's own
    transients (a mapped Gram, output copies; a per-tensor item's copies). The solve's buffers are counted in
    float64 whatever solve_dtype: any fp32 group solve may be redone in fp64 (solve.solve_group), in buffers
    of the same names."""
    from ..solve import DELTA_CHUNK_ELEMS

    ref = sources[0]
    ce = torch.empty((), dtype=compute_dtype).element_size()
    se = max(8, torch.empty((), dtype=solve_dtype).element_size())
    kept = {"A": 0, "S": 0, "M": 0, "Bt": 0, "W0": 0, "W": 0, "D": 0}
    worst = 0
    for it in plan.items:
        if isinstance(it, GroupItem):
            d = it.d_in
            width = sum(ref.shape(n)[1] if not c else ref.shape(n)[0] for n, c in zip(it.members, it.conv1d))
            wsize = max(ref.dtype(n).itemsize for n in it.members)
            rows = min(width, max(256, DELTA_CHUNK_ELEMS // max(d, 1)))
            for key, b in (("A", d * d * se), ("S", d * d * se), ("M", d * d * 4), ("Bt", width * d * se),
                           ("W0", width * d * max(wsize, ce)), ("W", width * d * max(wsize, ce)),
                           ("D", rows * d * se)):
                kept[key] = max(kept[key], b)
            b = d * d * 4 + d * width * (se + 4)
        else:
            shp = ref.shape(it.name)
            n = 1
            for s in shp:
                n *= s
            copies = {"ties": k + 4, "dare_ties": k + 4, "fisher": k + 4, "copy": 2}.get(it.method, 4)
            b = copies * n * ce
        worst = max(worst, b)
    return sum(kept.values()) + worst


# -- several processes (torchrun): which rank writes which shard --------------------------------------
IO_WEIGHT = 64  # flop-equivalents per element read, so that per-tensor items (I/O bound) are not free


def item_cost(item, sources, k: int) -> float:
    """Estimated cost of one plan item: a RegMean group d_in^3 + d_in^2 * d_out (+ its reads); any other
    tensor its k reads."""
    ref = sources[0]
    if isinstance(item, GroupItem):
        from ..distributed import group_cost

        width = sum(ref.shape(n)[0] if not c else ref.shape(n)[1] for n, c in zip(item.members, item.conv1d))
        return group_cost(item.d_in, width, k) + IO_WEIGHT * k * item.d_in * width
    n = 1
    for s in ref.shape(item.name):
        n *= int(s)
    return float(IO_WEIGHT * (1 if item.method == "copy" else k) * n)


def shard_owners(plan: Plan, layout, sources, world: int) -> list[int]:
    """The rank that writes each shard of `layout` (same on every rank): greedy bin packing of the shards
    by the cost of the items they need (an item cut by a shard boundary counts, and is computed, in both)."""
    from ..distributed import assign_greedy

    shard_of = {name: j for j, (_, ents) in enumerate(layout.shards) for name, _, _ in ents}
    costs = [0.0] * len(layout.shards)
    k = len(sources)
    for it in plan.items:
        c = item_cost(it, sources, k)
        for j in sorted({shard_of[n] for n in it.outputs()}):
            costs[j] += c
    return assign_greedy(costs, world)
