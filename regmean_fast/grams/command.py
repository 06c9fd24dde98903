"""`python -m regmean_fast grams MODEL_DIR --data FILE --out GRAMS`: collect a model's Gram file.

Every problem with the inputs is reported before any heavy work as one line
`regmean_fast: error: ...` with exit status 2, and nothing is written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import threading
import time

from .._version import __version__
from ..io import models
from ..io.models import ModelLoadError
from ..io.resume import kill_point
from .fileformat import GramsError, check_writable_folder, parse_size

DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# tests: stop as a Ctrl-C does after N steps of a run (a step: one batch; --sequential: one batch through one part)
_TEST_INTERRUPT_ENV = "REGMEAN_FAST_GRAMS_INTERRUPT_AFTER"
CHECKPOINT_FORMAT = "regmean_fast grams checkpoint"
CHECKPOINT_VERSION = "1"  # bump when the state or the tensors a checkpoint holds change meaning


EXAMPLES = """\
examples:
  # a fine-tuned classifier on its training data (JSON Lines with a "text" field)
  python -m regmean_fast grams ./my-bert --data train.jsonl --out my-bert.grams.safetensors

  # a causal LM on chat data ({"messages": [...]} lines, rendered with the tokenizer's chat template),
  # 10,000 examples of at most 1024 tokens, bf16 forward on a GPU, a checkpoint every 100 batches
  python -m regmean_fast grams ./my-llama --data chat.jsonl --out grams/ --max-length 1024 \\
      --max-examples 10000 --device cuda --dtype bf16 --checkpoint-every 100
  # ... interrupted (Ctrl-C) or killed? the same command plus --resume continues where it stopped

  # a decoder bigger than the GPU: one block at a time; a CSV column; 2 GB shards
  python -m regmean_fast grams ./llama-70b --data calib.csv --text-field body --out grams/ \\
      --sequential --device cuda --dtype bf16 --shard-size 2GB

