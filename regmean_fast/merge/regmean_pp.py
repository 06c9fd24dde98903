"""RegMean++ (Nguyen et al. 2025, arXiv 2508.03121): RegMean whose Grams of block l are taken from each model's
calibration data passed through the ALREADY MERGED parts before it, then through the model's own block l.

Block by block, on the machinery of `grams --sequential` (grams/sequential.py) and RegMean's group solve (the
merge engine on a per-part plan):

    1. the tensors outside the decoder blocks and the heads (embeddings, final norm) are averaged, as RegMean
       does; each model's data goes through the merged embeddings, its hidden states cached on the host;
    2. per block l: every model runs its own block l on its hidden states, the collector summing the block's
       Grams (padding excluded, shared inputs once); the block is merged by RegMean's plan and engine; every
       model's hidden states then go through the MERGED block (as written, in the output dtype);
    3. the heads (lm_head): each model's hidden states through the merged final norm, that is exactly what the
       merged model's head reads, give the heads' Grams; merged by RegMean.

Peak memory: one block of one model at a time (materialised from the memory-mapped safetensors), the merged
block, one block's Grams per model, the cached hidden states. The merged tensors are written as each part is
done, in a layout fixed up front (the output transaction of merge/api.py)."""

from __future__ import annotations

import copy
import re
import sys

import torch

from ..grams.fileformat import GramsError
from ..io.models import ModelLoadError
from .errors import MergeError
from .methods import METHODS
from .plan import Plan, TensorItem, build_plan, check_same_architecture, natural_key
from .sources import DictGramSet


class _NoStop:
    """grams' Stop without its Ctrl-C handler: in a merge Ctrl-C raises, and the output transaction keeps the
    finished shards for --resume."""

    flag = False

    def step(self) -> None:
        pass


class _Subset:
    """A tensor source (io.ModelFolder) seen through some of its names: one part's plan and engine."""

    def __init__(self, src, names):
        self.src, self._names = src, list(names)
        self.config, self.path = src.config, getattr(src, "path", None)

    def names(self):
        return list(self._names)

    def shape(self, name):
        return self.src.shape(name)

    def dtype(self, name):
        return self.src.dtype(name)

    def get(self, name, out=None):
        return self.src.get(name, out=out)

    def files(self):
        return self.src.files()

    def close(self):
        pass


