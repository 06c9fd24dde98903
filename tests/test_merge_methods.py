"""Priority (d): every method against a plain per-tensor formula written here."""

from __future__ import annotations

import pytest
import torch

import mergekit_fp64 as mk
from test_merge_common import make_activations, make_models, read_folder, save_model, write_gram_files

from regmean_fast.merge import DictGramSet, MergeError, merge, merge_state_dicts


@pytest.fixture(scope="module")
def sds():
    base, models = make_models("llama", k=3, seed=31, noise=0.1)
    return base.state_dict(), [m.state_dict() for m in models], models


def test_average(sds):
    _, ms, _ = sds
    w = [3.0, 1.0, 0.0]
    got = merge_state_dicts(ms, method="average", weights=w)
    for n in ms[0]:
        exp = (3 * ms[0][n].double() + ms[1][n].double()) / 4
        torch.testing.assert_close(got[n].double(), exp, atol=1e-6, rtol=1e-6)


def test_task_arithmetic(sds):
    base, ms, _ = sds
    got = merge_state_dicts(ms, method="task_arithmetic", base=base, weights=[1.0, 0.5, 2.0], scaling=0.3)
    for n in ms[0]:
        b = base[n].double()
        exp = b + 0.3 * sum(w * (m[n].double() - b) for w, m in zip([1.0, 0.5, 2.0], ms))
        torch.testing.assert_close(got[n].double(), exp, atol=1e-6, rtol=1e-6)
    got = merge_state_dicts(ms, method="task_arithmetic", base=base, weights=[1.0, 0.5, 2.0], normalize=True)
    n = "model.layers.0.mlp.up_proj.weight"
    b = base[n].double()
    exp = b + sum(w / 3.5 * (m[n].double() - b) for w, m in zip([1.0, 0.5, 2.0], ms))
    torch.testing.assert_close(got[n].double(), exp, atol=1e-6, rtol=1e-6)


def test_ties(sds):
    base, ms, _ = sds
    got = merge_state_dicts(ms, method="ties", base=base, density=0.3, scaling=0.8, weights=[1.0, 1.0, 0.5])
    for n in ms[0]:
        exp = mk.task_vectors(base[n], [m[n] for m in ms], [1.0, 1.0, 0.5], [0.3] * 3, consensus=True,
                              sparsify="magnitude", normalize=True, rescale=False, lam=0.8)
        torch.testing.assert_close(got[n].double(), exp, atol=1e-6, rtol=1e-5, msg=lambda s: f"{n}: {s}")


