"""Python API: merge(config) for model folders; merge_state_dicts / merge_modules for in-memory models."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import time

import torch

from .._version import __version__
from ..io.hf import ModelFolderError, copy_aux_files, copy_model_code, write_config, write_index
from ..io.lora import open_model
from ..io.output import NO_SPACE, OutputError, OutputTransaction, free_space_shortfall
from ..io.resume import CONTINUE, DONE, Found, kill_point
from ..io.shards import ShardedOutput, ShardLayout
from .config import MergeConfig, ModelSpec, config_from_dict, load_yaml
from .distribution import strategy
from .engine import Engine
from .errors import MergeError, message_of
from .methods import METHODS
from .plan import build_plan, estimate_working_bytes
from .report import build_report, config_yaml, model_card, write_json
from .sources import DictGramSet, StateDictSource

PARTIAL_SUFFIX = ".regmean-partial"
REPORT_NAME = "merge_report.json"
OLD_SUFFIX = ".regmean-old-"  # --force: the earlier output, set aside until the merge is in place


def _as_config(config, overrides: dict) -> MergeConfig:
    if isinstance(config, MergeConfig):
        cfg = copy.deepcopy(config)
    elif isinstance(config, dict):
        cfg = config_from_dict(config)
    elif isinstance(config, (str, os.PathLike)):
        cfg = load_yaml(str(config))
    elif config is None:
        cfg = MergeConfig()
    else:
        raise MergeError(f"config must be a MergeConfig, a mapping or a YAML path, got {type(config).__name__}")
    for k, v in overrides.items():
        if v is None:
            continue
        if k == "parameters":
            cfg.parameters = {**cfg.parameters, **v}
        elif hasattr(cfg, k):
            setattr(cfg, k, v)
        else:  # a method parameter (alpha=..., density=...), as in merge_state_dicts; checked by the method
            cfg.parameters = {**cfg.parameters, k: v}
    return cfg


def load_gramset(path: str):
    """regmean_fast.load_grams, with its errors turned into one-line MergeErrors."""
    try:
        from ..grams import load_grams
    except ImportError as e:
        raise MergeError(f"cannot read Gram files: regmean_fast.grams is unavailable ({e})") from None
    try:
        return load_grams(path)
    except MergeError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to read the file is the user's input problem
        raise MergeError(f"Gram file {path}: {message_of(e, path)}") from None


def partial_path(out: str) -> str:
    """The temporary folder next to `out` that the merge is written into (kept for --resume)."""
    out = os.path.abspath(os.path.expanduser(str(out)))
    return os.path.join(os.path.dirname(out), "." + os.path.basename(out) + PARTIAL_SUFFIX)


def _inside(child: str, parent: str) -> bool:
    child, parent = os.path.realpath(child), os.path.realpath(parent)
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def _check_output_path(cfg: MergeConfig, out: str, force: bool, resume: bool = False) -> None:
    inputs = [m.model for m in cfg.models] + [p for m in cfg.models for p in (m.grams, m.data, m.adapter) if p] + (
        [p for p in (cfg.base_model, cfg.base_adapter) if p])
    for p in inputs:
        if _inside(out, p) or _inside(p, out):
            raise MergeError(f"output {out} overlaps the input {p}; never writing into an input folder")
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise MergeError(f"output {out} exists and is not a folder")
        if os.listdir(out) and not (force or resume):  # --resume: judged once the plan is known
            raise MergeError(f"output folder {out} exists and is not empty (pass --force to replace it)")


def _plan_hash(cfg, plan, layout, sources, device, extra: dict | None = None) -> str:
    stats = []
    for s in sources:
        for f in s.files():
            st = os.stat(f)
            stats.append([f, st.st_size, st.st_mtime_ns])
    for m in cfg.models:
        for p in (m.grams, m.data):
            if p and os.path.exists(p):
                st = os.stat(p)
                stats.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
    # (A method's random draws are part of what made the folder: a generator of another build draws other masks.)
    draws = METHODS[cfg.method].draws
    blob = json.dumps({"plan": plan.describe(), "layout": layout.describe(), "dtype": cfg.dtype,
                       "solve_dtype": cfg.solve_dtype, "device": torch.device(device).type, "inputs": stats,
                       **({"draws": draws} if draws else {}), **(extra or {})}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _found_output(out: str, plan_hash: str):
    """The folder at `out` as io.resume sees it -> (None when absent or empty, or Found: made by this merge or
    not, and why; its report when it is). Its merge_report.json records the plan's signature and every shard's
    size: the folder is only ever put in place whole, so these say it is this merge, complete."""
    if not os.path.isdir(out) or not os.listdir(out):
        return None, None
    try:
        with open(os.path.join(out, REPORT_NAME)) as f:
            report = json.load(f)
        made_by, shards = report.get("signature"), report["shards"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return Found(out, f"holds no {REPORT_NAME} of a finished merge"), None
    if made_by != plan_hash:
        return Found(out, "was made by another merge (other inputs or settings)" if made_by else
                     f"its {REPORT_NAME} records no signature (an older regmean_fast)"), None
    for fname, rec in shards.items():
        path = os.path.join(out, fname)
        if not os.path.isfile(path) or os.path.getsize(path) != rec.get("size"):
            return Found(out, f"its {fname} is missing or not the size {REPORT_NAME} records"), None
    return Found(out), report


def merge(config=None, out: str | None = None, *, force: bool = False, resume: bool = False, progress: bool = False,
          on_shard_done=None, **overrides) -> dict:
    """Merge model folders into the Hugging Face folder `out`; returns the merge report.

    config: a MergeConfig, a mapping like the YAML file, or the YAML file's path; keyword overrides
    (models=..., method=..., parameters=..., out_dtype=...) replace its fields, and any other keyword is a
    method parameter (alpha=0.9, density=0.5). Writes into a temporary folder next to `out` and renames
    it at the end; resume=True reuses its verified shards, starts afresh when there is none, and returns the
    stored report (with already_complete=True) when `out` is already this merge, complete.
    Raises MergeError on bad input, leaving no output behind.

    Under torchrun (WORLD_SIZE > 1) every rank runs this with the same arguments: the shards are spread
    over the ranks by estimated cost, each rank computes and writes its own, and rank 0 writes the
    index, config and report after all are done (bit-identical to one process with the same shards);
    regmean++ shares its calibration batches instead (rank 0 merges and writes, merge/regmean_pp.py). Any rank failing stops every rank (DistributedError) and leaves the partial folder for resume=True.
    """
    t_start = time.perf_counter()
    kill_point("merge.start")
    cfg, out = _checked_config(config, out, overrides, force, resume)
    from .. import distributed as DI

    dist = strategy(DI.init_from_env(cfg.device))  # a world of one without torchrun
    cfg.device = dist.device(cfg.device)  # one rank per GPU
    tx = OutputTransaction(out, partial_path(out), resumable=True, user_error=lambda e: _user_error(e, out),
                           old_suffix=OLD_SUFFIX, kill_prefix="merge", set_aside_links=True, on_failure=dist.fail)
    job = _Job(cfg, out)
    try:
        with tx:
            _prepare(job, dist)
            action, stored = dist.decide(lambda: _start_from(tx, job.signature, resume, force))
            if action == DONE:
                return dict(stored, already_complete=True)
            results = _execute(job, tx, dist, action == CONTINUE, progress, on_shard_done)
            return _publish(job, tx, dist, results, t_start)
    finally:
        job.close()


class _Job:
    """What the merge's phases share: the config, the inputs opened and the plan made by _prepare."""

    def __init__(self, cfg: MergeConfig, out: str):
        self.cfg, self.out = cfg, out
        self.sources, self.base, self.gramsets = [], None, None
        self.gram_paths = [m.grams for m in cfg.models]
        self.plan = self.layout = self.signature = None
        self.block_by_block = None  # regmean++: its RegMeanPlusPlusJob

    def close(self) -> None:
        for s in self.sources:
            s.close()
        if self.base is not None:
            self.base.close()


