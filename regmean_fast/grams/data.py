"""Calibration data for the grams command: read, tokenize, batch (every problem is a GramsError)."""

from __future__ import annotations

import csv
import itertools
import json
import os
import random
from dataclasses import dataclass, field

import torch

from .fileformat import GramsError

FORMATS = ("jsonl", "text", "csv", "tsv", "parquet")


@dataclass
class Example:
    where: str  # "line 12" / "row 3", for error messages
    text: str | None = None
    messages: list | None = None
    label: object = None


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None = None
    n_examples: int = 0
    n_tokens: int = 0
    extra: dict = field(default_factory=dict)

    def model_kwargs(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def detect_format(path: str, fmt: str | None) -> str:
    if fmt:
        if fmt not in FORMATS:
            raise GramsError(f"unknown data format {fmt!r} (one of {', '.join(FORMATS)})")
        return fmt
    ext = os.path.splitext(path)[1].lower()
    return {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv",
            ".parquet": "parquet", ".pq": "parquet"}.get(ext, "text")


def read_examples(path, fmt: str | None = None, text_field: str = "text", label_field: str | None = None,
                  messages_field: str = "messages", limit: int | None = None) -> list[Example]:
    """JSON Lines (text_field, or a chat messages_field), plain text (one example per non-empty line),
    CSV / TSV / Parquet (column text_field). With limit, the first `limit` examples: the rest of the file
    is neither read nor checked (a huge corpus with --max-examples 1000 reads about 1000 lines)."""
    out = list(itertools.islice(_iter_examples(path, fmt, text_field, label_field, messages_field), limit))
    if not out:
        raise GramsError(f"data file has no examples: {path}")
    return out


def _iter_examples(path, fmt, text_field, label_field, messages_field):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise GramsError(f"data file not found: {path}")
    if os.path.isdir(path):
        raise GramsError(f"data path is a folder, not a file: {path}")
    if not os.access(path, os.R_OK):
        raise GramsError(f"data file is not readable: {path}")
    fmt = detect_format(path, fmt)
    # text formats are read as "utf-8-sig": a byte-order mark (Windows editors) is not part of the first line
    try:
        if fmt == "jsonl":
            yield from _jsonl_examples(path, text_field, label_field, messages_field)
        elif fmt == "text":
            with open(path, encoding="utf-8-sig") as f:
                for i, line in enumerate(f, 1):
                    line = line.rstrip("\n").rstrip("\r")
                    if line.strip():
                        yield Example(where=f"line {i}", text=line)
        elif fmt in ("csv", "tsv"):
            yield from _csv_examples(path, fmt, text_field, label_field)
        elif fmt == "parquet":
            yield from _parquet_examples(path, text_field, label_field)
    except UnicodeDecodeError as e:
        raise GramsError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise GramsError(f"cannot read data file {path}: {e.strerror or e}") from None


def _jsonl_examples(path, text_field, label_field, messages_field):
    with open(path, encoding="utf-8-sig") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise GramsError(f"{path}: line {i}: malformed JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise GramsError(f"{path}: line {i}: expected a JSON object, got {type(obj).__name__}")
            ex = Example(where=f"line {i}", label=obj.get(label_field) if label_field else None)
            if text_field in obj:
                if not isinstance(obj[text_field], str):
                    raise GramsError(f"{path}: line {i}: field {text_field!r} is not a string")
                ex.text = obj[text_field]
            elif messages_field in obj:
                msgs = obj[messages_field]
                if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
                    raise GramsError(f"{path}: line {i}: field {messages_field!r} is not a list of messages")
                ex.messages = msgs
            else:
                raise GramsError(
                    f"{path}: line {i}: no {text_field!r} field (nor {messages_field!r}); "
                    f"keys: {', '.join(sorted(obj)) or 'none'}; choose one with --text-field"
                )
            yield ex


def _csv_examples(path, fmt, text_field, label_field):
    old_limit = csv.field_size_limit(2**31 - 1)  # a long document is one field (the default: 128 KiB)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, delimiter="," if fmt == "csv" else "\t")
            cols = reader.fieldnames or []
            if text_field not in cols:
                raise GramsError(f"{path}: no column {text_field!r} (columns: {', '.join(cols) or 'none'})")
            for row in reader:
                i = reader.line_num  # the row's last line
                txt = row.get(text_field)
                if txt is None:
                    raise GramsError(f"{path}: line {i}: missing value in column {text_field!r}")
                yield Example(where=f"line {i}", text=txt,
                              label=row.get(label_field) if label_field else None)
    except csv.Error as e:
        raise GramsError(f"{path}: line {reader.line_num}: malformed {fmt.upper()} ({e})") from None
    finally:
        csv.field_size_limit(old_limit)


def _parquet_examples(path, text_field, label_field):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise GramsError(f"{path}: reading Parquet needs the pyarrow package (pip install pyarrow)") \
            from None
    try:
        pf = pq.ParquetFile(path)
        cols = pf.schema_arrow.names
        if text_field not in cols:
            raise GramsError(f"{path}: no column {text_field!r} (columns: {', '.join(cols) or 'none'})")
        has_label = bool(label_field) and label_field in cols and label_field != text_field
        table = pf.read(columns=[text_field, label_field] if has_label else [text_field])  # only these
    except pa.ArrowException as e:  # empty, truncated or not Parquet at all
        raise GramsError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    labels = table.column(label_field).to_pylist() if has_label else None
    for i, txt in enumerate(table.column(text_field).to_pylist(), 1):
        if not isinstance(txt, str):
            raise GramsError(f"{path}: row {i}: column {text_field!r} is not a string")
        yield Example(where=f"row {i}", text=txt, label=labels[i - 1] if labels else None)


def select(examples: list[Example], max_examples: int | None, shuffle: bool, seed: int) -> list[Example]:
    if shuffle:
        examples = list(examples)
        random.Random(seed).shuffle(examples)
    if max_examples is not None:
        examples = examples[:max_examples]
    return examples


def tokenize(tokenizer, examples: list[Example], max_length: int, path: str = "data") -> list[list[int]]:
    """-> token ids per example (truncated to max_length). Chat examples use the tokenizer's template.
    An example tokenizes to nothing when no id is left besides the special tokens the tokenizer adds
    (e.g. [CLS] [SEP] around text its normaliser removes entirely)."""
    try:
        n_special = int(tokenizer.num_special_tokens_to_add())
    except Exception:  # a tokenizer without the method adds none we can tell
        n_special = 0
    if max_length <= n_special:
        raise GramsError(f"--max-length {max_length} leaves no room for text next to the tokenizer's "
                         f"{n_special} special tokens")
    out = []
    for ex in examples:
        if ex.messages is not None:
            if not getattr(tokenizer, "chat_template", None):
                raise GramsError(f"{path}: {ex.where}: a 'messages' example needs a tokenizer with a chat template")
            try:
                text = tokenizer.apply_chat_template(ex.messages, tokenize=False)
            except Exception as e:
                raise GramsError(f"{path}: {ex.where}: the chat template failed: {e}") from None
            ids = tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
        else:
            ids = tokenizer(ex.text, truncation=True, max_length=max_length)["input_ids"]
        if len(ids) <= (n_special if ex.messages is None else 0) or (ex.text is not None and not ex.text.strip()):
            raise GramsError(f"{path}: {ex.where}: the example tokenizes to nothing")
        out.append(list(ids))
    return out


def answer_starts(tokenizer, examples: list[Example]) -> list[int]:
    """Per example, where its answer begins: for a chat example that ends with the assistant's turn, the
    length of the conversation up to the assistant's generation prompt (what chat fine-tuning trains on
    follows it); 0 (every token) for text, or where the template's rendering of the answer does not extend
    its generation prompt. --fisher's next-token log-likelihood counts the tokens from there."""
    out = []
    for ex in examples:
        start = 0
        msgs = ex.messages
        if msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant" and len(msgs) > 1:
            try:
                prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
                full = tokenizer.apply_chat_template(msgs, tokenize=False)
            except Exception:  # noqa: BLE001 - tokenize() has already rendered it; a template without prompts
                prompt, full = None, ""
            if prompt and full.startswith(prompt):
                p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
                ids = tokenizer(full, add_special_tokens=False)["input_ids"]
                if ids[:len(p_ids)] == p_ids and len(ids) > len(p_ids):
                    start = len(p_ids)
        out.append(start)
    return out


def class_labels(examples: list[Example], n_classes: int | None, label2id: dict | None = None,
                 path: str = "data") -> list[int | None]:
    """The examples' labels as class indices (None where an example has none: the Fisher then uses the
    model's prediction). A label is an integer in [0, n_classes) (or its string) or a name of label2id
    (the config's); anything else is refused with its line."""
    out = []
    for ex in examples:
        v = ex.label
        if v is None or (isinstance(v, str) and not v.strip()):
            out.append(None)
            continue
        c = None
        if isinstance(v, int) and not isinstance(v, bool):
            c = v
        elif isinstance(v, float) and v.is_integer():
            c = int(v)
        elif isinstance(v, str):
            t = v.strip()
            c = (label2id or {}).get(t, int(t) if t.isdigit() else None)
        if c is None or (n_classes is not None and not 0 <= c < n_classes):
            rng = f" in 0..{n_classes - 1}" if n_classes else ""
            raise GramsError(f"{path}: {ex.where}: label {v!r} is not a class index{rng} or name")
        out.append(int(c))
    return out


def pad_id_of(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    return 0


def make_batches(ids: list[list[int]], batch_size: int, pad_id: int, max_tokens: int | None = None,
                 labels: list | None = None, longest_first: bool = False,
                 starts: list[int] | None = None) -> list[Batch]:
    """Right-padded batches. The examples are taken in data order until max_tokens real tokens (the last
    one is cut). longest_first then batches them from the longest down: each batch holds similar lengths,
    so little of the forward is spent on padding, and the largest batch comes first, so running out of
    memory shows at once. The Grams are sums over examples, equal up to fp32 rounding either way.
    starts: answer_starts' positions, kept per row in extra["answer_start"]."""
    kept: list[tuple[list[int], object, int]] = []
    total = 0
    for i, x in enumerate(ids):
        if max_tokens is not None:
            if total >= max_tokens:
                break
            x = x[: max_tokens - total]
        kept.append((x, labels[i] if labels is not None else None, starts[i] if starts is not None else 0))
        total += len(x)
    if longest_first:
        kept.sort(key=lambda e: -len(e[0]))  # stable: equal lengths keep data order
    batches: list[Batch] = []
    cur: list[list[int]] = []
    cur_labels: list = []
    cur_starts: list[int] = []

    def flush():
        if not cur:
            return
        S = max(len(x) for x in cur)
        inp = torch.full((len(cur), S), pad_id, dtype=torch.long)
        att = torch.zeros((len(cur), S), dtype=torch.long)
        for r, x in enumerate(cur):
            inp[r, : len(x)] = torch.tensor(x, dtype=torch.long)
            att[r, : len(x)] = 1
        lab = None  # class indices, -1 where an example has no label
        if labels is not None:
            lab = torch.tensor([-1 if v is None else int(v) for v in cur_labels], dtype=torch.long)
        extra = {"answer_start": torch.tensor(cur_starts, dtype=torch.long)} if starts is not None else {}
        batches.append(Batch(inp, att, lab, len(cur), int(att.sum()), extra))
        cur.clear()
        cur_labels.clear()
        cur_starts.clear()

    for x, label, start in kept:
        cur.append(x)
        cur_labels.append(label)
        cur_starts.append(start)
        if len(cur) == batch_size:
            flush()
    flush()
    return batches
