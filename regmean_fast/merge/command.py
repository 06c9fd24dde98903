"""`python -m regmean_fast merge`: merge model folders with RegMean (or average, task_arithmetic, ties, dare_ties,
dare_linear, slerp, fisher).

    python -m regmean_fast merge --models A B C --grams GA GB GC --out OUT [--alpha 0.9 ...]
    python -m regmean_fast merge CONFIG.yaml --out OUT [flags override the file]
    python -m regmean_fast merge --method regmean++ --models A B C --data a.jsonl b.jsonl c.jsonl --out OUT

Bad input is one line on stderr and exit status 2, with nothing written."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..grams.command import DATA_FLAG_HELP
from .config import MergeConfig, ModelSpec, load_yaml
from .errors import MergeError
from .methods import METHODS

EPILOG = """example CONFIG.yaml (mergekit's format; paths relative to the working directory; unknown keys are errors):

  method: regmean                 # regmean | average (linear) | task_arithmetic | ties | dare_ties | dare_linear
                                  # | slerp | fisher | regmean++
  models:
    - model: ft/task_a
      grams: grams/task_a.safetensors   # python -m regmean_fast grams ft/task_a --data a.jsonl --out ...
      weight: 1.0                 # scaled so the weights sum to 1
    - model: ft/task_b
      grams: grams/task_b.safetensors
  parameters: {alpha: 0.9}
  out_dtype: bfloat16             # default: the models' dtype
  regmean_exclude: [".*classifier.*"]   # averaged instead

methods: regmean (one Gram file per model), average, task_arithmetic, ties, dare_ties, dare_linear and slerp
(--base-model; as mergekit defines them), fisher (Gram files collected with --fisher). Parameters may be
gradients over the layers or filtered by tensor name, as in mergekit. regmean++: one calibration data file
per model, read now (data: per model in the YAML, or --data; no Gram files).
OUT gets model*.safetensors (+ index), config.json, the tokenizer
and generation files, merge_report.json (per tensor: method, ridge, condition, expected error, time),
regmean_config.yml (rerun it to reproduce the merge) and README.md. Interrupted or killed at any moment:
rerun the same command with --resume.
Everything else: docs/merge.md."""


def register_merge(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("merge", help="merge fine-tuned model folders (RegMean by default) into one HF folder",
                       description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", metavar="CONFIG.yaml", help="mergekit-like YAML (see docs/merge.md)")
    p.add_argument("--out", required=True, help="output folder (created; refused if non-empty without --force)")
    g = p.add_argument_group("models")
    g.add_argument("--models", nargs="+", metavar="DIR", help="model folders or Hub ids, PEFT LoRA adapters (folders or BASE+ADAPTER) "
                   "among them (replace the file's models)")
    g.add_argument("--grams", nargs="+", metavar="GRAMS", help="one Gram file per model, in the same order")
    g.add_argument("--weights", nargs="+", type=float, metavar="W", help="one weight per model (default: equal)")
    g.add_argument("--base-model", metavar="DIR", help="base model (task_arithmetic, ties, dare_*, slerp)")
    g = p.add_argument_group("calibration data (regmean++; the same meaning as the grams command's flags)")
    g.add_argument("--data", nargs="+", metavar="FILE",
                   help="one data file per model, in the same order (JSON Lines, text, CSV/TSV, Parquet, by "
                        "extension); unlike RegMean's Gram files it must be present at merge time")
    for flag in ("--max-length", "--batch-size", "--max-examples"):
        g.add_argument(flag, type=int, metavar="N", help=DATA_FLAG_HELP[flag])
    g.add_argument("--text-field", metavar="NAME", help=DATA_FLAG_HELP["--text-field"])
    g = p.add_argument_group("method")
    g.add_argument("--method", help=f"{', '.join(METHODS)} (default regmean)")
    rm, ties, ties_model = METHODS["regmean"].params, METHODS["ties"].params, METHODS["ties"].model_params
    g.add_argument("--alpha", type=float,
                   help=f"RegMean: scale of the off-diagonal Gram entries, in [0, 1] (default {rm['alpha']}: on the "
                   "quality benchmarks in docs/quality.md 0.9 and 1.0 are level on the sentiment LMs (83.8%% both) "
                   "and 1.0 is 1.5 points ahead on the digits MLP (2 seeds, test splits); below 1 the summed "
                   "system stays positive definite, with scaled condition at most d_in / (1 - alpha), where at 1.0 "
                   "real LLM Grams are singular to fp32 rounding)")
    g.add_argument("--normalization", choices=("mean", "sum"),
                   help=f"RegMean: Grams divided by their token count (mean) or not (default {rm['normalization']})")
    g.add_argument("--scaling", type=float, help="task_arithmetic, ties, dare_*: lambda on the merged task vector "
                   f"(default {ties['scaling']})")
    g.add_argument("--density", type=float,
                   help=f"ties, dare_*: fraction of entries kept per task vector, for every model (default "
                   f"{ties_model['density']}: all, as mergekit)")
    g.add_argument("--seed", type=int, help="dare_*: seed of the random drop (default 0): the same seed draws the same "
                   "masks on any device, thread count or resumed run (Philox4x32-10; docs/merge.md)")
    g.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="any other method parameter, as JSON: normalize=true (task_arithmetic), t=0.5 (slerp), "
                   f"fisher_floor=1e-5 (fisher, default {METHODS['fisher'].params['fisher_floor']}); "
                   "gradients too: alpha=[0.5,0.9]")
    g.add_argument("--regmean-exclude", nargs="+", metavar="REGEX", help="tensors averaged instead of RegMean")
    g.add_argument("--allow-missing-grams", action=argparse.BooleanOptionalAction, default=None,
                   help="average (with a warning) a weight whose Gram is missing in some file, instead of failing "
                        "(default: fail; --no-allow-missing-grams overrides a YAML's allow_missing_grams: true)")
    g = p.add_argument_group("numerics and output")
    g.add_argument("--dtype", help="as mergekit's dtype: the arithmetic's and the output's (default: float32 "
                   "arithmetic, the models' dtype out); bfloat16/float16: float32 arithmetic, written in that dtype")
    g.add_argument("--solve-dtype", help="RegMean solve dtype: float32 (default; a group whose expected relative "
                   "error is above 1e-5, or 1/16 of a bf16/fp16 output's rounding, is solved again in float64, and the report "
                   "says so) or float64 (every group)")
    g.add_argument("--out-dtype", help="output dtype (default: the models' dtype)")
    g.add_argument("--shard-size", help="output shard size, e.g. 5GB (default), 500MB")
    g.add_argument("--no-copy-tokenizer", dest="copy_tokenizer", action="store_false", default=None,
                   help="do not copy the tokenizer and generation files of the base (or first) model")
    g = p.add_argument_group("resources and safety")
    g.add_argument("--device", help="cpu (default), cuda or cuda:N")
    g.add_argument("--max-memory", help="host memory budget for the working set, e.g. 16GB (checked up front)")
    g.add_argument("--resume", action="store_true",
                   help="after Ctrl-C or a kill: reuse the verified shards of the partial folder; with none, start "
                        "from the beginning (a note says so); an OUT already complete and made by this same merge "
                        "is kept as it is (a note, exit 0); anything there made otherwise is refused")
    g.add_argument("--checkpoint-every", type=int, metavar="N",
                   help="regmean++: a checkpoint in the partial folder every N blocks, and at the end of the block "
                        "under way on Ctrl-C, so that --resume goes on from there (default: none; --resume then "
                        "merges every block again, keeping the finished shards)")
    g.add_argument("--force", action="store_true", help="replace an existing non-empty output folder")
    g.add_argument("--progress", action="store_true", help="show a progress bar")
    g.add_argument("--json", action="store_true", help="print the merge report as JSON")
    p.set_defaults(func=cmd_merge)
    return p


def config_from_args(args) -> MergeConfig:
    cfg = load_yaml(args.config) if args.config else MergeConfig()
    if args.models:
        old = cfg.models
        same = len(old) == len(args.models)  # the file's per-model settings apply to the same positions
        cfg.models = [ModelSpec(model=m, grams=old[i].grams if same else None, weight=old[i].weight if same else None,
                                parameters=dict(old[i].parameters) if same else {},
                                data=old[i].data if same else None)
                      for i, m in enumerate(args.models)]
    if not cfg.models:
        raise MergeError("no models: give --models or a CONFIG.yaml with models")
    if args.grams:
        if len(args.grams) != len(cfg.models):
            raise MergeError(f"got {len(args.grams)} Gram files for {len(cfg.models)} models")
        for m, g in zip(cfg.models, args.grams):
            m.grams = g
    if args.data:
        if len(args.data) != len(cfg.models):
            raise MergeError(f"got {len(args.data)} data files for {len(cfg.models)} models")
        for m, d in zip(cfg.models, args.data):
            m.data = d
    calibration = {k: getattr(args, k) for k in ("max_length", "batch_size", "max_examples", "text_field")
                   if getattr(args, k) is not None}
    if calibration:
        cfg.calibration = {**cfg.calibration, **calibration}
    if args.weights:
        if len(args.weights) != len(cfg.models):
            raise MergeError(f"got {len(args.weights)} weights for {len(cfg.models)} models")
        for m, w in zip(cfg.models, args.weights):
            m.weight = w
    for key in ("method", "base_model", "dtype", "solve_dtype", "out_dtype", "shard_size", "device", "max_memory",
                "allow_missing_grams", "copy_tokenizer", "seed", "checkpoint_every"):
        v = getattr(args, key)
        if v is not None:
            setattr(cfg, key, v)
    if args.regmean_exclude:
        cfg.regmean_exclude = list(args.regmean_exclude)
    params = dict(cfg.parameters)
    for key in ("alpha", "normalization", "scaling", "density"):
        v = getattr(args, key)
        if v is not None:
            params[key] = v
            for m in cfg.models:  # the flag overrides the file's per-model values too
                m.parameters.pop(key, None)
    for kv in args.param:
        if "=" not in kv:
            raise MergeError(f"--param expects KEY=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        try:
            params[k] = json.loads(v)
        except json.JSONDecodeError:
            params[k] = v
    cfg.parameters = params
    return cfg


def cmd_merge(args) -> int:
    from ..grams.command import EXIT_INTERRUPTED
    from .api import merge, partial_path

    cfg = config_from_args(args)
    try:
        report = merge(cfg, out=args.out, force=args.force, resume=args.resume, progress=args.progress)
    except KeyboardInterrupt:  # the verified shards stay in the temporary folder; the output is untouched
        tmp = partial_path(args.out)
        print("\nregmean_fast: interrupted; " + (f"the finished shards are kept in {tmp}: rerun the same command "
              "with --resume to continue" if os.path.isdir(tmp) else "nothing was written"), file=sys.stderr)
        return EXIT_INTERRUPTED
    from ..distributed import env_world

    if env_world()[1] != 0:  # torchrun: rank 0 prints the report
        return 0
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    elif not report.get("already_complete"):  # else the note said so: nothing was merged now
        n = len(report["tensors"])
        print(f"merged {len(cfg.models)} models with {report['method']}: {n} tensors ({report['groups']} RegMean "
              f"groups) in {report['total_time_s']:.2f} s -> {args.out}")
        for w in report["warnings"]:
            print(f"warning: {w}", file=sys.stderr)
    return 0