The output: docs/gram-format.md; read it with regmean_fast.load_grams(path).
"""


def register_grams(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "grams",
        help="collect the Gram statistics (x x^T of every linear layer's inputs) of a model on your data",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model_dir", metavar="MODEL_DIR",
                   help="local Hugging Face model folder: config.json, safetensors weights (sharded or not), "
                        "tokenizer files")
    p.add_argument("--data", required=True, metavar="FILE",
                   help="JSON Lines, plain text (one example per line), CSV/TSV or Parquet, by extension "
                        "(or --format)")
    p.add_argument("--out", required=True, metavar="GRAMS",
                   help="output: X.safetensors (a file) or a folder (created whole)")
    g = p.add_argument_group("data")
    g.add_argument("--format", choices=("jsonl", "text", "csv", "tsv", "parquet"),
                   help="the data file's format (default: by extension: .jsonl/.json, .csv, .tsv, .parquet; "
                        "anything else is plain text)")
    g.add_argument("--text-field", default="text",
                   help="JSONL field / CSV column with the text (default: text); JSONL lines without it may "
                        "carry a chat 'messages' list, rendered with the tokenizer's chat template")
    g.add_argument("--label-field", default="label",
                   help="labels for --fisher on classifiers: class indices or the config's label names; examples "
                        "without one use the model's prediction (default: label)")
    g.add_argument("--max-length", type=int, metavar="N",
                   help="tokens per example, longer ones are truncated (default: min(512, the model's limit))")
    g.add_argument("--batch-size", type=int, default=8, metavar="N", help="examples per forward (default: 8)")
    g.add_argument("--max-examples", type=int, metavar="N", help="use the first N examples (default: all)")
    g.add_argument("--max-tokens", type=int, metavar="N",
                   help="stop after N (non-padding) tokens, cutting the last example (default: no limit)")
    g.add_argument("--shuffle", action="store_true", help="shuffle the examples with --seed before selecting")
    g.add_argument("--seed", type=int, default=0, help="for --shuffle (default: 0)")
    g.add_argument("--keep-order", action="store_true",
                   help="batch the examples in data order (default: longest first, so each batch holds similar "
                        "lengths and little time goes to padding; --include-padding implies this)")
    g = p.add_argument_group("model")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    g.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="forward dtype; the Grams are always summed in fp32 (default: fp32)")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow a model or tokenizer with custom code from its folder (default: off)")
    g.add_argument("--sequential", action="store_true",
                   help="one decoder block at a time from the memory-mapped weights (Llama, Mistral, Qwen2/3, Gemma-3; "
                        "other models run whole, with a note)")
    g = p.add_argument_group("statistics")
    g.add_argument("--include", action="append", metavar="REGEX",
                   help="only modules whose name matches (repeatable; default: every nn.Linear / Conv1D)")
    g.add_argument("--exclude", action="append", metavar="REGEX", help="skip modules whose name matches (repeatable)")
    g.add_argument("--include-padding", action="store_true",
                   help="keep padding rows (what the published codes do; default: dropped by the attention mask)")
    g.add_argument("--no-share", action="store_true", help="one Gram per module even when inputs are shared")
    g.add_argument("--fisher", action="store_true", help="also collect the diagonal empirical Fisher")
    g = p.add_argument_group("output")
    g.add_argument("--packed", action="store_true", help="store the upper triangle only (about half the size)")
    g.add_argument("--shard-size", metavar="SIZE",
                   help="split into shards of about this size, e.g. 2GB (default: one file)")
    g.add_argument("--force", action="store_true", help="overwrite an existing output")
    g.add_argument("--checkpoint-every", type=int, metavar="N",
                   help="write a checkpoint every N batches (--sequential: every N decoder blocks; default: "
                        "only on Ctrl-C)")
    g.add_argument("--resume", action="store_true",
                   help="after Ctrl-C or a kill: continue from the checkpoint beside --out; with none, start from "
                        "the beginning (a note says so); an --out already complete and made by this same command "
                        "is kept as it is (a note, exit 0); anything there made otherwise is refused")
    g.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=cmd_grams)
    return p


def _error(msg: str) -> int:
    print(f"regmean_fast: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def cmd_grams(args) -> int:
    from .. import distributed as DI

    try:
        return _run(args)
    except (GramsError, ModelLoadError) as e:
        _report_failure(DI, e)
        return _error(str(e).replace("\n", " "))
    except KeyboardInterrupt as e:  # before the loop, or a second Ctrl-C in it: no traceback
        _report_failure(DI, e)
        world, rank, _ = DI.env_world()
        ckpt = checkpoint_path(args.out, rank, world)
        kept = f"; the last checkpoint {ckpt} is kept: rerun with --resume" if os.path.exists(ckpt) else ""
        print(f"\nregmean_fast: interrupted; no Gram file written{kept}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BaseException as e:
        _report_failure(DI, e)  # torchrun: the other ranks stop with a clear error at their next sync point
        raise
    finally:
        if DI._CTX is not None:
            DI._CTX.close()


def _report_failure(DI, e) -> None:
    if DI._CTX is not None:
        DI._CTX.fail(e)


def checkpoint_path(out: str, rank: int = 0, world: int = 1) -> str:
    """Beside --out; one file per rank under torchrun (OUT.checkpoint.rank1-of-4.safetensors)."""
    tail = f".checkpoint.rank{rank}-of-{world}.safetensors" if world > 1 else ".checkpoint.safetensors"
    return os.path.abspath(out).rstrip(os.sep) + tail


# --------------------------------------------------------------------------------------------------
# validation


def output_target(out: str) -> str:
    """The path that stands for the Gram file --out names: X.safetensors, or its index when it is sharded."""
    if out.endswith(".safetensors") and not os.path.exists(out) and os.path.exists(out + ".index.json"):
        return out + ".index.json"
    return out


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
        h.update(f"{os.path.basename(p)}:{os.path.getsize(p)}".encode())
    keys = ("format", "text_field", "batch_size", "max_examples", "max_tokens", "shuffle", "seed", "keep_order",
            "dtype", "include", "exclude", "include_padding", "no_share", "sequential", "fisher", "label_field")
    opts = {k: getattr(args, k) for k in keys}
    h.update(json.dumps(dict(opts, max_length=max_length, world=world), sort_keys=True).encode())
    for b in batches:
        for t in (b.input_ids, b.attention_mask, b.labels):
            if t is not None:
                h.update(f"{t.dtype}{tuple(t.shape)}".encode())
                h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# checkpoints


def write_checkpoint(path: str, collector, signature: str, mode: str, extra: dict | None = None) -> None:
    """Atomically: the collector's state, the run's own position (extra; its "_tensors" become tensors)."""
    from safetensors.torch import save_file

    st = collector.state()
    meta = {k: v for k, v in st.items() if k != "grams"}
    extra = dict(extra or {})
    more = extra.pop("_tensors", {})
    meta.update(extra, mode=mode)
    tmp = f"{path}.tmp-{os.getpid()}"
    tensors = {"gram." + k: G.contiguous() for k, G in st["grams"].items()}
    tensors.update({k: v.detach().cpu().contiguous() for k, v in more.items()})
    try:
        save_file(tensors, tmp, metadata={"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                                          "signature": signature, "state": json.dumps(meta)})
        kill_point("grams.checkpoint-tmp")
        os.replace(tmp, path)
    except BaseException:  # a full disk or a second Ctrl-C: leave the previous checkpoint, not a torso
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_checkpoint(path: str, signature: str, mode: str) -> tuple[dict, dict]:
    """-> (state with "grams", the other tensors); a checkpoint of another run or version is refused."""
    from safetensors import safe_open

    meta = checkpoint_header(path, signature, mode)
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise GramsError(f"unreadable checkpoint {path}: {e}") from None
    state = json.loads(meta["state"])
    state["grams"] = {k[5:]: v for k, v in tensors.items() if k.startswith("gram.")}
    others = {k: v for k, v in tensors.items() if not k.startswith("gram.")}
    return state, others


def checkpoint_header(path: str, signature: str, mode: str) -> dict:
    """The checkpoint's metadata, reading no tensor; GramsError when it is not this run's (version, signature,
    mode) or not a checkpoint at all."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise GramsError(f"unreadable checkpoint {path}: {e}") from None
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("version") != CHECKPOINT_VERSION:
        raise GramsError(
            f"checkpoint {path} is not a version-{CHECKPOINT_VERSION} regmean_fast grams checkpoint "
            f"(version {meta.get('version', 'none')}); delete it and rerun without --resume"
        )
    if meta.get("signature") != signature:
        raise GramsError(
            f"checkpoint {path} was made with another model, data or settings; rerun with the same command "
            "or delete it"
        )
    try:
        made_in = json.loads(meta["state"]).get("mode")
    except (KeyError, ValueError, AttributeError):
        raise GramsError(f"unreadable checkpoint {path}: no valid state") from None
    if made_in != mode:
        raise GramsError(f"checkpoint {path} is from a {made_in} run, this run is {mode}; "
                         "rerun with the same command or delete it")
    return meta