def _checked_config(config, out, overrides: dict, force: bool, resume: bool) -> tuple[MergeConfig, str]:
    """The config and the output path, checked before anything is opened -> (config, absolute output path)."""
    cfg = _as_config(config, overrides)
    if out is None:
        raise MergeError("no output folder given")
    cfg.validate().absolute_paths()
    from ..distributed import env_world

    if env_world()[1] == 0:  # torchrun: said once, by rank 0
        for line in cfg.notes:
            print(f"regmean_fast: note: {line}", file=sys.stderr)
    out = os.path.abspath(os.path.expanduser(str(out)))
    _check_output_path(cfg, out, force, resume)
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise MergeError(f"the folder {parent} for the output does not exist")
    return cfg, out


def _prepare(job: _Job, dist) -> None:
    """Open the inputs, make the plan and the shard layout, check the memory budget, sign the plan."""
    cfg = job.cfg
    try:
        job.sources = []
        for m in cfg.models:  # appended one by one: those opened are closed when one fails
            job.sources.append(open_model(m.model, m.adapter))
        job.base = open_model(cfg.base_model, cfg.base_adapter) if cfg.base_model else None
    except ModelFolderError as e:
        raise MergeError(str(e)) from None
    if METHODS[cfg.method].needs_data:  # regmean++: its plan is made part by part as it runs
        from .regmean_pp import RegMeanPlusPlusJob

        job.block_by_block = RegMeanPlusPlusJob(cfg, job.sources, dist=dist).prepare()
        job.plan = job.block_by_block.plan
    else:
        if METHODS[cfg.method].needs_stats:
            job.gramsets = [load_gramset(p) for p in job.gram_paths]
        job.plan = build_plan(cfg, job.sources, job.gramsets, job.gram_paths, job.base)
    job.layout = ShardLayout.build(job.plan.outputs, cfg.shard_bytes())
    limit = cfg.max_memory_bytes()
    if limit is not None and job.block_by_block is None:
        need = estimate_working_bytes(job.plan, job.sources, cfg.torch_dtype(), cfg.torch_solve_dtype(),
                                      len(job.sources))
        if need > limit:
            raise MergeError(f"the largest tensor group needs about {need / 2**20:.0f} MiB of host memory, "
                             f"more than --max-memory {cfg.max_memory}")
    job.signature = _plan_hash(cfg, job.plan, job.layout, job.sources, cfg.device,
                               job.block_by_block.signature_extra() if job.block_by_block else None)