def _top_k_earliest(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k entries of largest magnitude, ties to the earliest: a stable sort by decreasing magnitude."""
    order = torch.sort(x.double().abs().reshape(-1), descending=True, stable=True).indices
    keep = torch.zeros(x.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return keep.view(x.shape)


def test_magnitude_keep_in_slices(monkeypatch):
    """The radix select over slices: the exact k-th magnitude and the earliest ties, for every dtype, with
    many ties, signed zeros and an inf spread over slices of 100 entries."""
    from regmean_fast import ops

    monkeypatch.setattr(ops, "TASK_VECTOR_SLICE", 100)
    g = torch.Generator().manual_seed(4)
    tied = torch.randint(-3, 4, (1037,), generator=g).double() * 2.0 ** -9  # 7 magnitudes, zeros included
    tied[::17] = -0.0
    tied[500] = float("inf")
    for x in (torch.randn(1037, generator=g, dtype=torch.float64), tied, tied.view(61, 17)):
        for dtype in (torch.float16, torch.float32, torch.float64):
            for k in (1, 2, 100, 517, 1036, 1037):
                got = ops.magnitude_keep(x.to(dtype), k)
                assert torch.equal(got, _top_k_earliest(x.to(dtype), k)), (dtype, k)


def test_ties_and_dare_in_slices(sds, monkeypatch):
    """The compiled passes and the slice-by-slice torch passes (top-k, random draws, L1 norms, consensus;
    slices of 1000 entries) against the definition on whole tensors: ties on a grid (ties at the cut-off in
    most tensors), dare_ties with the masks drawn in one piece by the test's own Philox (mergekit_fp64)."""
    from regmean_fast import ops

    base, ms, _ = sds
    base = {n: torch.round(b * 256) / 256 for n, b in base.items()}
    ms = [{n: torch.round(t * 256) / 256 for n, t in m.items()} for m in ms]
    w = [1.0, 0.5, -0.25]
    for compiled in (True, False):  # the kernels (float32 CPU) and the torch paths, in slices of 1000
        monkeypatch.setattr(ops, "TASK_VECTOR_SLICE", 1000)
        if not compiled:
            monkeypatch.setattr(ops._ext, "HAVE_EXTENSION", False)
        got = merge_state_dicts(ms, method="ties", base=base, density=0.3, weights=w)
        for n in ms[0]:
            exp = mk.task_vectors(base[n], [m[n] for m in ms], w, [0.3] * 3, consensus=True, sparsify="magnitude",
                                  normalize=True, rescale=False, lam=1.0)
            torch.testing.assert_close(got[n].double(), exp, atol=1e-6, rtol=1e-5, msg=lambda s: f"{n}: {s}")

        got = merge_state_dicts(ms, method="dare_ties", base=base, density=0.4, weights=w, seed=9)
        for n in ms[0]:
            masks = [mk.dare_mask(base[n].shape, 0.4, 9, n, i) for i in range(3)]
            exp = mk.task_vectors(base[n], [m[n] for m in ms], w, [0.4] * 3, consensus=True, sparsify="random",
                                  normalize=False, rescale=True, lam=1.0, masks=masks)
            torch.testing.assert_close(got[n].double(), exp, atol=1e-6, rtol=1e-5, msg=lambda s: f"{n}: {s}")


def test_fisher_in_memory_and_from_files(sds, tmp_path):
    _, ms, models = sds
    g = torch.Generator().manual_seed(5)
    names = [n for n in ms[0] if "layers.0" in n]  # Fisher only for layer 0: the rest is averaged
    fishers = [{n: torch.rand(ms[0][n].shape, generator=g) for n in names} for _ in ms]
    gsets = [DictGramSet({}, fisher=f) for f in fishers]
    w = [1.0, 2.0, 1.0]
    got, rep = merge_state_dicts(ms, gsets, method="fisher", weights=w, fisher_floor=1e-3, return_report=True)
    c = [x / 4 for x in w]
    for n in ms[0]:
        if n in names:
            num = sum(ci * (f[n].double() + 1e-3) * m[n].double() for ci, f, m in zip(c, fishers, ms))
            den = sum(ci * (f[n].double() + 1e-3) for ci, f in zip(c, fishers))
            exp = num / den
            assert rep["tensors"][n]["method"] == "fisher"
        else:
            exp = sum(ci * m[n].double() for ci, m in zip(c, ms))
            assert rep["tensors"][n]["method"] == "average"
        torch.testing.assert_close(got[n].double(), exp, atol=1e-6, rtol=1e-5)
    # the same from Gram files carrying Fisher tensors, through the folder merge
    mods, acts = make_activations(models[0], 3, seed=31)
    paths = [save_model(m, tmp_path / f"m{i}") for i, m in enumerate(models)]
    gpaths = write_gram_files(models[0], mods, acts, tmp_path, fisher=fishers)
    out = tmp_path / "out"
    merge({"method": "fisher", "parameters": {"fisher_floor": 1e-3},
           "models": [{"model": p, "grams": gp, "weight": wi} for p, gp, wi in zip(paths, gpaths, w)]}, out=str(out))
    folder = read_folder(out)
    for n in ms[0]:
        torch.testing.assert_close(folder[n], got[n], atol=1e-6, rtol=1e-5)
    # Fisher in some models only: an error unless allowed
    partial = [DictGramSet({}, fisher=fishers[0]), DictGramSet({}, fisher={names[0]: fishers[1][names[0]]}),
               DictGramSet({}, fisher=fishers[2])]
    with pytest.raises(MergeError, match="no Fisher for"):
        merge_state_dicts(ms, partial, method="fisher")
    _, rep = merge_state_dicts(ms, partial, method="fisher", allow_missing_grams=True, return_report=True)
    assert rep["warnings"]


def test_folder_methods_with_base(sds, tmp_path):
    base, ms, models = sds
    b, _ = make_models("llama", k=0, seed=31)
    bp = save_model(b, tmp_path / "base")
    paths = [save_model(m, tmp_path / f"m{i}") for i, m in enumerate(models)]
    for method, params in (("task_arithmetic", {"scaling": 0.5}), ("ties", {"density": 0.5})):
        out = tmp_path / method
        merge({"method": method, "base_model": bp, "parameters": params, "models": paths}, out=str(out))
        exp = merge_state_dicts(ms, method=method, base=base, **params)
        got = read_folder(out)
        for n in exp:
            assert torch.equal(got[n], exp[n]), n


def test_method_parameter_errors(sds):
    base, ms, _ = sds
    with pytest.raises(MergeError, match="density"):
        merge_state_dicts(ms, method="ties", base=base, density=0)
    with pytest.raises(MergeError, match="needs base_model"):
        merge_state_dicts(ms, method="task_arithmetic")
    with pytest.raises(MergeError, match="unknown parameter"):
        merge_state_dicts(ms, method="average", alpha=0.5)