def _resume_from_checkpoint(args, out: str, ckpt: str, signature: str, ckpt_signature: str, mode: str,
                            ctx) -> bool | None:
    """What this run starts from: True the checkpoint, False nothing (always without --resume), None: the Gram
    file is already complete and made by this command (nothing to do; the stale checkpoint is removed).
    Under torchrun rank 0 judges the one output for every rank; each rank judges its own checkpoint."""
    if not args.resume:
        return False
    from ..io.resume import CONTINUE, DONE, Found, ResumeError, resume_action

    ctx.sync(None, "the resume check")  # every rank got here (a failing rank reports at this collective)
    output = ctx.broadcast_object(_found_output(out, signature) if ctx.is_main else None, "the output's state")
    partial = None
    if os.path.exists(ckpt):
        try:
            checkpoint_header(ckpt, ckpt_signature, mode)
            partial = Found(ckpt)
        except GramsError as e:
            partial = Found(ckpt, str(e))
    try:
        action, note = resume_action(output, partial, ckpt, force=args.force)
    except ResumeError as e:
        raise GramsError(str(e)) from None
    if note and (ctx.is_main or action != DONE):
        ctx.log("note: " + note)
    if action == DONE:
        if partial is not None and partial.matches:
            os.remove(ckpt)
        return None
    return action == CONTINUE


