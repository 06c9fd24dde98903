"""PEFT LoRA adapter folders (adapter_config.json + adapter_model.safetensors or .bin), folded into their base
model's tensors as they are read: W + scaling * B @ A, as peft's merge_and_unload computes it.

`AdaptedModel` is the base's io.hf.ModelFolder with the adapter applied to the tensors it targets, one tensor at a
time (nothing else is read or held); `fold_into_model` does the same to a model transformers has loaded (grams).
What peft can do but this does not (DoRA, other PEFT types, LoRA biases, convolutions, resized vocabularies) is
refused in one line (AdapterError)."""

from __future__ import annotations

import json
import math
import os
import re

import torch

from .hf import ModelFolder, ModelFolderError
from .safetensors_file import SafetensorsError, SafetensorsReader
from .torch_bin import TorchBinError, TorchBinReader

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # as peft saves them, safetensors first
KEY_PREFIX = "base_model.model."  # peft's saved keys: base_model.model.<module>.lora_A.weight
LORA_KEYS = {  # key suffix -> (kind, which factor)
    ".lora_A.weight": ("linear", "A"), ".lora_B.weight": ("linear", "B"),
    ".lora_embedding_A": ("embedding", "A"), ".lora_embedding_B": ("embedding", "B"),
}
# LoraConfig fields that change what merging means; set (truthy), the adapter is refused.
REFUSED_OPTIONS = {
    "use_dora": "DoRA (use_dora)", "lora_bias": "LoRA biases (lora_bias)", "layer_replication": "layer_replication",
    "target_parameters": "LoRA on parameters (target_parameters)", "trainable_token_indices": "trainable_token_indices",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)", "use_qalora": "QALoRA (use_qalora)",
}


class AdapterError(ModelFolderError):
    """A LoRA adapter folder that cannot be folded into its base (one line for the user)."""


def is_adapter_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def read_adapter_config(path: str) -> dict:
    """The adapter folder's adapter_config.json, checked to be a LoRA adapter this can fold in."""
    cfg_path = os.path.join(path, ADAPTER_CONFIG)
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
        if not isinstance(cfg, dict):
            raise ValueError("not a mapping")
    except (OSError, ValueError) as e:
        raise AdapterError(f"unreadable {cfg_path} ({e})") from None
    kind = cfg.get("peft_type")
    if kind != "LORA":
        raise AdapterError(f"adapter {path}: peft_type {kind!r} is not supported (only LORA adapters are)")
    for key, what in REFUSED_OPTIONS.items():
        if cfg.get(key):
            raise AdapterError(f"adapter {path}: {what} is not supported; merge it with peft's merge_and_unload "
                               "and name that folder")
    for key in ("r", "lora_alpha"):
        if isinstance(cfg.get(key), bool) or not isinstance(cfg.get(key), (int, float)) or cfg[key] <= 0:
            raise AdapterError(f"adapter {path}: {ADAPTER_CONFIG} has no valid {key} ({cfg.get(key)!r})")
    return cfg


def adapter_base(path: str) -> str | None:
    """The base model its adapter_config.json names (base_model_name_or_path: a folder or a Hub id), or None."""
    base = read_adapter_config(path).get("base_model_name_or_path")
    return base if isinstance(base, str) and base else None


