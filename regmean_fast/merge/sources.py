"""In-memory tensor sources and Gram sets, for merging models that are already loaded (FusionBench-style)."""

from __future__ import annotations

import torch

from .. import ops
from ..grams.fileformat import check_gram_stats


class StateDictSource:
    """A state dict seen through the same protocol as io.ModelFolder (names/shape/dtype/get).

    Tensors that are one tensor under two names (tied weights: GPT-2's lm_head is its wte) are seen
    once, under the first name, as a checkpoint stores them; `tied` maps each other name to that one."""

    def __init__(self, state_dict: dict, config: dict | None = None):
        self.sd, self.tied, first = {}, {}, {}
        for k, v in state_dict.items():
            if not isinstance(v, torch.Tensor):
                continue
            same = (v.device, v.dtype, tuple(v.shape), tuple(v.stride()), v.storage_offset(),
                    v.untyped_storage().data_ptr()) if v.numel() and v.device.type != "meta" else None
            if same is not None and same in first:
                self.tied[k] = first[same]
                continue
            first.setdefault(same, k)
            self.sd[k] = v
        self.config = config
        self.path = None

    def names(self):
        return list(self.sd)

    def shape(self, name):
        return tuple(self.sd[name].shape)

    def dtype(self, name):
        return self.sd[name].dtype

    def get(self, name, out=None):
        if out is not None:
            return out.copy_(self.sd[name].detach())
        return self.sd[name].detach().to("cpu", copy=True)

    def files(self):
        return []

    def close(self):
        pass


class DictGramSet:
    """Grams held in memory, with the same read interface as regmean_fast.load_grams' GramSet.

    grams: key -> symmetric [d, d] tensor (raw sum, or an already normalised Gram with counts=None);
    module_map: module -> key (default: every key is its own module); counts: key -> tokens, one int
    for all, or None (treated as 1, so "mean" normalisation leaves the Grams as given);
    conv1d: modules whose weight is stored [in, out]; fisher: parameter -> diagonal Fisher.
    """

    def __init__(self, grams: dict, counts=None, module_map: dict | None = None, conv1d=(), fisher: dict | None = None,
                 fingerprint: dict | None = None):
        self._grams = dict(grams)
        self._map = dict(module_map) if module_map is not None else {k: k for k in self._grams}
        for m, k in self._map.items():
            if k not in self._grams:
                raise ValueError(f"module {m} maps to unknown Gram {k}")
        if counts is None or isinstance(counts, int):
            self._counts = {k: int(counts or 1) for k in self._grams}
        else:
            self._counts = {k: int(counts[k]) for k in self._grams}
        self._conv1d = set(conv1d)
        self._fisher = dict(fisher or {})
        self.fingerprint = fingerprint or {}
        self.metadata = {}

    def _key(self, name):
        return self._map.get(name, name)

    def modules(self):
        return list(self._map)

    def gram_key(self, module):
        return self._map[module]

    def groups(self):
        out = {}
        for m, k in self._map.items():
            out.setdefault(k, []).append(m)
        return out

    def gram(self, name):
        G = self.raw_gram(name)
        self.check_gram(name, ops.symmetry_stats(G))
        return G.clone()

    def raw_gram(self, name):
        """gram(name) before the value checks (see GramSet.raw_gram); may share memory with the dict's
        tensor (read only)."""
        return self._grams[self._key(name)].detach().to(torch.float32).contiguous()

    def check_gram(self, name, stats):
        key = self._key(name)
        check_gram_stats(stats, self.dim(name), f"Gram {key!r}")

    def count(self, name):
        return self._counts[self._key(name)]

    def dim(self, name):
        return int(self._grams[self._key(name)].shape[0])

    def is_conv1d(self, module):
        return module in self._conv1d

    @property
    def has_fisher(self):
        return bool(self._fisher)

    def fisher_params(self):
        return list(self._fisher)

    def fisher(self, param):
        f = self._fisher.get(param)
        return None if f is None else f.detach().to(torch.float32, copy=True)
