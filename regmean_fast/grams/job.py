"""The statistics job: a model's Gram file from its data, in three phases (docs/architecture.md):

    prepare  the cheap checks, the inputs resolved (config, tokenizer, batches), the signature, the ranks' shares
    execute  the batches through the whole model (GramCollector) or block by block (--sequential), resumable
    publish  the ranks' Grams meet on rank 0, which writes the file (io.output's transaction, in save_grams)

The flags arrive as the `grams` command parsed them (grams/command.py); torchrun is a strategy
(grams/distribution.py) and checkpoints, --resume and Ctrl-C are grams/checkpoint.py's.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field

from .._version import __version__
from ..io import models
from ..io.lora import fold_into_model, open_model
from ..io.resume import kill_point
from .checkpoint import (Stop, checkpoint_path, output_target, read_checkpoint, remove_checkpoint, remove_work_folder,
                         save_if_stopped, start_from, work_folder, write_checkpoint)
from .distribution import strategy
from .fileformat import GramsError, check_writable_folder, parse_size

DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}


@dataclass
class _Job:
    """What the phases share; `args` are the parsed flags, never changed."""

    args: object
    shard_size: int | None
    st_files: list
    config: object = None
    device: object = None
    dtype: object = None
    batches: list = field(default_factory=list)
    signature: str = ""
    ckpt_signature: str = ""  # under torchrun each rank's checkpoint is its share's
    ckpt: str = ""
    mode: str = "whole-model"  # or "sequential"
    metadata: dict = field(default_factory=dict)


def collect(args) -> bool:
    """The `grams` command's work -> True when the Gram file is written (or was already, by this command), False
    when the run stopped early and saved its checkpoint. Bad input: GramsError / io.models.ModelLoadError, before
    any heavy work."""
    job = _check_inputs(args)
    dist = _prepare(job)
    resume = start_from(args.resume, args.force, args.out, job.ckpt, job.signature, job.ckpt_signature, job.mode,
                        dist)
    if resume is None:
        return True
    execute = _execute_sequential if job.mode == "sequential" else _execute_whole
    collector, fisher = execute(job, dist, resume)
    if collector is None:
        return False
    _publish(job, dist, collector, fisher)
    remove_checkpoint(job.ckpt)
    return True


# --------------------------------------------------------------------------------------------------
# prepare


def _check_inputs(args) -> _Job:
    """The cheap checks first, in the order a user would fix them."""
    if args.batch_size is not None and args.batch_size < 1:
        raise GramsError("--batch-size must be >= 1")
    if args.fisher_tokens and not args.fisher:
        raise GramsError("--fisher-tokens goes with --fisher")
    for flag in ("max_examples", "max_tokens", "checkpoint_every", "max_length"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise GramsError(f"--{flag.replace('_', '-')} must be >= 1")
    shard_size = None
    if args.shard_size:
        try:
            shard_size = parse_size(args.shard_size)
        except ValueError as e:
            raise GramsError(str(e)) from None
    ref = models.resolve_model(args.model_dir)  # a folder, or a Hub id in the cache; or a LoRA adapter and its base
    args.model_dir, args.model_hub_id, args.adapter, args.adapter_hub_id = \
        ref.folder, ref.hub_id, ref.adapter, ref.adapter_hub_id
    st_files = models.check_model_dir(args.model_dir)
    if args.adapter:  # refused now (a target the base lacks, shapes that disagree), not after the data is read
        with open_model(args.model_dir, args.adapter) as adapted:
            st_files = st_files + adapted.adapter.files()
    check_out_spares_inputs(args.out, args.model_dir, st_files, args.data)
    check_output(args.out, args.force, args.resume)
    kill_point("grams.start")
    return _Job(args, shard_size, st_files)


def _prepare(job: _Job):
    """The data read, the device and the ranks, the model's config and tokenizer, the batches and what makes
    them (the signature) -> the distribution strategy."""
    import torch

    from .. import distributed as DI
    from . import data as D

    args = job.args
    examples = D.read_examples(args.data, args.format, args.text_field, args.label_field if args.fisher else None,
                               limit=None if args.shuffle else args.max_examples)  # --shuffle draws from them all
    # torchrun: join the process group; 'cuda' means cuda:LOCAL_RANK
    dist = strategy(DI.init_from_env(resolve_device(args.device)))
    job.device = dist.ctx.device
    models.quiet_transformers()
    job.config = models.load_config(args.model_dir, args.trust_remote_code)
    _check_modules(job.config, args)
    max_length = resolve_max_length(job.config, args.max_length)
    tokenizer = models.load_tokenizer(args.model_dir, args.trust_remote_code)
    batches = _batches(args, D, examples, tokenizer, job.config, max_length)
    job.signature = _signature(args, args.model_dir, job.st_files, max_length, batches, dist.world)
    job.batches, job.ckpt_signature = dist.own_batches(batches, job.signature)
    torch.manual_seed(args.seed)
    job.dtype = getattr(torch, DTYPES[args.dtype])
    job.metadata = _metadata(args, max_length, job.signature)
    dist.describe(job.metadata)
    job.mode = job.metadata["mode"] = _mode(args, job.config)
    if job.mode == "sequential" and len(batches) < dist.world:  # each rank takes part in every block's sum
        raise GramsError(f"--sequential with {dist.world} ranks needs at least one batch per rank; the data makes "
                         f"{len(batches)} (use fewer ranks or a smaller --batch-size)")
    job.ckpt = checkpoint_path(args.out, dist.rank, dist.world)
    return dist


def _check_modules(config, args) -> None:
    from .collect import find_linear_modules

    skeleton = models.meta_model(config, args.trust_remote_code)
    if not find_linear_modules(skeleton, args.include, args.exclude)[0]:
        flags = [f"--{f} {p!r}" for f in ("include", "exclude") for p in getattr(args, f) or []]
        raise GramsError("no nn.Linear / Conv1D modules matched" + (f" ({' '.join(flags)})" if flags else ""))


def resolve_max_length(config, asked: int | None) -> int:
    limit = models.model_limit(config)
    if asked is not None and limit is not None and asked > limit:
        raise GramsError(f"--max-length {asked} is beyond the model's limit of {limit} positions")
    return asked or min(512, limit or 512)


def _batches(args, D, examples, tokenizer, config, max_length: int) -> list:
    examples = D.select(examples, args.max_examples, args.shuffle, args.seed)
    ids = D.tokenize(tokenizer, examples, max_length, args.data)
    labels = None
    archs = getattr(config, "architectures", None) or []
    if args.fisher and any(a.endswith("ForSequenceClassification") for a in archs):  # custom code's too
        labels = D.class_labels(examples, getattr(config, "num_labels", None), getattr(config, "label2id", None),
                                args.data)
    # Longest first wastes less of the forward on padding; with --include-padding the padding is data
    # (the published codes' Grams), so the batches keep the order they would have had there.
    # --fisher on a causal LM: the log-likelihood of chat answers, as chat fine-tuning trains (answer_starts)
    starts = D.answer_starts(tokenizer, examples) if args.fisher and labels is None else None
    return D.make_batches(ids, args.batch_size, D.pad_id_of(tokenizer), args.max_tokens, labels,
                          longest_first=not (args.keep_order or args.include_padding), starts=starts)


def _metadata(args, max_length: int, signature: str) -> dict:
    """The Gram file's provenance."""
    return {
        "tool": "regmean_fast",
        "tool_version": __version__,
        # a LoRA adapter is the model (merge's check of the Grams' order compares these names), on its base
        "model": os.path.basename(os.path.abspath(getattr(args, "adapter", None) or args.model_dir)),
        **({"hub_id": args.model_hub_id} if getattr(args, "model_hub_id", None) else {}),
        **({"base_model": os.path.basename(os.path.abspath(args.model_dir))}
           if getattr(args, "adapter", None) else {}),
        **({"adapter_hub_id": args.adapter_hub_id} if getattr(args, "adapter_hub_id", None) else {}),
        "data": os.path.basename(args.data),
        "max_length": max_length,
        "batch_size": args.batch_size,
        "forward_dtype": args.dtype,
        "text_field": args.text_field,
        "shuffle": args.shuffle,
        "seed": args.seed,
        "mode": "sequential" if args.sequential else "whole-model",
        "signature": signature,  # what made the file: --resume finds it complete (io.resume)
    }