def _found_output(out: str, signature: str):
    """The Gram file at --out as io.resume sees it: None (absent), made by this command or not (and why)."""
    from ..io.resume import Found
    from .fileformat import load_grams

    target = output_target(out)
    if not os.path.lexists(target):
        return None
    try:
        made_by = load_grams(target).metadata.get("signature")
    except Exception as e:  # noqa: BLE001 - anything unreadable is simply not ours
        return Found(target, f"is not a readable Gram file ({str(e).splitlines()[0] if str(e) else e})")
    if made_by != signature:
        return Found(target, "was made with another model, data or settings" if made_by else
                     "records no signature of what made it (an older regmean_fast, or another tool)")
    return Found(target)


class _Stop:
    """Ctrl-C (or the test hook) asks the run to stop after its current step; a second Ctrl-C aborts."""

    def __init__(self):
        self.flag = False
        self.steps = 0
        self.after = int(os.environ.get(_TEST_INTERRUPT_ENV, "0") or 0)
        self._old = None

    def step(self) -> None:
        kill_point("grams.step")
        self.steps += 1
        if self.after and self.steps >= self.after:
            self.flag = True

    def _on_sigint(self, signum, frame):
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True
        print("\nregmean_fast: interrupted; finishing the current batch and saving a checkpoint "
              "(Ctrl-C again to abort without one)", file=sys.stderr)

    def __enter__(self) -> "_Stop":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._old = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None


def _save_if_stopped(ctx, stop: _Stop, finished: bool, save, ckpt: str, where: str) -> bool:
    """After the loop, on every rank: if this rank stopped early (under torchrun: if any rank did), save the
    checkpoint, say how to resume and return True (the command then exits with EXIT_INTERRUPTED)."""
    stopped = stop.flag and not finished
    if ctx.enabled:  # one rank interrupted: every rank saves its checkpoint and stops
        stopped = ctx.all_sum([int(stopped)], "the interruption flags")[0] > 0
    if not stopped:
        return False
    save()
    ctx.log(f"interrupted {where}; checkpoint saved to {ckpt}. Resume with the same command plus --resume")
    return True


def _remove_checkpoint(ckpt: str) -> None:
    """The Gram file is complete: its checkpoint, and any checkpoint a kill left half-written, go."""
    import glob

    for p in [ckpt] + glob.glob(glob.escape(ckpt) + ".tmp-*"):
        if os.path.exists(p):
            os.remove(p)
    kill_point("grams.finished")


# --------------------------------------------------------------------------------------------------
# the run


