"""RegMean++ (Nguyen et al. 2025, arXiv 2508.03121): RegMean whose Grams of block l are taken from each model's
calibration data passed through the ALREADY MERGED parts before it, then through the model's own block l.

Block by block, on the machinery of `grams --sequential` (grams/sequential.py) and RegMean's group solve (the
merge engine on a per-part plan):

    1. the tensors outside the decoder blocks and the heads (embeddings, final norm) are averaged, as RegMean
       does; each model's data goes through the merged embeddings, its hidden states cached on the host;
    2. per block l: every model runs its own block l on its hidden states, the collector summing the block's
       Grams (padding excluded, shared inputs once); the block is merged by RegMean's plan and engine; every
       model's hidden states then go through the MERGED block (as written, in the output dtype);
    3. the heads (linear modules outside the blocks: lm_head, a pooler and classifier): each model runs its own
       heads on its hidden states through the merged final norm; merged by RegMean.

Decoders run as `grams --sequential` runs them; BERT, RoBERTa and GPT-2 through SequentialRun's generic path.
Peak memory: one block of one model at a time (materialised from the memory-mapped safetensors), the merged
block, one block's Grams per model, the cached hidden states. The merged tensors are written as each part is
done, in a layout fixed up front (the output transaction of merge/api.py); --checkpoint-every makes the merge
resumable per block (run()).

Under torchrun (merge/distribution.py's Ranks) each rank runs its share of every model's batches and caches
their hidden states; a part's Grams are summed into rank 0, which merges and writes it, and every rank receives
the merged embeddings and blocks to advance its own hidden states."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import sys

import torch

from ..grams.fileformat import GramsError
from ..io.models import ModelLoadError
from .errors import MergeError
from .methods import METHODS
from .plan import GroupItem, Plan, Resolved, TensorItem, build_plan, check_same_architecture
from .sources import DictGramSet


CHECKPOINT_NAME = "regmean-pp-checkpoint.safetensors"  # in the partial output folder


def _item_from(d: list):
    """A plan item back from its describe() (for the report's counts; the solve is done)."""
    def resolved(r):
        return None if r is None else Resolved(params=r[0], weights=r[1], coeffs=None, model_params=r[2])

    if d[0] == "group":
        return GroupItem(list(d[1]), [], list(d[3]), tuple(d[2]), 0, resolved(d[4] if len(d) > 4 else None))
    return TensorItem(d[1], d[2], resolved=resolved(d[3] if len(d) > 3 else None))


def _read_checkpoint(path: str, signature: str, runs) -> dict | None:
    """The checkpoint at `path` when it is this merge's and fits the runs (else None, with a note)."""
    from safetensors import safe_open

    if not os.path.exists(path):
        return None
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("signature") != signature:
                raise ValueError("made by another merge")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        state = {"next_block": int(meta["next_block"]), "report": json.loads(meta["report"]),
                 "warnings": json.loads(meta["warnings"]),
                 "items": [_item_from(d) for d in json.loads(meta["items"])]}
        state["hidden"] = []
        for i, r in enumerate(runs):
            hidden = [tensors.pop(f"hidden.{i}.{b}") for b in range(len(r.batches))]
            for h, b in zip(hidden, r.batches):
                if tuple(h.shape[:2]) != tuple(b.attention_mask.shape) or h.dtype != r.dtype:
                    raise ValueError("hidden states of another shape")
            state["hidden"].append(hidden)
        state["merged"] = {k[len("merged."):]: t for k, t in tensors.items() if k.startswith("merged.")}
        if not 0 < state["next_block"] < len(runs[0].layers):
            raise ValueError("no such block")
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: the blocks are merged again
        print(f"regmean_fast: note: the checkpoint {path} is not usable ({str(e).splitlines()[0] if str(e) else e!r}); "
              "merging every block again", file=sys.stderr)
        return None
    return state


class _NoStop:
    """grams' Stop without its Ctrl-C handler: Ctrl-C raises at once, and the output transaction keeps the
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
    the output order); run(output): the merge, part by part."""

    def __init__(self, cfg, sources, in_memory=None, dist=None):
        """in_memory: per model (transformers config, data.Batch list, weight reader) for models already loaded
        (merge_modules); else each model's folder, data file and tokenizer per cfg. dist: how the ranks share
        the work (merge/distribution.py; None: one process)."""
        from .distribution import OneProcess

        self.cfg, self.sources, self.in_memory = cfg, sources, in_memory
        self.one_process = dist is None or not dist.ctx.enabled
        self.dist = dist if dist is not None else OneProcess(None)
        self.runs = []
        self.parts: list[tuple[str, list]] = []  # (what, tensor names in write order)
        self.plan: Plan | None = None

    # -- prepare -----------------------------------------------------------------------------------------
    def prepare(self) -> "RegMeanPlusPlusJob":
        from ..distributed import env_world

        cfg = self.cfg
        if self.one_process and env_world()[0] > 1:
            raise MergeError("merge_modules runs regmean++ in one process; under torchrun use the merge command")
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
            if not self.one_process and len(batches) < self.dist.ctx.world:  # said by every rank
                raise MergeError(f"{where}: its {len(batches)} calibration batches are too few for "
                                 f"{self.dist.ctx.world} ranks (each needs one): use fewer ranks or a smaller "
                                 "--batch-size")
            batches = self.dist.own_batches(batches)
            return SequentialRun(spec.model, config, batches, device=torch.device(cfg.device), dtype=cfg.torch_dtype(),
                                 reader=reader, adapter=spec.adapter)
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
        raw = [1.0 if m.weight is None else float(m.weight) for m in cfg.models]  # plain numbers (RegMean's)
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
        """What else makes the merge: the calibration settings and, under torchrun, the number of ranks (the data
        files' stats are the caller's)."""
        extra = {"calibration": self.cfg.calibration_options()}
        if not self.one_process:  # the Grams are summed in another order: not the bytes of another world size
            extra["ranks"] = self.dist.ctx.world
        return extra

    # -- run ---------------------------------------------------------------------------------------------
    def run(self, output, folder: str | None = None, signature: str = "", resume: bool = False,
            checkpoint_every: int | None = None, progress: bool = False) -> dict:
        """Merge part by part into `output` (io.shards.ShardedOutput, or anything with write(name, tensor) and
        is_done(name)) in the skeleton plan's order -> {name: report entry}.

        checkpoint_every N (with `folder`, the partial output folder): after every N blocks, and at the end of
        the block under way on Ctrl-C (then KeyboardInterrupt), a checkpoint in `folder` holds every model's
        hidden states, where to go on, and the merged tensors written into shards not yet finished (kept in
        memory meanwhile: at most one shard). resume: go on from that checkpoint when there is one. Under torchrun
        each rank keeps its own checkpoint (its share's hidden states; rank 0's also the rest) and every rank stops
        at the same block: they resume when every rank's checkpoint is of the same block, else start afresh."""
        from ..grams.checkpoint import Stop
        from ..grams.sequential import TensorOverlay

        cfg, runs, dist = self.cfg, self.runs, self.dist
        ckpt = os.path.join(folder, dist.checkpoint_name(CHECKPOINT_NAME)) if folder and checkpoint_every else None
        state = _read_checkpoint(ckpt, signature, runs) if ckpt and resume else None
        if ckpt and resume and dist.agree_resume(state and state["next_block"]) is None:
            state = None  # under torchrun: every rank's checkpoint, of the same block, or none
        sub_cfg = copy.deepcopy(cfg)
        sub_cfg.method, sub_cfg.calibration = "regmean", {}
        for m in sub_cfg.models:
            m.data = None
        self._scratch: dict = {}  # the engine's group buffers, shared by the parts' engines
        self._items: list = []
        report: dict = {}
        pending: dict = {}  # merged tensors in shards not yet finished (for a checkpoint)
        L = len(runs[0].layers)
        first = 0 if state is None else state["next_block"]
        bar = None
        if progress and dist.is_main:
            from tqdm import tqdm
            bar = tqdm(total=len(self.parts), initial=first, desc="merging (regmean++)", unit="part", file=sys.stderr)

        specs = {n: (n, dt, shape) for n, dt, shape in self.plan.outputs}

        def merge_part(index, gramsets, share=True):
            """Part `index` merged and written by rank 0 -> its merged tensors (share: on every rank)."""
            what, names = self.parts[index]
            merged = {}
            if dist.is_main:
                merged, rep = self._merge_part(sub_cfg, names, gramsets, output.write)
                report.update(rep)
            if share:
                merged = dist.share_merged(merged, [specs[n] for n in names], f"the merged {what}")
            if ckpt and dist.is_main:
                pending.update((n, t) for n, t in merged.items() if not output.is_done(n))
            if bar is not None:
                bar.update(1)
            return merged

        def grams_of_part():
            """Every model's own current part on its hidden states -> its Grams (on rank 0, summed over ranks)."""
            what = self.parts[runs[0].part + 1][0]
            for r in runs:
                with r.collector:
                    r.run_part(_NoStop(), advance=False)
            dist.meet_grams([r.collector for r in runs], f"the Grams of {what}")
            return [r.part_gramset(r.part - 1) for r in runs] if dist.is_main else None

        merged = merge_part(0, None)  # averaging: recomputed on resume, written where its shard is not done
        if state is not None:
            self._restore(state, output, pending, report)  # rank 0's (the others' hold hidden states only)
        for i, r in enumerate(runs):  # the data enters through the merged embeddings (the heads: merged norm)
            r.reader = TensorOverlay(r.reader, merged)
            if state is not None:
                r.part, r.batch, r.hidden = first, 0, state["hidden"][i]
            r.prepare()
        # With checkpoints, the first Ctrl-C ends the block under way and saves one; without, it stops at once.
        with torch.no_grad(), (Stop("block") if ckpt else contextlib.nullcontext(_NoStop())) as stop:
            for li in range(first, L):
                merged = merge_part(li + 1, grams_of_part())
                for r in runs:
                    r.drop_part(li)
                layer = runs[0].block_from(li, merged)  # the merged block, standing in for every model's
                for r in runs:
                    r.advance(li, layer)
                runs[0].free_block(li)
                del merged
                for n in [n for n in pending if output.is_done(n)]:
                    del pending[n]
                stop.step()
                stopped = dist.any_stopped(stop.flag) if ckpt else stop.flag  # _NoStop: never
                saved = ckpt and li + 1 < L and ((li + 1) % checkpoint_every == 0 or stopped)
                if saved:
                    self._save_checkpoint(ckpt, signature, li + 1, pending, report)
                if stopped:
                    where = f"after decoder block {li + 1} of {L}"
                    msg = f"interrupted {where}" + (f"; checkpoint saved in {ckpt}" if saved else "")
                    dist.ctx.log(msg)  # stopped: only with a checkpoint, so through merge(), which has a context
                    raise KeyboardInterrupt
            if len(self.parts) > L + 1:
                merge_part(L + 1, grams_of_part(), share=False)
        for r in runs:
            r.finish()
        if bar is not None:
            bar.close()
        for p in (ckpt, ckpt + ".tmp") if ckpt else ():
            if os.path.exists(p):
                os.remove(p)  # not part of the output (.tmp: a save a kill interrupted)
        self.plan.items = self._items  # the report counts the solve groups actually made
        return report

    def _save_checkpoint(self, path: str, signature: str, next_block: int, pending: dict, report: dict) -> None:
        from safetensors.torch import save_file

        tensors = {f"hidden.{i}.{b}": h.contiguous() for i, r in enumerate(self.runs) for b, h in enumerate(r.hidden)}
        tensors.update({f"merged.{n}": t.contiguous() for n, t in pending.items()})
        meta = {"signature": signature, "next_block": str(next_block), "report": json.dumps(report),
                "items": json.dumps([it.describe() for it in self._items]), "warnings": json.dumps(self.plan.warnings)}
        tmp = path + ".tmp"
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)

    def _restore(self, state: dict, output, pending: dict, report: dict) -> None:
        """The blocks before the checkpoint: their report entries, groups and warnings, and their tensors that were
        in shards not finished then, written again in order (the finished shards are kept as they are)."""
        if not self.dist.is_main:
            return
        report.update(state["report"])
        self._items += state["items"]
        self.plan.warnings[:] = state["warnings"]
        for _, names in self.parts[1:state["next_block"] + 1]:
            for n in names:
                if not output.is_done(n):
                    if n not in state["merged"]:
                        raise RuntimeError(f"internal error: the checkpoint lacks {n}")
                    output.write(n, state["merged"][n])
                    pending[n] = state["merged"][n]
        print(f"regmean_fast: resuming from the checkpoint at decoder block {state['next_block'] + 1} of "
              f"{len(self.runs[0].layers)}", file=sys.stderr)

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