def _error(where: str, e: BaseException) -> MergeError:
    return MergeError(f"{where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


def _batches(path: str, spec, config, options: dict) -> list:
    """Model `path`'s data file read, tokenized with its own tokenizer and batched as `grams` does."""
    from ..grams import data as D
    from ..grams.job import resolve_max_length
    from ..io import models

    tokenizer = models.load_tokenizer(path, False)
    max_length = resolve_max_length(config, options["max_length"])
    examples = D.read_examples(spec.data, None, options["text_field"], None, limit=options["max_examples"])
    ids = D.tokenize(tokenizer, examples, max_length, spec.data)
    return D.make_batches(ids, options["batch_size"], D.pad_id_of(tokenizer), longest_first=True)


class RegMeanPlusPlusJob:
    """prepare(): everything checked and read that can be before any merging (configs, data, the parts and
    the output order); run(write): the merge, part by part."""

    def __init__(self, cfg, sources, in_memory=None):
        """in_memory: per model (transformers config, data.Batch list, weight reader) for models already loaded
        (merge_modules); else each model's folder, data file and tokenizer per cfg."""
        self.cfg, self.sources, self.in_memory = cfg, sources, in_memory
        self.runs = []
        self.parts: list[tuple[str, list]] = []  # (what, tensor names in write order)
        self.plan: Plan | None = None

    # -- prepare -----------------------------------------------------------------------------------------
    def prepare(self) -> "RegMeanPlusPlusJob":
        from ..distributed import env_world

        cfg = self.cfg
        if env_world()[0] > 1:
            raise MergeError("regmean++ runs in one process (torchrun is not supported for it yet)")
        if cfg.max_memory not in (None, ""):
            raise MergeError("--max-memory is not available for regmean++ yet (its working set holds the cached "
                             "hidden states of every model's data)")
        names = check_same_architecture(self.sources)
        self.runs = [self._run_of(i) for i in range(len(self.sources))]
        self.parts = self._parts(names)
        self.plan = self._skeleton_plan()
        return self

    def _run_of(self, i: int):
        """Model i's block-by-block run over its data (nothing materialised yet)."""
        from ..grams.sequential import SequentialRun, sequential_supported
        from ..io import models

        cfg, spec = self.cfg, self.cfg.models[i]
        where = f"model {i} ({spec.model})"
        models.quiet_transformers()
        try:
            config, batches, reader = self.in_memory[i] if self.in_memory else \
                (models.load_config(spec.model, False), None, None)
            ok, why = sequential_supported(config, generic=True)
            if not ok:
                raise MergeError(f"{where}: regmean++ runs models block by block: {why}")
            if batches is None:
                batches = _batches(spec.model, spec, config, cfg.calibration_options())
            return SequentialRun(spec.model, config, batches, device=torch.device(cfg.device), dtype=cfg.torch_dtype(),
                                 reader=reader)
        except (GramsError, ModelLoadError) as e:
            raise _error(where, e) from None

    def _parts(self, names: list) -> list:
        """The tensors by part, in the order they are merged and written: the rest (embeddings, final norm),
        each decoder block, the heads (linear modules outside the blocks that read the final hidden states)."""
        run = self.runs[0]
        blocks = run.blocks_prefix
        heads = [m for m in run.collector.order if not m.startswith(blocks)]
        block_re = re.compile(re.escape(blocks) + r"(\d+)\.")
        by_block: list[list] = [[] for _ in run.layers]
        head_names, rest = [], []
        for n in names:
            m = block_re.match(n)
            if m:
                by_block[int(m.group(1))].append(n)
            elif any(n.startswith(f"{h}.") for h in heads):
                head_names.append(n)
            else:
                rest.append(n)
        parts = [("the embeddings and norms", rest)]
        parts += [(f"decoder block {li}", ns) for li, ns in enumerate(by_block)]
        if head_names:
            parts.append(("the heads", head_names))
        return parts

    def _skeleton_plan(self) -> Plan:
        """The plan as far as it is known up front: every tensor's place in the output (its item says
        regmean++); the solve groups of each part are made when its Grams are (run())."""
        cfg, ref = self.cfg, self.sources[0]
        params = METHODS[cfg.method].check_params(dict(cfg.parameters))
        raw = cfg.weights()
        coeffs = [w / sum(raw) for w in raw]
        out_dtype = cfg.torch_out_dtype()
        items, outputs = [], []
        for _, names in self.parts:
            for n in names:
                dt = out_dtype if (out_dtype is not None and ref.dtype(n).is_floating_point) else ref.dtype(n)
                items.append(TensorItem(n, cfg.method))
                outputs.append((n, dt, tuple(ref.shape(n))))
        return Plan(items, outputs, cfg.method, params, coeffs, raw)

    def signature_extra(self) -> dict:
        """What else makes the merge: the calibration settings (the data files' stats are the caller's)."""
        return {"calibration": self.cfg.calibration_options()}

    # -- run ---------------------------------------------------------------------------------------------
    def run(self, write, progress: bool = False) -> dict:
        """Merge part by part, write(name, tensor in the output dtype) in the skeleton plan's order
        -> {name: report entry}."""
        from ..grams.sequential import TensorOverlay

        cfg, runs, stop = self.cfg, self.runs, _NoStop()
        sub_cfg = copy.deepcopy(cfg)
        sub_cfg.method, sub_cfg.calibration = "regmean", {}
        for m in sub_cfg.models:
            m.data = None
        self._scratch: dict = {}  # the engine's group buffers, shared by the parts' engines
        self._items: list = []
        report: dict = {}
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(self.parts), desc="merging (regmean++)", unit="part", file=sys.stderr)
        parts = iter(self.parts)

        def merge_next(gramsets):
            _, names = next(parts)
            merged, rep = self._merge_part(sub_cfg, names, gramsets, write)
            report.update(rep)
            if bar is not None:
                bar.update(1)
            return merged

        merged = merge_next(None)
        for r in runs:  # the data enters through the merged embeddings (and the heads read the merged norm)
            r.reader = TensorOverlay(r.reader, merged)
            r.prepare()
        with torch.no_grad():
            for li in range(len(runs[0].layers)):
                merged = merge_next([self._collect(r, stop) for r in runs])
                for r in runs:
                    r.drop_part(li)
                layer = runs[0].block_from(li, merged)  # the merged block, standing in for every model's
                for r in runs:
                    r.advance(li, layer)
                runs[0].free_block(li)
                del merged
            if len(self.parts) > len(runs[0].layers) + 1:
                merge_next([self._collect(r, stop) for r in runs])
        for r in runs:
            r.finish()
        if bar is not None:
            bar.close()
        self.plan.items = self._items  # the report counts the solve groups actually made
        return report

    @staticmethod
    def _collect(run, stop):
        """The run's current part (own block on hidden states from the merged prefix) -> its Grams."""
        li = run.part
        with run.collector:
            run.run_part(stop, advance=False)
        return run.part_gramset(li)

    def _merge_part(self, sub_cfg, names: list, gramsets, write):
        """One part merged by RegMean's plan and engine (no Grams: averaged) and written in `names` order
        -> ({name: merged tensor in the output dtype}, report entries)."""
        from .engine import Engine

        k = len(self.sources)
        subs = [_Subset(s, names) for s in self.sources]
        gramsets = gramsets if gramsets is not None else [DictGramSet({}) for _ in range(k)]
        cfg = self.cfg
        plan = build_plan(sub_cfg, subs, gramsets)
        engine = Engine(plan, subs, gramsets=gramsets, compute_dtype=cfg.torch_dtype(),
                        solve_dtype=cfg.torch_solve_dtype(), device=cfg.device,
                        allow_missing=cfg.allow_missing_grams, scratch=self._scratch)
        merged: dict = {}
        rep = engine.run(merged.__setitem__)
        for n in names:  # the output's layout order (a part's groups come out in the plan's order)
            write(n, merged[n])
        self.plan.warnings += plan.warnings
        self._items += plan.items
        return merged, rep


def as_batches(data, where: str) -> list:
    """A model's data for merge_modules: batches (dicts with input_ids and, for padded batches, attention_mask;
    or input_ids tensors [B, S]) -> data.Batch list."""
    from ..grams.data import Batch

    out = []
    for j, b in enumerate(data):
        ids = b.get("input_ids") if isinstance(b, dict) else b
        mask = b.get("attention_mask") if isinstance(b, dict) else None
        if not torch.is_tensor(ids) or ids.dim() != 2 or ids.is_floating_point():
            raise MergeError(f"{where}: batch {j}: expected integer input_ids [batch, tokens]")
        mask = torch.ones_like(ids) if mask is None else mask.to(torch.long)
        if tuple(mask.shape) != tuple(ids.shape):
            raise MergeError(f"{where}: batch {j}: attention_mask {list(mask.shape)} for input_ids "
                             f"{list(ids.shape)}")
        out.append(Batch(ids.cpu(), mask.cpu(), None, ids.size(0), int(mask.sum())))
    if not out:
        raise MergeError(f"{where}: no data")
    return out