def _mode(args, config) -> str:
    """--sequential when asked for and possible, else the whole model (a note says why)."""
    if not args.sequential:
        return "whole-model"
    from .sequential import sequential_supported

    ok, why = sequential_supported(config)
    if not ok:
        print(f"regmean_fast: note: --sequential is not available for this model ({why}); "
              "running the whole model at once", file=sys.stderr)
        return "whole-model"
    if args.fisher:
        print("regmean_fast: note: --fisher needs gradients through the whole model; running the whole model "
              "at once", file=sys.stderr)
        return "whole-model"
    return "sequential"


def check_output(out: str, force: bool, resume: bool) -> None:
    target = output_target(out)
    if os.path.lexists(target) and not (force or resume):  # --resume: judged once the signature is known
        raise GramsError(f"output already exists: {target} (use --force to overwrite)")
    check_writable_folder(os.path.dirname(os.path.abspath(out)) or ".")


def check_out_spares_inputs(out: str, model_dir: str, st_files: list[str], data: str) -> None:
    """--out (with --force) must not replace the model folder, one of its weight / index files or the data."""
    from ..io.hf import INDEX_NAME
    from .fileformat import INDEX_SUFFIX

    o = os.path.realpath(out)
    m = os.path.realpath(model_dir)
    if o == m or m.startswith(o.rstrip(os.sep) + os.sep):
        raise GramsError(f"--out {out} would replace the model folder {model_dir}")
    inputs = {os.path.realpath(p) for p in st_files + [os.path.join(model_dir, INDEX_NAME), data]}
    if {o, o + INDEX_SUFFIX} & inputs:
        raise GramsError(f"--out {out} would replace an input (the model's weights or the data file)")


