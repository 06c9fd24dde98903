"""--sequential: Grams of a decoder bigger than the device, one block at a time (GPTQ-style).

The model is built on the meta device; each part is materialised from the memory-mapped safetensors
only for its turn, then freed. Hidden states of all batches live on the host between blocks. One
pass of the real model with every decoder block replaced by an identity records what each block is
called with (causal / sliding-window masks, rotary position embeddings, position ids), so nothing
about masks is re-implemented here. Peak device memory: one block plus one batch of activations.
A run stops and resumes at any (part, batch) position: see SequentialRun.
"""

from __future__ import annotations

import os
import sys

import torch

from .fileformat import GramsError

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
# Models run by the generic path (RegMean++ only): everything outside the blocks materialised for the whole
# run (small models: the embeddings and heads of each model stay in memory), the model's own forward run with
# its blocks replaced to find what they are called with and to run what follows them.
GENERIC_TYPES = ("bert", "roberta", "gpt2")
LAYER_PATHS = ("layers", "h", "encoder.layer")  # where a base model keeps its blocks


def sequential_supported(config, generic: bool = False) -> tuple[bool, str]:
    """generic: the encoders and GPT-2 too (GENERIC_TYPES, any head), as RegMean++ runs them."""
    mt = getattr(config, "model_type", None)
    if generic and mt in GENERIC_TYPES:
        return True, ""
    if mt not in SUPPORTED_TYPES:
        types = SUPPORTED_TYPES + (GENERIC_TYPES if generic else ())
        return False, f"model type {mt!r} is not one of {', '.join(types)}"
    archs = getattr(config, "architectures", None) or []
    if archs and not (archs[0].endswith("ForCausalLM") or archs[0].endswith("Model")):
        return False, f"architecture {archs[0]} (only the causal LM and the bare model are run block by block)"
    return True, ""


class _WeightReader:
    """Tensor name -> tensor, read from a model folder (sharded safetensors, or pytorch_model.bin read
    weights-only) through io.hf.ModelFolder, with a LoRA adapter folded in when one is given (io.lora)."""

    def __init__(self, model_dir: str, adapter: str | None = None):
        from ..io.lora import open_model

        self.folder = open_model(model_dir, adapter)
        self.where = set(self.folder.names())

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise GramsError(f"--sequential: weight {name!r} is not in the model's checkpoint")
        return self.folder.get(name)


class TensorOverlay:
    """A _WeightReader with some tensors replaced by ones held in memory (RegMean++: the merged ones); with
    reader None, a reader of those tensors alone (a model's state dict)."""

    def __init__(self, reader, tensors: dict):
        self.reader, self.tensors = reader, tensors
        self.where = set(reader.where if reader is not None else ()) | set(tensors)  # the names it can give

    def get(self, name: str) -> torch.Tensor:
        t = self.tensors.get(name)
        if t is not None:
            return t
        if self.reader is None:
            raise GramsError(f"--sequential: weight {name!r} is not in the model's state dict")
        return self.reader.get(name)


def _materialize(module: torch.nn.Module, prefix: str, reader: _WeightReader, device, dtype, init=None,
                 recurse: bool = True, skip=()) -> None:
    """Allocate module on device and read its weights. Buffers no checkpoint holds (Gemma-3's embed_scale, a
    rotary inv_freq) are set as loading sets them, by the model's own init(submodule) (its _init_weights),
    before the weights are read over whatever that initialised; to_empty leaves them as garbage.
    recurse=False: the module's own parameters and buffers only; skip: full names not read (tied weights)."""
    module.to_empty(device=device, recurse=recurse)

    def key(name):
        return f"{prefix}.{name}" if prefix else name

    buffers = dict(module.named_buffers(recurse=recurse))
    with torch.no_grad():
        for sub_name, sub in (module.named_modules() if recurse else [("", module)]):
            own = [n for n, _ in sub.named_buffers(recurse=False)
                   if key(f"{sub_name}.{n}" if sub_name else n) not in reader.where]
            if own:
                if init is None:
                    raise GramsError(f"--sequential: {key(sub_name or own[0])} has buffers that the checkpoint "
                                     "does not hold and nothing initialises")
                init(sub)
        for name, p in list(module.named_parameters(recurse=recurse)) + list(buffers.items()):
            if name in buffers and key(name) not in reader.where or key(name) in skip:
                continue  # initialised above, or tied
            t = reader.get(key(name))
            p.data = t.to(device=device, dtype=dtype if p.is_floating_point() else p.dtype)