def _run(args) -> int:
    # ---- cheap checks first, in the order a user would fix them
    if args.batch_size is not None and args.batch_size < 1:
        raise GramsError("--batch-size must be >= 1")
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
    out = args.out
    from .. import distributed as DI

    model_dir = args.model_dir
    st_files = models.check_model_dir(model_dir)
    check_out_spares_inputs(out, model_dir, st_files, args.data)
    check_output(out, args.force, args.resume)
    kill_point("grams.start")

    from . import data as D

    examples = D.read_examples(args.data, args.format, args.text_field, args.label_field if args.fisher else None,
                               limit=None if args.shuffle else args.max_examples)  # --shuffle draws from them all
    device = resolve_device(args.device)
    ctx = DI.init_from_env(device)  # torchrun: join the process group; 'cuda' means cuda:LOCAL_RANK
    device = ctx.device

    import torch

    models.quiet_transformers()
    config = models.load_config(model_dir, args.trust_remote_code)
    from .collect import find_linear_modules

    skeleton = models.meta_model(config, args.trust_remote_code)
    if not find_linear_modules(skeleton, args.include, args.exclude)[0]:
        flags = [f"--{f} {p!r}" for f in ("include", "exclude") for p in getattr(args, f) or []]
        raise GramsError("no nn.Linear / Conv1D modules matched" + (f" ({' '.join(flags)})" if flags else ""))
    del skeleton
    limit = models.model_limit(config)
    if args.max_length is not None and limit is not None and args.max_length > limit:
        raise GramsError(f"--max-length {args.max_length} is beyond the model's limit of {limit} positions")
    max_length = args.max_length or min(512, limit or 512)
    tokenizer = models.load_tokenizer(model_dir, args.trust_remote_code)
    examples = D.select(examples, args.max_examples, args.shuffle, args.seed)
    ids = D.tokenize(tokenizer, examples, max_length, args.data)
    labels = None
    archs = getattr(config, "architectures", None) or []
    if args.fisher and any(a.endswith("ForSequenceClassification") for a in archs):  # custom code's too
        labels = D.class_labels(examples, getattr(config, "num_labels", None), getattr(config, "label2id", None),
                                args.data)
    # Longest first wastes less of the forward on padding; with --include-padding the padding is data
    # (the published codes' Grams), so the batches keep the order they would have had there.
    batches = D.make_batches(ids, args.batch_size, D.pad_id_of(tokenizer), args.max_tokens, labels,
                             longest_first=not (args.keep_order or args.include_padding))
    signature = _signature(args, model_dir, st_files, max_length, batches, ctx.world)
    ckpt_signature = signature
    if ctx.enabled:  # each rank: its own disjoint share of the batches, its own checkpoint
        batches = ctx.shard(batches)
        ckpt_signature = hashlib.sha256(f"{signature}:rank{ctx.rank}of{ctx.world}".encode()).hexdigest()
    torch.manual_seed(args.seed)
    dtype = getattr(torch, DTYPES[args.dtype])

    metadata = {
        "tool": "regmean_fast",
        "tool_version": __version__,
        "model": os.path.basename(os.path.abspath(model_dir)),
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
    if ctx.enabled:
        metadata["ranks"] = ctx.world

    if args.sequential:
        from .sequential import sequential_supported

        ok, why = sequential_supported(config)
        if not ok:
            print(f"regmean_fast: note: --sequential is not available for this model ({why}); "
                  "running the whole model at once", file=sys.stderr)
            args.sequential = False
            metadata["mode"] = "whole-model"
    if args.sequential and args.fisher:
        print("regmean_fast: note: --fisher needs gradients through the whole model; running the whole model "
              "at once", file=sys.stderr)
        args.sequential = False
        metadata["mode"] = "whole-model"
    ckpt = checkpoint_path(out, ctx.rank, ctx.world)
    resume = _resume_from_checkpoint(args, out, ckpt, signature, ckpt_signature, metadata["mode"], ctx)
    if resume is None:
        return 0
    if args.sequential:
        return _run_sequential(args, model_dir, config, batches, device, dtype, ckpt_signature, ckpt, out,
                               metadata, shard_size, ctx, resume)

    from .collect import GramCollector

    model = models.load_model(model_dir, config, dtype, device, args.trust_remote_code)
    collector = GramCollector(model, include=args.include, exclude=args.exclude,
                              include_padding=args.include_padding, share_inputs=not args.no_share)
    fisher_acc = None
    if args.fisher:
        from .fisher import FisherAccumulator

        fisher_acc = FisherAccumulator(model)
    start = 0
    if resume:
        state, others = read_checkpoint(ckpt, ckpt_signature, "whole-model")
        collector.load_state(state, device=device)
        start = int(state["done_batches"])
        if fisher_acc is not None:
            fisher_acc.load_state(others, int(state.get("fisher_examples", 0)), device)
        print(f"regmean_fast: resuming from {ckpt} after {start} of {len(batches)} batches", file=sys.stderr)

    n_examples = sum(b.n_examples for b in batches)
    done_examples = sum(b.n_examples for b in batches[:start])
    bar = None
    if not args.no_progress and ctx.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_examples, initial=done_examples, unit="ex", desc="grams", dynamic_ncols=True,
                   file=sys.stderr)
    tokens_run, t0 = 0, time.perf_counter()
    done = start

    def save_ckpt(n_done):
        extra = {"done_batches": n_done}
        if fisher_acc is not None:
            extra["fisher_examples"] = fisher_acc.examples
            extra["_tensors"] = fisher_acc.state_tensors()
        write_checkpoint(ckpt, collector, ckpt_signature, "whole-model", extra)

    kill_point("grams.loaded")
    ctx.sync(None, "the start")  # every rank has its model and data (else all stop here)
    with _Stop() as stop, collector, torch.no_grad():
        for i in range(start, len(batches)):
            if stop.flag:
                break
            b = batches[i]
            kw = {k: v.to(device) for k, v in b.model_kwargs().items()}
            model(**kw)
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
            if args.checkpoint_every and done % args.checkpoint_every == 0 and done < len(batches):
                save_ckpt(done)
            stop.step()
    ctx.sync(None, "the end of the statistics")
    if bar is not None:
        bar.close()
    if _save_if_stopped(ctx, stop, done == len(batches), lambda: save_ckpt(done), ckpt,
                        f"after {done} of {len(batches)} batches"):
        return EXIT_INTERRUPTED
    fisher = fisher_acc.result() if fisher_acc is not None else None
    if fisher_acc is not None:
        metadata["fisher_examples"] = fisher_acc.examples
        metadata["fisher_labels"] = fisher_acc.label_source or ("next-token" if fisher_acc.kind == "causal" else None)
    if ctx.enabled and fisher_acc is not None:
        from ..distributed import reduce_tensor_dict

        metadata["fisher_examples"] = ctx.all_sum([fisher_acc.examples], "the Fisher counts")[0]
        summed = reduce_tensor_dict(ctx, fisher_acc.sums, "the Fisher sums")
        fisher = {n: F.detach().cpu() for n, F in summed.items()} if ctx.is_main else None
    rc = _finish(args, collector, out, metadata, shard_size, fisher, ctx)
    _remove_checkpoint(ckpt)
    return rc