def resolve_device(spec: str):
    import torch

    spec = spec.strip().lower()
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise GramsError(f"--device {spec}: CUDA is not available")
        dev = torch.device(spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise GramsError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s)")
        return dev
    raise GramsError(f"--device {spec!r}: use cpu, cuda or cuda:N")


def _signature(args, model_dir: str, st_files: list[str], max_length: int, batches, world: int) -> str:
    """What the statistics are made of: the model's config.json and weight files (names and sizes), every
    option that changes the statistics, the batches themselves (the data as read, tokenized, selected and
    ordered) and the number of ranks. Recorded in checkpoints and in the Gram file's provenance, so it holds
    no path or time: the same inputs anywhere give the same bytes."""
    h = hashlib.sha256()
    with open(os.path.join(model_dir, "config.json"), "rb") as f:
        h.update(f.read())
    for p in st_files:
        if os.path.basename(p) == "adapter_config.json":  # a LoRA adapter's rank and scaling
            with open(p, "rb") as f:
                h.update(f.read())
        h.update(f"{os.path.basename(p)}:{os.path.getsize(p)}".encode())
    keys = ("format", "text_field", "batch_size", "max_examples", "max_tokens", "shuffle", "seed", "keep_order",
            "dtype", "include", "exclude", "include_padding", "no_share", "sequential", "fisher", "label_field")
    opts = {k: getattr(args, k) for k in keys}
    if args.fisher_tokens == "mean":  # (absent otherwise: the signature of a default run is what it was)
        opts["fisher_tokens"] = "mean"
    h.update(json.dumps(dict(opts, max_length=max_length, world=world), sort_keys=True).encode())
    for b in batches:
        for t in (b.input_ids, b.attention_mask, b.labels):
            if t is not None:
                h.update(f"{t.dtype}{tuple(t.shape)}".encode())
                h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# execute