def _execute(job: _Job, tx: OutputTransaction, dist, resume: bool, progress: bool, on_shard_done):
    """This rank's shards through the engine into the partial folder -> the whole merge's (tensor report,
    shard records, reused shards) on rank 0."""
    cfg, plan, layout = job.cfg, job.plan, job.layout
    # regmean++: rank 0 merges and writes every part (the ranks share its data instead)
    owned = dist.writer_shards(layout) if job.block_by_block else dist.owned_shards(plan, layout, job.sources)
    try:
        output = tx.writer = ShardedOutput(tx.tmp, layout, job.signature, resume=resume,
                                           on_shard_done=dist.on_shard_done(on_shard_done), owned=owned,
                                           manifest_name=dist.manifest_name)
    except ValueError as e:
        raise MergeError(str(e)) from None
    needed = sum(sum(int(torch.empty((), dtype=d).element_size()) * int(torch.Size(s).numel()) for _, d, s in ents)
                 for fname, ents in layout.shards
                 if fname not in output.records and (owned is None or fname in owned))
    short = free_space_shortfall(os.path.dirname(job.out), needed + (1 << 20))  # + config, tokenizer, report
    if short:
        raise MergeError(short)
    if job.block_by_block is not None:
        tensor_report = job.block_by_block.run(output, folder=tx.tmp, signature=job.signature, resume=resume,
                                               checkpoint_every=cfg.checkpoint_every, progress=progress)
        if not output.complete():
            raise RuntimeError("internal error: some shards were not written")
        return dist.meet(plan, layout, tensor_report, output)
    bar = None
    if progress and dist.is_main:
        from tqdm import tqdm
        bar = tqdm(total=len(plan.items), desc="merging", unit="group")
    engine = Engine(plan, job.sources, base=job.base, gramsets=job.gramsets, gram_paths=job.gram_paths,
                    compute_dtype=cfg.torch_dtype(), solve_dtype=cfg.torch_solve_dtype(), device=cfg.device,
                    allow_missing=cfg.allow_missing_grams)
    skip = output.is_done if owned is None else (lambda n: output.is_done(n) or not output.owns(n))
    tensor_report = engine.run(output.write, skip=skip,
                               progress=(lambda item: bar.update(1)) if bar is not None else None)
    if bar is not None:
        bar.close()
    if not output.complete():
        raise RuntimeError("internal error: some shards were not written")
    return dist.meet(plan, layout, tensor_report, output)