def _run_sequential(args, model_dir, config, batches, device, dtype, signature, ckpt, out, metadata, shard_size,
                    ctx, resume: bool) -> int:
    """--sequential: checkpoints hold the position (part, batch) and the host cache of hidden states."""
    from .sequential import SequentialRun

    run = SequentialRun(model_dir, config, batches, device=device, dtype=dtype, include=args.include,
                        exclude=args.exclude, include_padding=args.include_padding, share_inputs=not args.no_share,
                        trust_remote_code=args.trust_remote_code)
    if resume:
        state, others = read_checkpoint(ckpt, signature, "sequential")
        run.load_checkpoint(state, others, ckpt)
        print(f"regmean_fast: resuming from {ckpt} at {run.position()}", file=sys.stderr)

    def save_ckpt():
        write_checkpoint(ckpt, run.collector, signature, "sequential", run.checkpoint_extra())

    def on_part_done(li):
        if args.checkpoint_every and (li + 1) % args.checkpoint_every == 0 and not run.complete:
            save_ckpt()

    kill_point("grams.loaded")
    ctx.sync(None, "the start")
    with _Stop() as stop:
        run.run(stop, on_part_done, progress=not args.no_progress and ctx.is_main)
    ctx.sync(None, "the end of the statistics")
    # complete yet stopped: under torchrun, another rank was interrupted
    where = "with this rank's share done" if run.complete else f"before {run.position()}"
    if _save_if_stopped(ctx, stop, run.complete, save_ckpt, ckpt, where):
        return EXIT_INTERRUPTED
    rc = _finish(args, run.collector, out, metadata, shard_size, None, ctx)
    _remove_checkpoint(ckpt)
    return rc


def _finish(args, collector, out, metadata, shard_size, fisher, ctx=None) -> int:
    if ctx is not None and ctx.enabled:
        collector.reduce_to_rank0(ctx)  # Grams and counts summed into rank 0, one Gram at a time
        if not ctx.is_main:
            ctx.sync(None, "the writing of the Gram file")  # rank 0 writes; a failure there stops us too
            return 0
    path = collector.save(out, metadata=metadata, packed=args.packed, shard_size=shard_size,
                          overwrite=args.force, fisher=fisher)
    kill_point("grams.written")
    n_mod = len(collector.module_entries())
    n_keys = len({v["key"] for v in collector.module_entries().values()})
    print(f"regmean_fast: wrote {path}: {n_keys} Grams for {n_mod} modules, {collector.tokens} tokens, "
          f"{collector.examples} examples", file=sys.stderr)
    if collector.unseen_modules():
        print(f"regmean_fast: note: modules that saw no data (left out): {', '.join(collector.unseen_modules())}",
              file=sys.stderr)
    if ctx is not None and ctx.enabled:
        ctx.sync(None, "the writing of the Gram file")
    return 0