def _execute_whole(job: _Job, dist, resume: bool):
    """The whole model over this rank's batches, from the checkpoint when resuming -> (collector, the Fisher sums
    on rank 0 or None), or (None, None) when stopped early (the checkpoint saved)."""
    import torch

    model, collector, fisher_acc, start = _whole_model(job, resume)
    n = len(job.batches)

    def save_ckpt(n_done):
        extra = {"done_batches": n_done}
        if fisher_acc is not None:
            extra["fisher_examples"] = fisher_acc.examples
            extra["_tensors"] = fisher_acc.state_tensors()
        write_checkpoint(job.ckpt, collector, job.ckpt_signature, "whole-model", extra)

    bar = _progress_bar(job, dist, start)
    kill_point("grams.loaded")
    dist.ready()
    with Stop() as stop, collector, torch.no_grad():
        done = _forward(job, model, collector, fisher_acc, start, stop, save_ckpt, bar)
    dist.done()
    if bar is not None:
        bar.close()
    if save_if_stopped(dist, stop, done == n, lambda: save_ckpt(done), job.ckpt, f"after {done} of {n} batches"):
        return None, None
    fisher = None
    if fisher_acc is not None:
        job.metadata["fisher_examples"], fisher = dist.meet_fisher(fisher_acc)
        job.metadata["fisher_labels"] = fisher_acc.label_source or (
            ("next-token, chat answers only" if fisher_acc.answers_only else "next-token")
            + (", mean over the tokens" if fisher_acc.token_mean else "")
            if fisher_acc.kind == "causal" else None)
    return collector, fisher


def _whole_model(job: _Job, resume: bool):
    """-> (the model, its GramCollector, the FisherAccumulator or None, the first batch to run)."""
    from .collect import GramCollector

    args = job.args
    model = models.load_model(args.model_dir, job.config, job.dtype, job.device, args.trust_remote_code)
    if args.adapter:  # the base as loaded, with the adapted tensors replaced: the model peft's merge would save
        with open_model(args.model_dir, args.adapter) as adapted:
            fold_into_model(model, adapted)
    collector = GramCollector(model, include=args.include, exclude=args.exclude,
                              include_padding=args.include_padding, share_inputs=not args.no_share)
    fisher_acc = None
    if args.fisher:
        from .fisher import FisherAccumulator

        fisher_acc = FisherAccumulator(model, token_mean=args.fisher_tokens == "mean")
    start = 0
    if resume:
        state, others = read_checkpoint(job.ckpt, job.ckpt_signature, "whole-model")
        collector.load_state(state, device=job.device)
        start = int(state["done_batches"])
        if fisher_acc is not None:
            fisher_acc.load_state(others, int(state.get("fisher_examples", 0)), job.device)
        print(f"regmean_fast: resuming from {job.ckpt} after {start} of {len(job.batches)} batches", file=sys.stderr)
    return model, collector, fisher_acc, start


def _progress_bar(job: _Job, dist, start: int):
    if job.args.no_progress or not dist.is_main:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=sum(b.n_examples for b in job.batches), initial=sum(b.n_examples for b in job.batches[:start]),
                unit="ex", desc="grams", dynamic_ncols=True, file=sys.stderr)


def _forward(job: _Job, model, collector, fisher_acc, start: int, stop: Stop, save_ckpt, bar) -> int:
    """Batches start, start + 1, ... through the model until the last or stop.flag -> the batches done."""
    import torch

    batches, device, every = job.batches, job.device, job.args.checkpoint_every
    tokens_run, t0 = 0, time.perf_counter()
    done = start
    for i in range(start, len(batches)):
        if stop.flag:
            break
        b = batches[i]
        kw = {k: v.to(device) for k, v in b.model_kwargs().items()}
        model(**kw, **collector.forward_kwargs)
        collector.finish()
        if fisher_acc is not None:
            with torch.enable_grad(), collector.paused():
                fisher_acc.add_batch(b, device)
        done = i + 1
        tokens_run += b.n_tokens
        if bar is not None:
            el = time.perf_counter() - t0
            bar.update(b.n_examples)
            bar.set_postfix_str(f"{tokens_run / max(el, 1e-9):,.0f} tok/s", refresh=False)
        if every and done % every == 0 and done < len(batches):
            save_ckpt(done)
        stop.step()
    return done