def _publish(job: _Job, tx: OutputTransaction, dist, results, t_start: float) -> dict:
    """Rank 0: the index, config, model code, tokenizer, report and card into the partial folder, then the
    folder into place (io.output); every rank returns the report."""
    if not dist.is_main:
        return dist.publish()
    cfg, plan, layout, tmp = job.cfg, job.plan, job.layout, tx.tmp
    tensor_report, records, reused = results
    if len(layout.shards) > 1:
        write_index(tmp, layout.weight_map(), layout.total_bytes(), {"regmean_fast_version": __version__})
    donor = job.base if job.base is not None else job.sources[0]
    write_config(donor.config, tmp, cfg.torch_out_dtype() or _models_dtype(job.sources[0]))
    copy_model_code(donor.config, donor.path, tmp)
    if cfg.copy_tokenizer:
        copy_aux_files(donor.path, tmp)
    report = build_report(cfg, plan, tensor_report, shards=records,
                          total_s=time.perf_counter() - t_start, reused=reused, device=cfg.device)
    report["signature"] = job.signature  # what made this folder: --resume finds it complete (_found_output)
    write_json(os.path.join(tmp, REPORT_NAME), report)
    with open(os.path.join(tmp, "regmean_config.yml"), "w") as f:
        f.write(config_yaml(cfg, plan))
    with open(os.path.join(tmp, "README.md"), "w") as f:
        f.write(model_card(cfg, plan))
    tx.publish()
    return dist.publish(report)


def _models_dtype(src) -> torch.dtype | None:
    for n in src.names():
        d = src.dtype(n)
        if d.is_floating_point:
            return d
    return None


def _user_error(e: BaseException, out: str) -> BaseException | None:
    """What of a failure is the user's to fix (the partial folder goes), as they read it; None for an interruption,
    a kill or another rank's failure (DistributedError: the partial folder stays for --resume)."""
    from ..distributed import DistributedError

    if isinstance(e, DistributedError):
        return None
    if isinstance(e, MergeError):
        return e
    if isinstance(e, OutputError):
        return MergeError(str(e))
    if isinstance(e, OSError) and e.errno in NO_SPACE:
        return MergeError(f"no space left on the device while writing {out}")
    return None


def _start_from(tx: OutputTransaction, plan_hash: str, resume: bool, force: bool):
    """Rank 0, before any shard: what this merge starts from (io.resume's rule, io.output's partial folder)
    -> (FRESH | CONTINUE | DONE, the stored report when DONE)."""
    stored = []

    def found_output():
        output, report = _found_output(tx.final, plan_hash)
        stored.append(report)
        return output

    action = tx.start_partial(plan_hash, resume, force, found_output,
                              lambda line: print(f"regmean_fast: note: {line}", file=sys.stderr))
    return action, (stored[0] if action == DONE else None)


# -- in memory -------------------------------------------------------------------------------------
def _as_gramset(g, conv1d=()):
    if g is None:
        return None
    if isinstance(g, dict):
        return DictGramSet(g, conv1d=conv1d)
    if isinstance(g, (str, os.PathLike)):
        return load_gramset(str(g))
    return g


def merge_state_dicts(state_dicts, grams=None, *, method: str = "regmean", weights=None, base=None,
                      parameters: dict | None = None, regmean_exclude=(), allow_missing_grams: bool = False,
                      dtype: str | None = None, solve_dtype: str = "float32", out_dtype: str | None = None,
                      device: str = "cpu", conv1d=(), return_report: bool = False, seed: int = 0, **params):
    """Merge K state dicts (same keys and shapes) in memory, one tensor group at a time.

    grams: per model, a GramSet (regmean_fast.load_grams), a path to a Gram file, or a dict
    {module name: Gram} (already normalised, or raw with DictGramSet counts); conv1d: module names
    stored [in, out] (GPT-2's Conv1D) when grams are dicts. Extra keyword arguments are method
    parameters (alpha=..., normalization=..., scaling=..., density=..., t=...), numbers or mergekit's
    settings (gradients, filters). Returns the merged state dict (and the per-tensor report when
    return_report=True); tensors keep their dtype unless out_dtype (or dtype, as in mergekit) is given."""
    k = len(state_dicts)
    cfg = MergeConfig(models=[ModelSpec(model=f"<state dict {i}>", grams="<memory>" if grams is not None else None,
                                        weight=1.0 if weights is None else weights[i]) for i in range(k)],
                      method=method, base_model="<memory>" if base is not None else None,
                      parameters={**(parameters or {}), **params}, dtype=dtype, solve_dtype=solve_dtype,
                      out_dtype=out_dtype, regmean_exclude=list(regmean_exclude),
                      allow_missing_grams=allow_missing_grams, device=device, seed=seed)
    if weights is not None and len(weights) != k:
        raise MergeError(f"got {len(weights)} weights for {k} models")
    cfg.validate(require_paths=False)
    sources = [StateDictSource(sd) for sd in state_dicts]
    base_src = StateDictSource(base) if base is not None else None
    gramsets = [_as_gramset(g, conv1d) for g in grams] if grams is not None else None
    plan = build_plan(cfg, sources, gramsets, None, base_src)
    engine = Engine(plan, sources, base=base_src, gramsets=gramsets, compute_dtype=cfg.torch_dtype(),
                    solve_dtype=cfg.torch_solve_dtype(), device=device, allow_missing=allow_missing_grams)
    merged = {}
    rep = engine.run(lambda n, t: merged.__setitem__(n, t))
    for alias, name in sources[0].tied.items():  # a tied weight is its tensor's merge, as when loaded
        merged[alias] = merged[name]
    merged = {n: merged[n] for n in state_dicts[0] if n in merged}
    if return_report:
        return merged, {"tensors": rep, "warnings": plan.warnings}
    return merged


