import json
import os
import struct

import pytest
import torch

from regmean_fast.grams.fileformat import (
    GramFileError,
    GramSet,
    load_grams,
    parse_size,
    save_grams,
)


def _spd(d, seed):
    """An SPD matrix that is bitwise symmetric: the file stores one triangle, and ``X.T @ X`` is not
    symmetric to the last bit on every BLAS (AVX-512 without AMX: |G - G.T| ~ 5e-7), so the lower triangle
    is the mirror of the upper one by construction."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(3 * d, d, generator=g)
    G = X.T @ X
    return torch.triu(G) + torch.triu(G, 1).T


def _example():
    grams = {"l0.q": _spd(6, 0), "l0.o": _spd(6, 1), "l0.fc": _spd(4, 2)}
    counts = {"l0.q": 18, "l0.o": 18, "l0.fc": 12}
    module_map = {"l0.q": "l0.q", "l0.k": "l0.q", "l0.v": "l0.q", "l0.o": "l0.o", "l0.fc": {"key": "l0.fc", "conv1d": True}}
    fp = {
        "model_type": "toy",
        "architectures": ["Toy"],
        "weights": {"l0.q": [6, 6], "l0.k": [3, 6], "l0.v": [3, 6], "l0.o": [6, 6], "l0.fc": [4, 8]},
    }
    return grams, counts, module_map, fp


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("shard", [None, 150])
@pytest.mark.parametrize("as_folder", [False, True])
def test_roundtrip(tmp_path, packed, shard, as_folder):
    grams, counts, mm, fp = _example()
    fisher = {"l0.q.weight": torch.rand(6, 6)}
    out = tmp_path / ("g" if as_folder else "g.safetensors")
    p = save_grams(out, grams, counts, mm, fp, {"examples": 3}, packed=packed, shard_size=shard,
                   fisher=fisher, conv1d=["l0.fc"])
    gs = load_grams(p, verify=True)
    gs2 = load_grams(out)  # the path given to save also opens
    assert gs2.modules() == gs.modules() == list(mm)
    assert gs.groups() == {"l0.q": ["l0.q", "l0.k", "l0.v"], "l0.o": ["l0.o"], "l0.fc": ["l0.fc"]}
    for m, k in mm.items():
        k = k["key"] if isinstance(k, dict) else k
        assert gs.gram_key(m) == k
        assert torch.equal(gs.gram(m), grams[k])
        assert gs.count(m) == counts[k]
        assert gs.dim(m) == grams[k].shape[0]
    assert gs.is_conv1d("l0.fc") and not gs.is_conv1d("l0.q")
    assert gs.fingerprint == fp and gs.metadata == {"examples": 3}
    assert gs.has_fisher and torch.equal(gs.fisher("l0.q.weight"), fisher["l0.q.weight"])
    assert gs.fisher("nope") is None
    if shard:
        names = os.listdir(out if as_folder else tmp_path)
        assert any(n.endswith(".index.json") for n in names)
        assert sum(n.endswith(".safetensors") for n in names) > 1
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_only_upper_triangle_counts(tmp_path):
    grams, counts, mm, fp = _example()
    G = grams["l0.q"]
    grams["l0.q"] = torch.triu(G) + torch.tril(torch.full_like(G, 7.0), -1)
    p = save_grams(tmp_path / "g.safetensors", grams, counts, mm, fp, {})
    assert torch.equal(load_grams(p).gram("l0.k"), G)


def test_folder_output_gets_the_usual_modes(tmp_path):
    """A folder output is built in a private temporary folder; renamed into place, it has the modes a plain
    mkdir would give (readable by others under umask 022), not 0700."""
    grams, counts, mm, fp = _example()
    old = os.umask(0o022)
    try:
        save_grams(tmp_path / "g", grams, counts, mm, fp, {})
        os.mkdir(tmp_path / "plain")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "g").st_mode & 0o777 == os.stat(tmp_path / "plain").st_mode & 0o777 == 0o755


def test_refuses_overwrite(tmp_path):
    grams, counts, mm, fp = _example()
    p = tmp_path / "g.safetensors"
    save_grams(p, grams, counts, mm, fp, {})
    with pytest.raises(GramFileError, match="already exists"):
        save_grams(p, grams, counts, mm, fp, {})
    save_grams(p, grams, counts, mm, fp, {"x": 1}, overwrite=True)
    assert load_grams(p).metadata == {"x": 1}
    d = tmp_path / "dir"
    save_grams(d, grams, counts, mm, fp, {})
    with pytest.raises(GramFileError, match="already exists"):
        save_grams(d, grams, counts, mm, fp, {})
    save_grams(d, grams, counts, mm, fp, {"y": 2}, overwrite=True)
    assert load_grams(d).metadata == {"y": 2}


def _rewrite_header(path, fn):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    hdr = json.loads(raw[8 : 8 + n])
    fn(hdr)
    new = json.dumps(hdr).encode()
    new += b" " * ((8 - len(new) % 8) % 8)
    open(path, "wb").write(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def test_rejects_truncated(tmp_path):
    grams, counts, mm, fp = _example()
    p = str(tmp_path / "g.safetensors")
    save_grams(p, grams, counts, mm, fp, {})
    raw = open(p, "rb").read()
    open(p, "wb").write(raw[:-10])
    with pytest.raises(GramFileError):
        load_grams(p)
    open(p, "wb").write(raw[:20])
    with pytest.raises(GramFileError):
        load_grams(p)


def test_rejects_wrong_version_and_format(tmp_path):
    grams, counts, mm, fp = _example()
    p = str(tmp_path / "g.safetensors")
    save_grams(p, grams, counts, mm, fp, {})
    _rewrite_header(p, lambda h: h["__metadata__"].update(version="2"))
    with pytest.raises(GramFileError, match="version"):
        load_grams(p)
    _rewrite_header(p, lambda h: h["__metadata__"].update(version="1", format="other"))
    with pytest.raises(GramFileError, match="not a regmean_fast Gram file"):
        load_grams(p)


def test_rejects_bad_counts_and_mapping(tmp_path):
    grams, counts, mm, fp = _example()
    p = str(tmp_path / "g.safetensors")
    save_grams(p, grams, counts, mm, fp, {})
    _rewrite_header(p, lambda h: h["__metadata__"].update(counts=json.dumps({"l0.q": 0, "l0.o": 1, "l0.fc": 1})))
    with pytest.raises(GramFileError, match="count"):
        load_grams(p)
    with pytest.raises(GramFileError, match="count"):
        save_grams(tmp_path / "h.safetensors", grams, dict(counts, **{"l0.o": 0}), mm, fp, {})
    bad_fp = dict(fp, weights=dict(fp["weights"], **{"l0.o": [6, 5]}))
    with pytest.raises(GramFileError, match="input size"):
        save_grams(tmp_path / "i.safetensors", grams, counts, mm, bad_fp, {})
    _rewrite_header(p, lambda h: h["__metadata__"].update(counts=json.dumps(counts), fingerprint=json.dumps(bad_fp)))
    with pytest.raises(GramFileError, match="input size"):
        load_grams(p)


def _write_raw(path, grams, counts, mm, fp):
    from safetensors.torch import save_file

    save_file(
        {"gram." + k: v.contiguous() for k, v in grams.items()},
        path,
        metadata={
            "format": "regmean_fast.grams", "version": "1", "layout": "full",
            "modules": json.dumps({m: k if isinstance(k, dict) else {"key": k, "conv1d": False} for m, k in mm.items()}),
            "counts": json.dumps(counts), "dims": json.dumps({k: v.shape[0] for k, v in grams.items()}),
            "fingerprint": json.dumps(fp), "provenance": "{}",
        },
    )


def test_rejects_nonsymmetric_and_nonfinite(tmp_path):
    grams, counts, mm, fp = _example()
    bad = dict(grams)
    G = grams["l0.o"].clone()
    G[0, 3] += 1.0
    bad["l0.o"] = G
    p = str(tmp_path / "a.safetensors")
    _write_raw(p, bad, counts, mm, fp)
    gs = load_grams(p)
    assert torch.equal(gs.gram("l0.q"), grams["l0.q"])
    with pytest.raises(GramFileError, match="not symmetric"):
        gs.gram("l0.o")
    with pytest.raises(GramFileError, match="not symmetric"):
        load_grams(p, verify=True)
    G = grams["l0.fc"].clone()
    G[1, 1] = float("nan")
    bad = dict(grams, **{"l0.fc": G})
    p = str(tmp_path / "b.safetensors")
    _write_raw(p, bad, counts, mm, fp)
    with pytest.raises(GramFileError, match="non-finite"):
        load_grams(p, verify=True)
    with pytest.raises(GramFileError, match="non-finite"):
        save_grams(tmp_path / "c.safetensors", bad, counts, mm, fp, {})


def test_missing_files(tmp_path):
    with pytest.raises(GramFileError, match="not found"):
        load_grams(tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"hello world, not safetensors")
    with pytest.raises(GramFileError):
        load_grams(tmp_path / "junk.safetensors")


def test_from_memory_and_parse_size():
    grams, counts, mm, fp = _example()
    gs = GramSet.from_memory(grams, counts, mm, fp)
    assert torch.equal(gs.gram("l0.v"), grams["l0.q"]) and gs.count("l0.v") == 18
    assert parse_size("2GB") == 2 << 30 and parse_size("500mb") == 500 << 20 and parse_size("1000") == 1000
    assert parse_size("1e6") == 1_000_000 and parse_size("1.5e3 KB") == 1500 << 10  # as the docstring says


# --------------------------------------------------------------------------------------------------
# fuzzing: whatever the bytes, the reader answers GramFileError or valid Grams, never another exception

_JUNK = [0, -1, 1, 6, 2**40, 1.5, True, None, "x", "l0.q", [], [6], [6, 6], [6, "6"], {}, {"key": 5},
         {"key": "l0.q"}, {"key": "l0.q", "conv1d": 1}, float("nan")]


def _mutant(raw: bytes, rng) -> bytes:
    """One random corruption of a valid Gram file: a bit flip in the header or the body, a truncation, a
    wrong header length, or an edited header (tensor dtype/shape/offsets; a metadata field or an entry
    of its JSON replaced, removed or added, sometimes left as broken JSON)."""
    n = struct.unpack("<Q", raw[:8])[0]
    hdr, body = json.loads(raw[8:8 + n]), raw[8 + n:]
    kind = rng.randrange(7)
    if kind <= 1:  # a bit flip, in the header or the body
        b = bytearray(raw)
        b[rng.randrange(8 + n) if kind == 0 else rng.randrange(8 + n, len(raw))] ^= 1 << rng.randrange(8)
        return bytes(b)
    if kind == 2:
        return raw[:rng.randrange(len(raw))]
    if kind == 3:
        return struct.pack("<Q", max(0, n + rng.choice([-8, -1, 1, 8, 4096, -n]))) + raw[8:]
    meta = hdr["__metadata__"]
    if kind == 4:
        t = rng.choice([k for k in hdr if k != "__metadata__"])
        hdr[t][rng.choice(["dtype", "shape", "data_offsets"])] = rng.choice(_JUNK + ["F16", "F64", "I32", [0, 4], [3, 12]])
    else:
        field = rng.choice(["modules", "counts", "dims", "fingerprint", "provenance", "format", "version", "layout"])
        if field in ("format", "version", "layout"):
            meta[field] = str(rng.choice(_JUNK + ["full", "packed", "2"]))
        else:
            val = json.loads(meta[field])
            if rng.random() < 0.2:
                val = rng.choice(_JUNK)
            else:
                k = rng.choice(list(val))
                r = rng.random()
                if r < 0.6 and isinstance(val[k], dict) and val[k]:
                    val[k][rng.choice(list(val[k]))] = rng.choice(_JUNK)  # a module entry's key/conv1d, a shape
                elif r < 0.8:
                    val[k] = rng.choice(_JUNK)
                elif r < 0.9:
                    del val[k]
                else:
                    val[rng.choice(["zz", "l0.q"])] = rng.choice(_JUNK)
            meta[field] = json.dumps(val)[:None if rng.random() < 0.9 else -1]
    new = json.dumps(hdr).encode()
    new += b" " * ((8 - len(new) % 8) % 8)
    return struct.pack("<Q", len(new)) + new + body


def test_fuzzed_files_raise_gram_file_error_or_load_valid_grams(tmp_path):
    import random

    grams, counts, mm, fp = _example()
    bases = []
    for packed in (False, True):
        p = save_grams(tmp_path / f"base{int(packed)}.safetensors", grams, counts, mm, fp, {"examples": 3},
                       packed=packed, fisher={"l0.q.weight": torch.rand(6, 6)}, conv1d=["l0.fc"])
        bases.append(open(p, "rb").read())
    rng = random.Random(18)
    p = tmp_path / "mutant.safetensors"
    outcomes = {"GramFileError": 0, "loaded": 0}
    for i in range(400):
        p.write_bytes(_mutant(bases[i % 2], rng))
        try:
            gs = load_grams(p, verify=True)
            for m in gs.modules():
                G, d = gs.gram(m), gs.dim(m)
                assert G.dtype == torch.float32 and G.shape == (d, d), (i, m)
                assert torch.isfinite(G).all() and (G - G.T).abs().max() <= 1e-5 * G.abs().max(), (i, m)
                assert gs.count(m) > 0 and isinstance(gs.is_conv1d(m), bool)
            for f in gs.fisher_params():
                assert torch.isfinite(gs.fisher(f)).all()
            outcomes["loaded"] += 1
        except GramFileError:
            outcomes["GramFileError"] += 1
    assert outcomes["GramFileError"] > 200 and outcomes["loaded"] > 20, outcomes  # the mutants do reach both


def test_module_map_entry_of_the_wrong_type(tmp_path):
    """The fuzzer's first find: a module entry that is a number (or lacks conv1d) was a TypeError/KeyError."""
    grams, counts, mm, fp = _example()
    p = str(tmp_path / "g.safetensors")
    save_grams(p, grams, counts, mm, fp, {})
    for entry in (5, "l0.q", {"key": 5, "conv1d": False}, {"key": "l0.q"}, {"key": "l0.q", "conv1d": "no"}):
        _rewrite_header(p, lambda h: h["__metadata__"].update(
            modules=json.dumps({"l0.q": entry, "l0.o": {"key": "l0.o", "conv1d": False}})))
        with pytest.raises(GramFileError, match="malformed module entry"):
            load_grams(p)
    for field, value in (("dims", {"l0.q": "6"}), ("fingerprint", {"weights": {"l0.q": 6}}), ("provenance", [])):
        save_grams(p, grams, counts, mm, fp, {}, overwrite=True)
        _rewrite_header(p, lambda h: h["__metadata__"].update(**{field: json.dumps(value)}))
        with pytest.raises(GramFileError):
            load_grams(p)