def _execute_sequential(job: _Job, dist, resume: bool):
    """--sequential: checkpoints hold the position (part, batch) and the host cache of hidden states.
    -> (collector, None), or (None, None) when stopped early (the checkpoint saved)."""
    from .sequential import SequentialRun

    args = job.args
    run = SequentialRun(args.model_dir, job.config, job.batches, device=job.device, dtype=job.dtype,
                        include=args.include, exclude=args.exclude, include_padding=args.include_padding,
                        share_inputs=not args.no_share, trust_remote_code=args.trust_remote_code,
                        adapter=args.adapter)
    state = others = None
    if resume:
        state, others = read_checkpoint(job.ckpt, job.ckpt_signature, "sequential")
    # under torchrun every rank goes on from the same block's start, or every rank starts afresh
    position = _position(state)
    if dist.agree_resume(position) is None and position is not None:
        state = None
        if os.path.exists(job.ckpt):
            os.remove(job.ckpt)  # before the work files it names: never a checkpoint without them
    if state is not None:
        run.load_checkpoint(state, others, job.ckpt, job.ckpt_signature)
        print(f"regmean_fast: resuming from {job.ckpt} at {run.position()}", file=sys.stderr)
    else:
        remove_work_folder(job.ckpt)  # an abandoned run's

    def save_ckpt():
        write_checkpoint(job.ckpt, run.collector, job.ckpt_signature, "sequential", run.checkpoint_extra())

    def on_part_done(li):
        # torchrun: the ranks sum the part's Grams into rank 0 and agree whether to stop here. A finished part's
        # Grams go to the work folder (rank 0's: the sums; the other ranks have none left): memory holds one
        # block's, and a checkpoint names them
        dist.meet_part(run.collector, run.part_keys(li), stop, f"the Grams of part {li + 1} of {run.n_parts}")
        run.spill_part(li, work_folder(job.ckpt), job.ckpt_signature)
        kill_point("grams.spilled")
        if args.checkpoint_every and (li + 1) % args.checkpoint_every == 0 and not run.complete:
            save_ckpt()

    kill_point("grams.loaded")
    dist.ready()
    try:
        with Stop() as asked:
            stop = dist.sequential_stop(asked)  # under torchrun: raised at part ends only, on every rank at once
            run.run(stop, on_part_done, progress=not args.no_progress and dist.is_main)
    except BaseException:
        if not os.path.exists(job.ckpt):  # no checkpoint refers to the work files: nothing to keep
            remove_work_folder(job.ckpt)
        raise
    dist.done()
    where = "with this rank's share done" if run.complete else f"before {run.position()}"
    if save_if_stopped(dist, asked, run.complete, save_ckpt, job.ckpt, where):
        return None, None
    return run.collector, None


def _position(state: dict | None):
    """A --sequential checkpoint's (part, batch), or None (none, or unreadable: load_checkpoint says why)."""
    try:
        return None if state is None else (int(state["part"]), int(state["batch"]))
    except (KeyError, TypeError, ValueError):
        return None


# --------------------------------------------------------------------------------------------------
# publish


def _publish(job: _Job, dist, collector, fisher) -> None:
    """The ranks' Grams summed into rank 0, which writes the Gram file and says what it holds."""
    dist.meet(collector)
    if not dist.is_main:
        dist.written()  # rank 0 writes; a failure there stops us too
        return
    args = job.args
    path = collector.save(args.out, metadata=job.metadata, packed=args.packed, shard_size=job.shard_size,
                          overwrite=args.force, fisher=fisher)
    kill_point("grams.written")
    n_mod = len(collector.module_entries())
    n_keys = len({v["key"] for v in collector.module_entries().values()})
    print(f"regmean_fast: wrote {path}: {n_keys} Grams for {n_mod} modules, {collector.tokens} tokens, "
          f"{collector.examples} examples", file=sys.stderr)
    if collector.unseen_modules():
        print(f"regmean_fast: note: modules that saw no data (left out): {', '.join(collector.unseen_modules())}",
              file=sys.stderr)
    dist.written()
