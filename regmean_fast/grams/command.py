"""`python -m regmean_fast grams MODEL_DIR --data FILE --out GRAMS`: collect a model's Gram file.

Every problem with the inputs is reported before any heavy work as one line
`regmean_fast: error: ...` with exit status 2, and nothing is written.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..io.hf import ModelFolderError
from .checkpoint import checkpoint_path
from .fileformat import GramsError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


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


# The data flags' meaning, shared with merge --method regmean++ (which reads its calibration data the same way).
DATA_FLAG_HELP = {
    "--text-field": "JSONL field / CSV column with the text (default: text); JSONL lines without it may carry a "
                    "chat 'messages' list, rendered with the tokenizer's chat template",
    "--max-length": "tokens per example, longer ones are truncated (default: min(512, the model's limit))",
    "--batch-size": "examples per forward (default: 8)",
    "--max-examples": "use the first N examples (default: all)",
}


def register_grams(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "grams",
        help="collect the Gram statistics (x x^T of every linear layer's inputs) of a model on your data",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model_dir", metavar="MODEL_DIR",
                   help="Hugging Face model folder (config.json, safetensors weights, sharded or not, or "
                        "pytorch_model.bin read weights-only; tokenizer files), or a Hub id org/name[@revision] "
                        "already in the Hugging Face cache (nothing is downloaded); or a PEFT LoRA adapter folder "
                        "(or BASE+ADAPTER), folded into its base")
    p.add_argument("--data", required=True, metavar="FILE",
                   help="JSON Lines, plain text (one example per line), CSV/TSV or Parquet, by extension "
                        "(or --format)")
    p.add_argument("--out", required=True, metavar="GRAMS",
                   help="output: X.safetensors (a file) or a folder (created whole)")
    g = p.add_argument_group("data")
    g.add_argument("--format", choices=("jsonl", "text", "csv", "tsv", "parquet"),
                   help="the data file's format (default: by extension: .jsonl/.json, .csv, .tsv, .parquet; "
                        "anything else is plain text)")
    g.add_argument("--text-field", default="text", help=DATA_FLAG_HELP["--text-field"])
    g.add_argument("--label-field", default="label",
                   help="labels for --fisher on classifiers: class indices or the config's label names; examples "
                        "without one use the model's prediction (default: label)")
    g.add_argument("--max-length", type=int, metavar="N", help=DATA_FLAG_HELP["--max-length"])
    g.add_argument("--batch-size", type=int, default=8, metavar="N", help=DATA_FLAG_HELP["--batch-size"])
    g.add_argument("--max-examples", type=int, metavar="N", help=DATA_FLAG_HELP["--max-examples"])
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
    g.add_argument("--fisher-tokens", choices=("sum", "mean"),
                   help="--fisher on a causal LM: an example's log-likelihood is the sum over its predicted tokens "
                        "(default: log p(y | x), so longer answers weigh more) or their mean (every example weighs "
                        "alike, whatever its length: for merging tasks of different answer lengths)")
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
    from .job import collect

    try:
        return 0 if collect(args) else EXIT_INTERRUPTED
    except (GramsError, ModelFolderError) as e:  # io.models' and io.lora's refusals among them
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
