"""Parquet calibration data (`--data x.parquet --text-field col`), read through pyarrow (the test extra)."""

import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import hf_tiny  # noqa: E402

from regmean_fast import load_grams  # noqa: E402
from regmean_fast.cli import main  # noqa: E402
from regmean_fast.grams.data import read_examples  # noqa: E402
from regmean_fast.grams.fileformat import GramsError  # noqa: E402


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    root = tmp_path_factory.mktemp("parquet")
    texts = hf_tiny.random_texts(7, seed=2)
    pq.write_table(pa.table({"id": list(range(7)), "body": texts, "label": [i % 2 for i in range(7)]}),
                   root / "d.parquet")
    (root / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return root, hf_tiny.save_tiny(root / "gpt2", "gpt2"), texts


def _grams(capsys, model, data, out, *extra):
    rc = main(["grams", str(model), "--data", str(data), "--out", str(out), "--batch-size", "3", "--no-progress",
               *map(str, extra)])
    return rc, capsys.readouterr().err


def test_parquet_reads_the_column_and_labels(fx):
    root, _, texts = fx
    exs = read_examples(root / "d.parquet", text_field="body", label_field="label")
    assert [e.text for e in exs] == texts and [e.label for e in exs] == [i % 2 for i in range(7)]
    assert exs[0].where == "row 1"


def test_parquet_grams_equal_jsonl(fx, tmp_path, capsys):
    root, model, _ = fx
    rc, err = _grams(capsys, model, root / "d.parquet", tmp_path / "p.safetensors", "--text-field", "body")
    assert rc == 0, err
    assert _grams(capsys, model, root / "d.jsonl", tmp_path / "j.safetensors")[0] == 0
    gp, gj = load_grams(tmp_path / "p.safetensors", verify=True), load_grams(tmp_path / "j.safetensors")
    assert gp.modules() == gj.modules() and gp.metadata["examples"] == 7
    for m in gj.modules():
        assert gp.count(m) == gj.count(m) and torch.equal(gp.gram(m), gj.gram(m))


def _refused(capsys, fx, tmp_path, data, what, *extra):
    root, model, _ = fx
    out = tmp_path / "g.safetensors"
    rc, err = _grams(capsys, model, data, out, *extra)
    assert rc == 2 and what in err and len(err.strip().splitlines()) == 1, err
    assert not [f for f in os.listdir(tmp_path) if f.startswith("g.")]  # no output, temporary or checkpoint


def test_parquet_missing_column(fx, tmp_path, capsys):
    root = fx[0]
    _refused(capsys, fx, tmp_path, root / "d.parquet", "no column 'text' (columns: id, body, label)")


def test_parquet_empty_and_broken_files(fx, tmp_path, capsys):
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    _refused(capsys, fx, tmp_path, empty, "not a readable Parquet file (Parquet file size is 0 bytes)")
    rows0 = tmp_path / "rows0.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), rows0)
    _refused(capsys, fx, tmp_path, rows0, "data file has no examples")
    junk = tmp_path / "junk.parquet"
    junk.write_text("text\nnot parquet\n")
    _refused(capsys, fx, tmp_path, junk, "not a readable Parquet file")
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": ["w1 w2", None]}), nulls)
    _refused(capsys, fx, tmp_path, nulls, "row 2: column 'text' is not a string")


def test_parquet_without_pyarrow(fx, tmp_path, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "pyarrow" or m.startswith("pyarrow.")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import pyarrow...` now raises ImportError
    with pytest.raises(GramsError, match=r"needs the pyarrow package \(pip install pyarrow\)"):
        read_examples(fx[0] / "d.parquet", text_field="body")
    _refused(capsys, fx, tmp_path, fx[0] / "d.parquet", "needs the pyarrow package", "--text-field", "body")
