"""--sequential: Grams of a decoder bigger than the device, one block at a time (GPTQ-style).

The model is built on the meta device; each part is materialised from the memory-mapped safetensors
only for its turn, then freed. Hidden states of all batches live on the host between blocks. One
pass of the real model with every decoder block replaced by an identity records what each block is
called with (causal / sliding-window masks, rotary position embeddings, position ids), so nothing
about masks is re-implemented here. Peak device memory: one block plus one batch of activations.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from .fileformat import GramsError

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def sequential_supported(config) -> tuple[bool, str]:
    mt = getattr(config, "model_type", None)
    if mt not in SUPPORTED_TYPES:
        return False, f"model type {mt!r} is not one of {', '.join(SUPPORTED_TYPES)}"
    archs = getattr(config, "architectures", None) or []
    if archs and not (archs[0].endswith("ForCausalLM") or archs[0].endswith("Model")):
        return False, f"architecture {archs[0]} (only the causal LM and the bare model are run block by block)"
    return True, ""


class _WeightReader:
    """Tensor name -> tensor, read from the (possibly sharded) safetensors of a model folder by mmap."""

    def __init__(self, model_dir: str):
        from safetensors import safe_open

        idx = os.path.join(model_dir, "model.safetensors.index.json")
        if os.path.isfile(idx):
            with open(idx) as f:
                wm = json.load(f)["weight_map"]
            self.where = {k: os.path.join(model_dir, v) for k, v in wm.items()}
        else:
            files = [os.path.join(model_dir, f) for f in sorted(os.listdir(model_dir)) if f.endswith(".safetensors")]
            self.where = {}
            for fn in files:
                with safe_open(fn, framework="pt") as f:
                    for k in f.keys():
                        self.where[k] = fn
        self._open = {}

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        fn = self.where.get(name)
        if fn is None:
            raise GramsError(f"--sequential: weight {name!r} is not in the model's safetensors")
        if fn not in self._open:
            self._open[fn] = safe_open(fn, framework="pt")
        return self._open[fn].get_tensor(name)


def _materialize(module: torch.nn.Module, prefix: str, reader: _WeightReader, device, dtype) -> None:
    module.to_empty(device=device)
    with torch.no_grad():
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            key = f"{prefix}.{name}" if prefix else name
            if key not in reader.where and name in dict(module.named_buffers()):
                continue  # non-persistent buffer: recomputed by its module
            t = reader.get(key)
            p.data = t.to(device=device, dtype=dtype if p.is_floating_point() else p.dtype)


def _free(module: torch.nn.Module) -> None:
    module.to_empty(device="meta")


def _to(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def run_sequential(model_dir, config, batches, device, dtype, include=None, exclude=None, include_padding=False,
                   share_inputs=True, progress=True, fisher=False, trust_remote_code=False):
    """-> (GramCollector with every Gram, None). batches: data.Batch objects."""
    from .collect import GramCollector
    from .command import meta_model

    if fisher:
        raise GramsError("--fisher needs whole-model mode (drop --sequential)")
    model = meta_model(config, trust_remote_code)
    model.eval()
    base = getattr(model, getattr(model, "base_model_prefix", "model"), model)
    base_prefix = getattr(model, "base_model_prefix", "model") if base is not model else ""
    pre = (base_prefix + ".") if base_prefix else ""
    layers = base.layers
    collector = GramCollector(model, include=include, exclude=exclude, include_padding=include_padding,
                              share_inputs=share_inputs)
    reader = _WeightReader(model_dir)

    # --- 1. embeddings + one pass with identity blocks: the host cache of hidden states and block kwargs
    _materialize(base.embed_tokens, pre + "embed_tokens", reader, device, dtype)
    _materialize(base.norm, pre + "norm", reader, device, dtype)
    with torch.device(device):  # its inv_freq is a non-persistent buffer: recompute it, as loading does
        base.rotary_emb = type(base.rotary_emb)(config=config)
    calls: list = []
    saved_forwards = []

    def make_stub(i):
        def stub(hidden_states, *args, **kwargs):
            calls.append((i, hidden_states, args, kwargs))
            return hidden_states

        return stub

    for i, layer in enumerate(layers):
        saved_forwards.append(layer.forward)
        layer.forward = make_stub(i)
    hidden: list[torch.Tensor] = []
    layer_kwargs: list[list] = []  # per batch: per layer (args, kwargs) on the host
    try:
        with torch.no_grad():
            for b in batches:
                calls.clear()
                kw = {k: v.to(device) for k, v in b.model_kwargs().items()}
                base(**kw, use_cache=False)
                hidden.append(calls[0][1].to("cpu"))
                memo: dict = {}

                def host(o):
                    if torch.is_tensor(o):
                        if id(o) not in memo:
                            memo[id(o)] = o.to("cpu")
                        return memo[id(o)]
                    if isinstance(o, (tuple, list)):
                        return type(o)(host(x) for x in o)
                    if isinstance(o, dict):
                        return {k: host(v) for k, v in o.items()}
                    return o

                layer_kwargs.append([(host(a), host(k)) for _, _, a, k in calls])
    finally:
        for layer, fwd in zip(layers, saved_forwards):
            del layer.forward
    _free(base.embed_tokens)
    if len(layer_kwargs[0]) != len(layers):
        raise GramsError("--sequential: the model did not call every decoder block once")

    # --- 2. block by block
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(layers) * len(batches), unit="batch", desc="grams (sequential)", file=sys.stderr)
    with collector, torch.no_grad():
        for li, layer in enumerate(layers):
            _materialize(layer, f"{pre}layers.{li}", reader, device, dtype)
            for bi, b in enumerate(batches):
                collector.begin_batch(b.attention_mask) if li == 0 else collector.begin_batch_same(b.attention_mask)
                args, kwargs = layer_kwargs[bi][li]
                out = layer(hidden[bi].to(device), *_to(args, device), **_to(kwargs, device))
                if isinstance(out, (tuple, list)):
                    out = out[0]
                hidden[bi] = out.to("cpu")
                if bar is not None:
                    bar.update(1)
            collector.finish()
            _free(layer)
            collector.offload_to("cpu")
        # --- 3. final norm and whatever reads it (the LM head): only its input is needed
        heads = [n for n in collector.order if not n.startswith(f"{pre}layers.")]
        for bi, b in enumerate(batches):
            collector.begin_batch_same(b.attention_mask)
            x = base.norm(hidden[bi].to(device))
            for n in heads:
                collector.observe(n, x)
        collector.finish()
    if bar is not None:
        bar.close()
    _free(base.norm)
    collector.offload_to("cpu")
    return collector, None