def _attr(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
    return obj


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


class SequentialRun:
    """The blocks over the batches, resumable at any (part, batch) position.

    Parts 0..L-1 are the decoder blocks, part L the final norm and what reads it (the LM head). The
    position is the next (part, batch) to run: hidden[b] is the input of that part for b >= batch and of
    the next part for b < batch. So the Grams so far, the position and the host cache of hidden states are
    all a checkpoint needs (checkpoint_extra / load_checkpoint); the block arguments (masks, rotary
    embeddings) are recomputed by the cheap identity pass instead of being stored.
    """

    def __init__(self, model_dir, config, batches, device, dtype, include=None, exclude=None,
                 include_padding=False, share_inputs=True, trust_remote_code=False, reader=None, adapter=None):
        from ..io.models import meta_model
        from .collect import GramCollector

        self.model = meta_model(config, trust_remote_code, dtype).eval()
        prefix = getattr(self.model, "base_model_prefix", "model")
        self.base = getattr(self.model, prefix, self.model)
        self.pre = f"{prefix}." if self.base is not self.model and prefix else ""
        self.generic = getattr(config, "model_type", None) not in SUPPORTED_TYPES
        self.layers_path = next((p for p in LAYER_PATHS if isinstance(_attr(self.base, p), torch.nn.ModuleList)),
                                None)
        if self.layers_path is None:
            raise GramsError("--sequential: no list of blocks found in the model (looked for "
                             f"{', '.join(LAYER_PATHS)})")
        self.layers = _attr(self.base, self.layers_path)
        self.blocks_prefix = f"{self.pre}{self.layers_path}."  # the blocks' tensor names start with it
        self.collector = GramCollector(self.model, include=include, exclude=exclude,
                                       include_padding=include_padding, share_inputs=share_inputs)
        self.config, self.batches, self.device, self.dtype = config, batches, device, dtype
        # reader: weights in memory; adapter: a LoRA adapter folder folded into model_dir's weights
        self.reader = reader if reader is not None else _WeightReader(model_dir, adapter)
        self.init = getattr(self.model, "_init_weights", None)  # for buffers no checkpoint holds
        self.part, self.batch = (0, 0) if batches else (self.n_parts, 0)  # no batches: nothing to run
        self.hidden: list[torch.Tensor] | None = None  # per batch, on the host
        self._layer_kwargs: list | None = None  # per batch: per block (args, kwargs), on the host

    @property
    def n_parts(self) -> int:
        return len(self.layers) + 1

    @property
    def complete(self) -> bool:
        return self.part >= self.n_parts

    def position(self) -> str:
        """Where the run stands, for messages."""
        L, n = len(self.layers), len(self.batches)
        if self.complete:
            return "the end"
        part = f"decoder block {self.part + 1} of {L}" if self.part < L else "the final norm and LM head"
        return f"{part}, batch {self.batch + 1} of {n}"

    # ---- checkpoints
    def checkpoint_extra(self) -> dict:
        """The position and, unless complete, the hidden states (extra for checkpoint.write_checkpoint)."""
        hidden = {} if self.complete or self.hidden is None else \
            {f"hidden.{i}": h for i, h in enumerate(self.hidden)}
        return {"part": self.part, "batch": self.batch, "_tensors": hidden}

    def load_checkpoint(self, state: dict, tensors: dict, where: str, signature: str | None = None) -> None:
        """Continue from a checkpoint's state (validated against this run: one-line GramsError; signature: the
        run's, which the work files of spilled Grams must carry)."""
        def bad(why):
            return GramsError(f"checkpoint {where} does not fit this run ({why}); delete it or rerun the command "
                              "that wrote it")

        try:
            part, batch = int(state["part"]), int(state["batch"])
        except (KeyError, TypeError, ValueError):
            raise bad("no sequential position") from None
        n = len(self.batches)
        if not (0 <= part < self.n_parts and 0 <= batch < n or part == self.n_parts and batch == 0):
            raise bad(f"position part {part}, batch {batch} of {self.n_parts} parts, {n} batches")
        hidden = None
        if part < self.n_parts:
            hidden = [tensors.get(f"hidden.{i}") for i in range(n)]
            d = self.config.hidden_size
            for i, (h, b) in enumerate(zip(hidden, self.batches)):
                want = (*b.attention_mask.shape, d)
                if h is None or tuple(h.shape) != want or h.dtype != self.dtype:
                    got = "missing" if h is None else f"{tuple(h.shape)} {h.dtype}"
                    raise bad(f"hidden states of batch {i}: {got}, expected {want} {self.dtype}")
            if len(tensors) != n:
                raise bad(f"{len(tensors)} hidden-state tensors for {n} batches")
        self.collector.load_state(state, device="cpu", signature=signature)  # finished parts' stay on the host
        self.part, self.batch, self.hidden = part, batch, hidden

    # ---- running
    def _materialize_rest(self) -> None:
        """The generic path: every module outside the blocks, from this run's reader (tied weights re-tied)."""
        model = self.model
        named = {n for n, _ in model.named_parameters()}
        tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - named
        blocks = self.blocks_prefix.rstrip(".")
        for name, mod in model.named_modules():
            if name == blocks or name.startswith(self.blocks_prefix):
                continue
            if any(True for _ in mod.parameters(recurse=False)) or any(True for _ in mod.buffers(recurse=False)):
                _materialize(mod, name, self.reader, self.device, self.dtype, self.init, recurse=False, skip=tied)
        if tied:
            model.tie_weights()

    def _prepare(self) -> None:
        """Embeddings + one pass with identity blocks: what each block is called with, and (when starting
        afresh) the hidden states entering block 0."""
        base, dev = self.base, self.device
        if self.generic:
            self._materialize_rest()
        else:
            _materialize(base.embed_tokens, self.pre + "embed_tokens", self.reader, dev, self.dtype, self.init)
            _materialize(base.norm, self.pre + "norm", self.reader, dev, self.dtype, self.init)
            with torch.device(dev):  # its inv_freq is a non-persistent buffer: recompute it, as loading does
                base.rotary_emb = type(base.rotary_emb)(config=self.config)
        calls: list = []

        def make_stub(i):
            def stub(hidden_states, *args, **kwargs):
                calls.append((i, hidden_states, args, kwargs))
                return hidden_states

            return stub

        for i, layer in enumerate(self.layers):
            layer.forward = make_stub(i)  # an instance attribute over the class's forward, deleted below
        fresh = self.hidden is None  # resumed: the checkpoint's hidden states, not a second copy
        hidden: list[torch.Tensor] = []
        self._layer_kwargs = []
        try:
            with torch.no_grad():
                for b in self.batches:
                    calls.clear()
                    kw = {k: v.to(dev) for k, v in b.model_kwargs().items()}
                    self.model(**kw, **self._no_cache()) if self.generic else base(**kw, use_cache=False)
                    if fresh:
                        hidden.append(calls[0][1].to("cpu").contiguous())
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

                    self._layer_kwargs.append([(host(a), host(k)) for _, _, a, k in calls])
        finally:
            for layer in self.layers:
                del layer.forward
        if not self.generic:
            _free(base.embed_tokens)
        if len(self._layer_kwargs[0]) != len(self.layers):
            raise GramsError("--sequential: the model did not call every block once")
        if fresh:
            self.hidden = hidden

    def part_keys(self, li: int) -> list[str]:
        """The Gram keys that part li accumulates."""
        blocks = self.blocks_prefix
        if li < len(self.layers):
            return [k for k in self.collector.grams if k.startswith(f"{blocks}{li}.")]
        return [k for k in self.collector.grams if not k.startswith(blocks)]

    def run(self, stop, on_part_done=None, progress: bool = True) -> None:
        """From the current position until complete or stop.flag (checked before every batch; stop.step()
        after every batch). on_part_done(li) after each finished part."""
        if self.complete:
            return
        self.prepare()
        bar = None
        if progress:
            from tqdm.auto import tqdm

            n = len(self.batches)
            bar = tqdm(total=self.n_parts * n, initial=self.part * n + self.batch, unit="batch",
                       desc="grams (sequential)", file=sys.stderr)
        with self.collector, torch.no_grad():
            while not self.complete and not stop.flag:
                li = self.part
                self.run_part(stop, bar)
                if self.part == li:
                    break  # stopped mid-part
                if on_part_done is not None:
                    on_part_done(li)
        if bar is not None:
            bar.close()
        self.finish()

    def prepare(self) -> None:
        """What run() does first; public for callers that step through the parts themselves (RegMean++)."""
        self._prepare()

    def finish(self) -> None:
        """Free what prepare() materialised; the hidden states go once complete."""
        _free(self.model if self.generic else self.base.norm)
        if self.complete:
            self.hidden = None

    def run_part(self, stop, bar=None, advance: bool = True) -> None:
        """The current part over the batches from the current position, accumulating its Grams (the collector
        attached): the position moves to the next part when every batch is done. advance=False leaves the
        hidden states as they were (RegMean++ sends them through the merged block instead: advance())."""
        L, n, dev, c = len(self.layers), len(self.batches), self.device, self.collector
        li = self.part
        layer = self.layers[li] if li < L else None
        if layer is not None:
            _materialize(layer, f"{self.blocks_prefix}{li}", self.reader, dev, self.dtype, self.init)
        for k in self.part_keys(li):  # resumed mid-part: its Grams go back to the device
            c.grams[k] = c.grams[k].to(dev)
        heads = [m for m in c.order if not m.startswith(self.blocks_prefix)]
        for bi in range(self.batch, n):
            if stop.flag:
                break
            b = self.batches[bi]
            c.begin_batch(b.attention_mask) if li == 0 else c.begin_batch_same(b.attention_mask)
            if layer is not None:
                out = self._call_block(layer, li, bi)
                if advance:
                    self.hidden[bi] = out
            elif self.generic:  # the model's own code after the blocks, the hooks on its heads
                self._run_after_blocks(bi)
            else:  # the final norm and whatever reads it (the LM head): only its input is needed
                x = self.base.norm(self.hidden[bi].to(dev))
                for m in heads:
                    c.observe(m, x)
            self.batch = bi + 1
            if bar is not None:
                bar.update(1)
            stop.step()
        c.finish()
        if layer is not None:
            _free(layer)
        if self.batch < n:
            return  # stopped mid-part
        c.offload_to("cpu")
        self.part, self.batch = li + 1, 0

    def _no_cache(self) -> dict:
        """use_cache=False where the model takes it (GPT-2): a cache object would be one of the blocks' arguments,
        growing with every call."""
        import inspect

        return {"use_cache": False} if "use_cache" in inspect.signature(self.model.forward).parameters else {}

    def _run_after_blocks(self, bi: int) -> None:
        """The generic path's last part: the whole model on batch bi with its blocks replaced, the first by the
        cached final hidden states and the others by the identity, so only what follows them really runs."""
        final = self.hidden[bi].to(self.device)
        for i, layer in enumerate(self.layers):
            layer.forward = (lambda hidden_states, *a, **k: final) if i == 0 else \
                (lambda hidden_states, *a, **k: hidden_states)
        try:
            b = self.batches[bi]
            self.model(**{k: v.to(self.device) for k, v in b.model_kwargs().items()}, **self._no_cache())
        finally:
            for layer in self.layers:
                del layer.forward

    def _call_block(self, layer, li: int, bi: int) -> torch.Tensor:
        """Block li (the module `layer`) on batch bi's hidden states, with what the model calls it with -> its
        output hidden states, on the host."""
        dev = self.device
        args, kwargs = self._layer_kwargs[bi][li]
        out = layer(self.hidden[bi].to(dev), *_to(args, dev), **_to(kwargs, dev))
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.to("cpu").contiguous()

    def block_from(self, li: int, tensors: dict) -> torch.nn.Module:
        """Block li's module materialised on the device from `tensors` (full names; what they lack, from this
        run's weights): RegMean++'s merged block. Free it with free_block(li)."""
        layer = self.layers[li]
        _materialize(layer, f"{self.blocks_prefix}{li}", TensorOverlay(self.reader, tensors), self.device, self.dtype,
                     self.init)
        return layer

    def free_block(self, li: int) -> None:
        _free(self.layers[li])

    def advance(self, li: int, layer: torch.nn.Module) -> None:
        """Every batch's hidden states through `layer` standing in for block li (RegMean++: the merged block),
        the collector not counting."""
        with self.collector.paused(), torch.no_grad():
            for bi in range(len(self.batches)):
                self.hidden[bi] = self._call_block(layer, li, bi)

    def part_gramset(self, li: int):
        """The Grams part li accumulated, as an in-memory GramSet of its modules (fingerprint: their shapes)."""
        from .fileformat import GramSet

        c = self.collector
        c.finish()
        keys = set(self.part_keys(li))
        entries = {m: e for m, e in c.module_entries().items() if e["key"] in keys}
        fp = dict(c.fingerprint, weights={m: c.fingerprint["weights"][m] for m in entries})
        return GramSet.from_memory({k: c.grams[k] for k in keys}, {k: c.counts[k] for k in keys}, entries, fp)

    def spill_part(self, li: int, folder: str, signature: str) -> None:
        """Part li's Grams (finished) to a work file in `folder`: memory holds one block's Grams, not all. Nothing
        (no folder either) when this rank holds none of them (under torchrun they went to rank 0)."""
        keys = [k for k in self.part_keys(li) if torch.is_tensor(self.collector.grams[k])]
        if keys:
            os.makedirs(folder, exist_ok=True)
            self.collector.spill(keys, os.path.join(folder, f"part-{li:05d}.safetensors"), signature)

    def drop_part(self, li: int) -> None:
        """Forget part li's Grams (once merged: memory stays one block's Grams)."""
        for k in self.part_keys(li):
            del self.collector.grams[k]
            self.collector.counts.pop(k, None)