def _pattern_value(patterns: dict, module: str, default):
    """rank_pattern / alpha_pattern as peft reads them (peft.utils.other.get_pattern_key): the first pattern that
    matches the end of the module name, else the default."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _open_weights(path: str):
    for fname in ADAPTER_WEIGHTS:
        full = os.path.join(path, fname)
        if os.path.isfile(full):
            try:
                return TorchBinReader(full) if fname.endswith(".bin") else SafetensorsReader(full)
            except (SafetensorsError, TorchBinError) as e:
                raise AdapterError(str(e)) from None
    raise AdapterError(f"adapter {path}: no {' or '.join(ADAPTER_WEIGHTS)}")


class LoraAdapter:
    """An adapter folder's weights, by the base tensor each one changes: the LoRA pairs (with their scaling) and
    the full tensors it replaces (modules_to_save, saved embeddings). bind(base) checks them against the base."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        cfg = read_adapter_config(path)
        self.reader = _open_weights(path)
        self.pairs: dict[str, dict] = {}  # base tensor name -> {kind, A, B, scaling}
        self.replaced: dict[str, str] = {}  # base tensor name -> the adapter's key
        try:
            self._index(cfg)
        except BaseException:
            self.close()
            raise

    def _index(self, cfg: dict) -> None:
        factors: dict[str, dict] = {}
        for key in self.reader.keys():
            name = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key
            suffix = next((s for s in LORA_KEYS if name.endswith(s)), None)
            if suffix is None:
                if "lora_" in name or "modules_to_save." in name or "trainable_tokens" in name:
                    raise AdapterError(f"adapter {self.path}: tensor {key} is not supported (only lora_A / lora_B, "
                                       "lora_embedding_A / _B and whole replaced tensors are)")
                # modules_to_save / save_embedding_layers: the tensor itself (peft saves a targeted embedding's as
                # <module>.base_layer.weight and loads it into the base layer)
                self.replaced[name.replace(".base_layer.", ".")] = key
                continue
            kind, which = LORA_KEYS[suffix]
            module = name[: -len(suffix)]
            factors.setdefault(module, {"kind": kind})[which] = key
        for module, f in factors.items():
            if "A" not in f or "B" not in f:
                raise AdapterError(f"adapter {self.path}: {module} has lora_{'AB'['A' in f]} but not its pair")
            r = _pattern_value(cfg.get("rank_pattern"), module, cfg["r"])
            alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg["lora_alpha"])
            rank = self.reader.info(f["A"]).shape[0]
            if rank != r:
                raise AdapterError(f"adapter {self.path}: {module} has rank {rank} but {ADAPTER_CONFIG} says r={r}")
            scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            self.pairs[f"{module}.weight"] = dict(f, scaling=scaling, fan_in_fan_out=bool(cfg.get("fan_in_fan_out")))
        if not self.pairs and not self.replaced:
            raise AdapterError(f"adapter {self.path}: no LoRA tensors in its weights")

    def bind(self, base) -> None:
        """Every tensor it changes is in the base (a tensor source: names/shape), of a shape it fits; the LoRA pairs'
        orientation settled (a [in, out] Conv1D weight, as peft finds from the module's type)."""
        names = set(base.names())
        for name in list(self.pairs) + list(self.replaced):
            if name not in names:
                raise AdapterError(f"adapter {self.path}: it changes {name}, which is not a tensor of the base model "
                                   f"{getattr(base, 'path', '')}".rstrip())
        for name, key in self.replaced.items():
            got, want = tuple(self.reader.info(key).shape), tuple(base.shape(name))
            if got != want:
                raise AdapterError(f"adapter {self.path}: {key} is {list(got)}, the base's {name} {list(want)} "
                                   "(a resized vocabulary is not supported)")
        for name, p in self.pairs.items():
            a, b, w = tuple(self.reader.info(p["A"]).shape), tuple(self.reader.info(p["B"]).shape), \
                tuple(base.shape(name))
            if len(a) != 2 or len(b) != 2 or len(w) != 2 or a[0] != b[1]:
                raise AdapterError(f"adapter {self.path}: {name}: lora_A {list(a)} and lora_B {list(b)} do not fit "
                                   f"the base's {list(w)} (only 2-D LoRA: linear, Conv1D, embedding)")
            # B @ A is [out, in] for a linear layer ([in, out] stored by a Conv1D) and the transpose for an embedding
            prod = (b[0], a[1])
            if p["kind"] == "embedding":
                p["transpose"] = True
            elif prod[0] == prod[1]:  # square: only the config can say (peft saves the flag it set for Conv1D)
                p["transpose"] = p["fan_in_fan_out"]
            else:
                p["transpose"] = w == prod[::-1]
            if (prod[::-1] if p["transpose"] else prod) != w:
                raise AdapterError(f"adapter {self.path}: {name}: lora_B @ lora_A is {list(prod)}, which does not "
                                   f"fit the base's {list(w)}")

    def changes(self, name: str) -> bool:
        return name in self.pairs or name in self.replaced

    def names(self) -> list[str]:
        return list(dict.fromkeys(list(self.pairs) + list(self.replaced)))

    def apply(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The base's `weight` (as stored) with the adapter folded in, written into it: as peft's merge, the delta
        (B @ A, transposed when it must be, times scaling) in fp32, added in fp32 and cast to the weight's dtype."""
        if name in self.replaced:  # the tensor saved whole (a targeted embedding's base layer: then its LoRA too)
            weight.copy_(self.reader.get(self.replaced[name]))
        p = self.pairs.get(name)
        if p is None:
            return weight
        A = self.reader.get(p["A"]).to(torch.float32)
        B = self.reader.get(p["B"]).to(torch.float32)
        delta = B @ A
        if p["transpose"]:
            delta = delta.T
        delta = delta * p["scaling"]
        return weight.copy_(weight.to(torch.float32) + delta)

    def files(self) -> list[str]:
        return [os.path.join(self.path, ADAPTER_CONFIG), self.reader.path]

    def close(self) -> None:
        self.reader.close()


class AdaptedModel:
    """A base model folder with a LoRA adapter folded in, through io.hf.ModelFolder's tensor-source protocol:
    names, shapes and dtypes are the base's; get(name) reads the base tensor and, when the adapter changes it,
    folds the adapter in (only those tensors pay)."""

    def __init__(self, base_dir: str, adapter_dir: str):
        self.base = ModelFolder(base_dir)
        try:
            self.adapter = LoraAdapter(adapter_dir)
            self.adapter.bind(self.base)
        except BaseException:
            self.close()
            raise
        self.path, self.config, self.adapter_path = self.base.path, self.base.config, self.adapter.path

    def names(self):
        return self.base.names()

    def info(self, name):
        return self.base.info(name)

    def shape(self, name):
        return self.base.shape(name)

    def dtype(self, name):
        return self.base.dtype(name)

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        t = self.base.get(name, out)
        return self.adapter.apply(name, t) if self.adapter.changes(name) else t

    def files(self) -> list[str]:
        return self.base.files() + self.adapter.files()

    def close(self) -> None:
        self.base.close()
        if getattr(self, "adapter", None) is not None:
            self.adapter.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_model(folder: str, adapter: str | None = None):
    """A model's tensor source: its folder (io.hf.ModelFolder), or with `adapter` that base with the adapter
    folded in (AdaptedModel)."""
    return ModelFolder(folder) if adapter is None else AdaptedModel(folder, adapter)


def fold_into_model(model: torch.nn.Module, source: AdaptedModel) -> None:
    """A model transformers loaded from the adapter's base, given the adapted tensors (each cast to the dtype the
    model was loaded in): the same model as loading the folder peft's merge_and_unload saves."""
    params = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name in source.adapter.names():
            p = params.get(name)
            if p is None:
                raise AdapterError(f"adapter {source.adapter_path}: {name} is not a parameter of the loaded model")
            p.copy_(source.get(name).to(device=p.device, dtype=p.dtype))