def conv1d_modules(model: torch.nn.Module) -> list[str]:
    """Names of transformers Conv1D modules (weights stored [in, out])."""
    return [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]


def merge_modules(models, grams=None, *, base_model=None, data=None, **kwargs) -> torch.nn.Module:
    """Merge K torch modules of one architecture; returns a new module (a copy of the first one)
    holding the merged weights. grams as for merge_state_dicts (FusionBench's per-model dicts
    {module name: Gram} work as they are). method="regmean++" takes data instead: per model, its batches (dicts
    of input_ids and attention_mask, or input_ids tensors), run block by block as the CLI does."""
    if not models:
        raise MergeError("no models to merge")
    if kwargs.get("method") == "regmean++" or data is not None:
        if grams is not None or base_model is not None:
            raise MergeError("regmean++ takes data, not grams or a base model")
        return _merge_modules_pp(models, data, **kwargs)
    kwargs.setdefault("conv1d", conv1d_modules(models[0]))
    sds = [m.state_dict() for m in models]
    base = base_model.state_dict() if base_model is not None else None
    merged = merge_state_dicts(sds, grams, base=base, **kwargs)
    out = copy.deepcopy(models[0])
    out.load_state_dict(merged if not isinstance(merged, tuple) else merged[0])
    return out


def _merge_modules_pp(models, data, *, method: str = "regmean++", weights=None, parameters: dict | None = None,
                      regmean_exclude=(), allow_missing_grams: bool = False, dtype: str = "float32",
                      solve_dtype: str = "float32", out_dtype: str | None = None, device: str = "cpu", **params):
    """merge_modules for RegMean++: each model's state dict read as the CLI reads its folder (regmean_pp.py)."""
    from .regmean_pp import RegMeanPlusPlusJob, as_batches
    from ..grams.sequential import TensorOverlay

    k = len(models)
    if method != "regmean++":
        raise MergeError(f"data is only read by regmean++, not by method {method}")
    if data is None or len(data) != k:
        raise MergeError(f"regmean++ needs one data set per model: got {0 if data is None else len(data)} "
                         f"for {k} models")
    if weights is not None and len(weights) != k:
        raise MergeError(f"got {len(weights)} weights for {k} models")
    cfg = MergeConfig(models=[ModelSpec(model=f"<module {i}>", data="<memory>",
                                        weight=1.0 if weights is None else weights[i]) for i in range(k)],
                      method=method, parameters={**(parameters or {}), **params}, dtype=dtype,
                      solve_dtype=solve_dtype, out_dtype=out_dtype, regmean_exclude=list(regmean_exclude),
                      allow_missing_grams=allow_missing_grams, device=device)
    cfg.validate(require_paths=False)
    sds = [{n: t.detach() for n, t in m.state_dict().items()} for m in models]
    in_memory = []
    for i, m in enumerate(models):
        config = copy.deepcopy(m.config)
        config.architectures = [type(m).__name__]  # the skeleton is this class, whatever the config says
        in_memory.append((config, as_batches(data[i], f"model {i}"), TensorOverlay(None, sds[i])))
    sources = [StateDictSource(sd, m.config.to_dict()) for sd, m in zip(sds, models)]
    job = RegMeanPlusPlusJob(cfg, sources, in_memory).prepare()
    merged: dict = {}

    class _Memory:  # the output: the merged state dict
        write, is_done = staticmethod(merged.__setitem__), staticmethod(lambda name: False)

    job.run(_Memory())
    for alias, name in sources[0].tied.items():
        merged[alias] = merged[name]
    out = copy.deepcopy(models[0])
    out.load_state_dict(merged)
    return out
