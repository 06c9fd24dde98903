"""The pure-PyTorch reference RegMean (regmean_fast.reference) against the fp64 least-squares oracle.

The oracle (tests/fp64_oracle.py) never forms a Gram, so these tests catch a wrong Gram, a wrong
normalisation or regularisation, and a wrong solve alike.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fp64_oracle import lstsq_merge, random_activations, random_weights, rel_err
from regmean_fast import reference as ref

F64_TOL = 1e-8
F32_TOL = 1e-4
NS = (23, 41, 67)  # different token counts per model
COEFFS = (0.2, 1.3, 0.5)  # deliberately not summing to 1


def _grams(Xs):
    out = [ref.gram_from_activations(X) for X in Xs]
    return [g for g, _ in out], [n for _, n in out]


def _reference_from_activations(Xs, Ws, alpha, coeffs, normalization):
    grams, counts = _grams(Xs)
    return ref.regmean_solve(Ws, grams, alpha, coeffs, counts, normalization)


# ----------------------------------------------------------------------------------------------
# One layer against the oracle
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("normalization", ["mean", "sum"])
@pytest.mark.parametrize("with_coeffs", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.0])
def test_solve_matches_oracle(alpha, k, with_coeffs, normalization, dtype):
    Xs = random_activations(NS[:k], 9, dtype=dtype)
    Ws = random_weights(k, 5, 9, dtype=dtype)
    coeffs = list(COEFFS[:k]) if with_coeffs else None
    W, report = ref.regmean_solve_with_report(Ws, _grams(Xs)[0], alpha, coeffs, _grams(Xs)[1], normalization)
    assert W.dtype == dtype and W.shape == (5, 9)
    assert report == {"method": "cholesky", "ridge": 0.0}
    expected = lstsq_merge(Xs, Ws, alpha, coeffs, normalization)
    assert rel_err(W, expected) <= (F64_TOL if dtype == torch.float64 else F32_TOL)


def test_oracle_cases_discriminate():
    """The parametrised cases above would notice a wrong normalisation, coefficient or alpha."""
    Xs = random_activations(NS, 9)
    Ws = random_weights(3, 5, 9)
    base = lstsq_merge(Xs, Ws, 0.5, None, "mean")
    assert rel_err(lstsq_merge(Xs, Ws, 0.5, None, "sum"), base) > 1e-3
    assert rel_err(lstsq_merge(Xs, Ws, 0.5, list(COEFFS), "mean"), base) > 1e-3
    assert rel_err(lstsq_merge(Xs, Ws, 1.0, None, "mean"), base) > 1e-3
    assert rel_err(lstsq_merge(Xs, Ws, 0.0, None, "mean"), base) > 1e-3
    # and a plain average is not what RegMean gives
    assert rel_err(sum(Ws) / 3, base) > 1e-3


def test_grams_given_already_normalised():
    """counts=None: the Grams are used as they are."""
    Xs = random_activations(NS, 9)
    Ws = random_weights(3, 5, 9)
    grams, counts = _grams(Xs)
    normed = [ref.normalize_gram(G, n, "mean") for G, n in zip(grams, counts)]
    W = ref.regmean_solve(Ws, normed, 0.7, list(COEFFS))
    assert rel_err(W, lstsq_merge(Xs, Ws, 0.7, list(COEFFS), "mean")) <= F64_TOL
    W_raw = ref.regmean_solve(Ws, grams, 0.7, list(COEFFS))  # raw Grams without counts == "sum"
    assert rel_err(W_raw, lstsq_merge(Xs, Ws, 0.7, list(COEFFS), "sum")) <= F64_TOL


def test_group_solve_matches_separate_solves():
    Xs = random_activations(NS, 9)
    per_module = [random_weights(3, d_out, 9) for d_out in (4, 7, 2)]
    grams, counts = _grams(Xs)
    merged, report = ref.regmean_solve_group(per_module, grams, 0.6, list(COEFFS), counts, "mean")
    assert report["method"] == "cholesky"
    for Ws, W in zip(per_module, merged):
        assert W.shape == Ws[0].shape
        assert rel_err(W, lstsq_merge(Xs, Ws, 0.6, list(COEFFS), "mean")) <= F64_TOL
        assert torch.allclose(W, ref.regmean_solve(Ws, grams, 0.6, list(COEFFS), counts, "mean"), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Closed forms
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.0])
def test_identical_models_merge_to_themselves(alpha):
    Xs = random_activations(NS, 9)
    W0 = random_weights(1, 5, 9)[0]
    W = _reference_from_activations(Xs, [W0.clone() for _ in Xs], alpha, list(COEFFS), "mean")
    assert rel_err(W, W0) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("alpha", [1.0, 0.3, 0.0])
def test_one_model_returns_the_model(alpha, dtype):
    Xs = random_activations(NS[:1], 9, dtype=dtype)
    W0 = random_weights(1, 5, 9, dtype=dtype)[0]
    W = _reference_from_activations(Xs, [W0], alpha, [3.0], "mean")
    assert W.dtype == dtype
    assert rel_err(W, W0) <= (1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("normalization", ["mean", "sum"])
def test_alpha_zero_is_per_column_weighted_average(normalization):
    Xs = random_activations(NS, 9)
    Ws = random_weights(3, 5, 9)
    c = [x / sum(COEFFS) for x in COEFFS]
    # N(G_i)[jj] written out: the sum of squares of column j, over n_i for "mean".
    diags = [(X**2).sum(0) / (X.size(0) if normalization == "mean" else 1) for X in Xs]
    expected = torch.empty(5, 9, dtype=torch.float64)
    for j in range(9):
        num = sum(c[i] * diags[i][j] * Ws[i][:, j] for i in range(3))
        den = sum(c[i] * diags[i][j] for i in range(3))
        expected[:, j] = num / den
    W = _reference_from_activations(Xs, Ws, 0.0, list(COEFFS), normalization)
    assert rel_err(W, expected) <= 1e-12


# ----------------------------------------------------------------------------------------------
# Robust solve
# ----------------------------------------------------------------------------------------------


def test_dead_feature_uses_ridge_and_stays_finite():
    Xs = random_activations(NS, 9)
    for X in Xs:
        X[:, 4] = 0.0  # an input feature that is zero in every model: the summed Gram is singular
    Ws = random_weights(3, 5, 9)
    grams, counts = _grams(Xs)
    W, report = ref.regmean_solve_with_report(Ws, grams, 1.0, None, counts, "mean")
    assert torch.isfinite(W).all()
    assert report["method"] == "cholesky+ridge" and report["ridge"] == 1e-6
    # The ridge pulls the dead column to zero, as the minimum-norm least-squares solution does, and
    # perturbs the rest by about lambda * cond.
    assert W[:, 4].abs().max() == 0
    assert rel_err(W, lstsq_merge(Xs, Ws, 1.0, None, "mean")) <= 1e-4


def test_all_zero_gram_falls_back_to_lstsq():
    Ws = random_weights(2, 5, 9)
    grams = [torch.zeros(9, 9, dtype=torch.float64) for _ in Ws]
    W, report = ref.regmean_solve_with_report(Ws, grams, 1.0, None, [10, 20], "mean")
    assert report["method"] == "lstsq"
    assert torch.isfinite(W).all() and W.abs().max() == 0


def test_robust_solve_escalates_ridge_in_order():
    A = torch.diag(torch.tensor([1.0, 1.0, -1e-3], dtype=torch.float64))  # mean(diag) ~ 0.67
    B = torch.ones(3, 2, dtype=torch.float64)
    X, report = ref.robust_solve(A, B)
    # 1e-3 * 0.67 < 1e-3 fails, 1e-2 * 0.67 > 1e-3 succeeds
    assert report == {"method": "cholesky+ridge", "ridge": 1e-2}
    lam = 1e-2 * float(torch.diagonal(A).mean())
    assert torch.allclose(X, torch.linalg.solve(A + lam * torch.eye(3, dtype=torch.float64), B), rtol=1e-12)


def test_robust_solve_plain_and_lstsq():
    M = torch.randn(6, 6, dtype=torch.float64)
    A = M @ M.T + 6 * torch.eye(6, dtype=torch.float64)
    B = torch.randn(6, 3, dtype=torch.float64)
    X, report = ref.robust_solve(A, B)
    assert report == {"method": "cholesky", "ridge": 0.0}
    assert torch.allclose(X, torch.linalg.solve(A, B), rtol=1e-10, atol=1e-12)
    # Strongly indefinite: no ridge up to 1e-1 * mean(diag) makes it factorise; lstsq solves it exactly.
    A = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64)
    B = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    X, report = ref.robust_solve(A, B)
    assert report["method"] == "lstsq"
    assert torch.allclose(A @ X, B, atol=1e-12)
    X32, report = ref.robust_solve(A.float(), B.float())
    assert report["method"] == "lstsq" and X32.dtype == torch.float32


def test_robust_solve_rejects_non_finite():
    A = torch.eye(3)
    A[1, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        ref.robust_solve(A, torch.ones(3, 1))


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------


def _mask(kind, shape):
    if kind == "none":
        return None
    if kind == "true":
        return torch.ones(shape, dtype=torch.bool)
    if kind == "false":
        return torch.zeros(shape, dtype=torch.bool)
    if kind == "broadcast":  # [B, 1]: whole sequences kept or dropped
        return torch.tensor([[True], [False], [True]])
    m = torch.rand(shape) < 0.6
    m[0, 0], m[1, 1] = True, False
    return m


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mask_kind", ["none", "true", "false", "mixed", "broadcast"])
def test_gram_from_activations(mask_kind, dtype):
    X = torch.randn(3, 5, 7).to(dtype)
    mask = _mask(mask_kind, (3, 5))
    G, n = ref.gram_from_activations(X, mask)
    full = mask.expand(3, 5) if mask is not None else torch.ones(3, 5, dtype=torch.bool)
    rows = X.double()[full]  # [n, 7]
    expected = torch.zeros(7, 7, dtype=torch.float64)
    for r in rows:
        expected += torch.outer(r, r)
    assert n == int(full.sum())
    assert G.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert G.shape == (7, 7) and torch.equal(G, G.T)
    if mask_kind == "false":
        assert n == 0 and torch.count_nonzero(G) == 0
    else:
        assert rel_err(G, expected) <= (1e-14 if dtype == torch.float64 else 1e-6)


def test_gram_update_and_symmetrize_agree_with_full_gram():
    X = torch.randn(4, 6, 11)
    mask = torch.rand(4, 6) < 0.7
    G = torch.zeros(11, 11)
    ref.gram_update(G, X[:2], mask[:2])
    ref.gram_update(G, X[2:], mask[2:])
    assert torch.count_nonzero(torch.tril(G, diagonal=-1)) == 0  # upper triangle only
    ref.symmetrize_(G)
    full, n = ref.gram_from_activations(X, mask)
    assert n == int(mask.sum())
    assert torch.allclose(G, full, rtol=1e-5, atol=1e-5)


def test_normalize_and_regularize():
    G = torch.tensor([[4.0, 2.0], [2.0, 6.0]], dtype=torch.float64)
    assert torch.equal(ref.normalize_gram(G, 2, "mean"), G / 2)
    assert ref.normalize_gram(G, 2, "sum") is G
    assert torch.equal(ref.regularize_gram(G, 0.25), torch.tensor([[4.0, 0.5], [0.5, 6.0]], dtype=torch.float64))
    assert torch.equal(ref.regularize_gram(G, 1.0), G)
    assert torch.equal(ref.regularize_gram(G, 0.0), torch.diag(torch.tensor([4.0, 6.0], dtype=torch.float64)))
    assert ref.normalize_coeffs(None, 4) == [0.25] * 4
    assert ref.normalize_coeffs([1, 3], 2) == [0.25, 0.75]


# ----------------------------------------------------------------------------------------------
# Whole models: tiny transformers, real activations captured with hooks
# ----------------------------------------------------------------------------------------------


def _tiny_model(kind):
    transformers = pytest.importorskip("transformers")
    if kind == "bert":
        config = transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=50,
            max_position_embeddings=32, initializer_range=0.3,
        )
        model = transformers.BertModel(config)
    else:
        config = transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, n_positions=16, vocab_size=50, initializer_range=0.3,
            bos_token_id=0, eos_token_id=0,
        )
        model = transformers.GPT2Model(config)
    model.config._attn_implementation = "eager"
    with torch.no_grad():  # non-trivial norms and biases, so the LayerNorm outputs are not rank deficient
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model.double().eval()


def _linear_modules(model):
    from transformers.pytorch_utils import Conv1D

    return {name: m for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}


def _models_with_activations(kind, k=3):
    """K perturbed copies of one tiny model, each run on its own batch; returns the state dicts, the
    kept input rows per module and model, the Grams and counts (reference), and the Conv1D names."""
    from transformers.pytorch_utils import Conv1D

    base = _tiny_model(kind)
    state_dicts, rows, grams, counts = [], {}, {}, {}
    conv1d = {name for name, m in _linear_modules(base).items() if isinstance(m, Conv1D)}
    for i in range(k):
        model = copy.deepcopy(base)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        batch, length = 16, 10 + 2 * i
        ids = torch.randint(0, 50, (batch, length))
        attention = torch.ones(batch, length, dtype=torch.long)
        for b in range(batch):
            attention[b, int(torch.randint(3, length + 1, ())):] = 0
        captured = {}
        hooks = [
            m.register_forward_hook(lambda mod, args, out, name=name: captured.__setitem__(name, args[0].detach()))
            for name, m in _linear_modules(model).items()
        ]
        with torch.no_grad():
            model(input_ids=ids, attention_mask=attention)
        for h in hooks:
            h.remove()
        keep = attention.bool()
        for name, X in captured.items():
            token_level = X.shape[:-1] == keep.shape  # the pooler sees one row per sequence
            rows.setdefault(name, []).append(X[keep] if token_level else X.reshape(-1, X.size(-1)))
            G, n = ref.gram_from_activations(X, keep if token_level else None)
            grams.setdefault(name, []).append(G)
            counts.setdefault(name, []).append(n)
        state_dicts.append({name: t.clone() for name, t in model.state_dict().items()})
    return state_dicts, rows, grams, counts, conv1d


def _oriented(w, name, conv1d):
    return w.T if name in conv1d else w


@pytest.mark.parametrize(
    "kind,alpha,coeffs,normalization",
    [
        ("bert", 1.0, None, "mean"),
        ("bert", 0.5, [0.5, 0.2, 0.3], "mean"),
        ("bert", 0.9, [1.0, 2.0, 1.0], "sum"),
        ("gpt2", 1.0, [0.2, 0.5, 0.3], "mean"),
        ("gpt2", 0.3, None, "mean"),
    ],
)
def test_merge_state_dicts_matches_oracle_on_tiny_models(kind, alpha, coeffs, normalization):
    state_dicts, rows, grams, counts, conv1d = _models_with_activations(kind)
    assert (len(conv1d) > 0) == (kind == "gpt2")
    merged, report = ref.merge_state_dicts(
        state_dicts, grams, counts, alpha=alpha, coeffs=coeffs, normalization=normalization, conv1d=conv1d
    )
    assert list(merged) == list(state_dicts[0])
    c = [1.0 / 3] * 3 if coeffs is None else [x / sum(coeffs) for x in coeffs]
    n_regmean = 0
    for name, tensor in merged.items():
        assert tensor.dtype == state_dicts[0][name].dtype and tensor.shape == state_dicts[0][name].shape
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module in grams:
            n_regmean += 1
            assert report[name]["method"] == "regmean" and report[name]["solve"]["method"] == "cholesky"
            Ws = [_oriented(sd[name], module, conv1d) for sd in state_dicts]
            expected = lstsq_merge(rows[module], Ws, alpha, coeffs, normalization)
            assert rel_err(_oriented(tensor, module, conv1d), expected) <= F64_TOL, name
        else:
            assert report[name] == {"method": "average"}
            expected = sum(ci * sd[name] for ci, sd in zip(c, state_dicts))
            assert torch.allclose(tensor, expected, rtol=1e-12, atol=1e-14), name
    assert n_regmean == len(grams) == (13 if kind == "bert" else 8)


def test_merge_state_dicts_qkv_group_equals_separate_solves():
    state_dicts, rows, grams, counts, _ = _models_with_activations("bert")
    groups = {}
    shared = dict(grams)
    shared_counts = dict(counts)
    for layer in range(2):
        prefix = f"encoder.layer.{layer}.attention.self"
        members = [f"{prefix}.{p}" for p in ("query", "key", "value")]
        groups[f"{prefix}.qkv"] = members
        for m in members[1:]:  # the same Gram objects, as a Gram file maps q/k/v to one Gram
            shared[m] = shared[members[0]]
            shared_counts[m] = shared_counts[members[0]]
    separate, _ = ref.merge_state_dicts(state_dicts, shared, shared_counts, alpha=0.8)
    together, report = ref.merge_state_dicts(state_dicts, shared, shared_counts, alpha=0.8, groups=groups)
    for name in separate:
        assert torch.allclose(separate[name], together[name], rtol=1e-12, atol=1e-14), name
    assert report["encoder.layer.1.attention.self.key.weight"]["group"] == "encoder.layer.1.attention.self.qkv"
    assert report["encoder.layer.1.attention.output.dense.weight"]["group"] is None
    # Grams captured separately per module hold equal values: accepted as one group too.
    equal_values, _ = ref.merge_state_dicts(state_dicts, grams, counts, alpha=0.8, groups=groups)
    q = "encoder.layer.0.attention.self.query.weight"
    assert torch.allclose(equal_values[q], together[q], rtol=1e-12, atol=1e-14)
    # Members whose Grams differ cannot share one solve.
    bad = dict(shared)
    bad["encoder.layer.0.attention.self.key"] = grams["encoder.layer.0.attention.output.dense"]
    with pytest.raises(ValueError, match="different Gram"):
        ref.merge_state_dicts(state_dicts, bad, shared_counts, groups=groups)


def _toy_state_dicts(k=3, dtype=torch.float32):
    sds = []
    for _ in range(k):
        sds.append({
            "lin.weight": torch.randn(4, 6).to(dtype),
            "lin.bias": torch.randn(4).to(dtype),
            "conv.weight": torch.randn(6, 5).to(dtype),  # Conv1D layout [in, out]
            "norm.weight": torch.randn(6).to(dtype),
            "steps": torch.tensor([3]),
        })
    return sds


def _toy_grams(k=3, dtype=torch.float32):
    Xs = random_activations(NS[:k], 6, dtype=dtype)
    g, n = _grams(Xs)
    return Xs, {"lin": g, "conv": [x.clone() for x in g]}, {"lin": n, "conv": list(n)}


def test_merge_state_dicts_exclude_conv1d_and_copy():
    sds = _toy_state_dicts(dtype=torch.float64)
    Xs, grams, counts = _toy_grams(dtype=torch.float64)
    merged, report = ref.merge_state_dicts(sds, grams, counts, alpha=0.7, conv1d={"conv"}, exclude=[r"^lin\.weight$"])
    assert report["lin.weight"] == {"method": "average"}
    assert torch.allclose(merged["lin.weight"], sum(sd["lin.weight"] for sd in sds) / 3, rtol=1e-12)
    assert report["conv.weight"]["method"] == "regmean"
    expected = lstsq_merge(Xs, [sd["conv.weight"].T for sd in sds], 0.7)
    assert rel_err(merged["conv.weight"].T, expected) <= F64_TOL
    assert report["steps"] == {"method": "copy"} and torch.equal(merged["steps"], torch.tensor([3]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_merge_state_dicts_keeps_dtype(dtype):
    sds = _toy_state_dicts(dtype=dtype)
    Xs, grams, counts = _toy_grams(dtype=torch.float32)
    merged, report = ref.merge_state_dicts(sds, grams, counts, alpha=0.9, conv1d={"conv"})
    for name, t in merged.items():
        assert t.dtype == sds[0][name].dtype, name
    # computed in fp32 from the low-precision values, then rounded once
    up = [{n: t.float() if t.is_floating_point() else t for n, t in sd.items()} for sd in sds]
    merged32, _ = ref.merge_state_dicts(up, grams, counts, alpha=0.9, conv1d={"conv"})
    for name, t in merged.items():
        assert torch.equal(t, merged32[name].to(dtype)), name


# ----------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------


def _layer():
    Xs = random_activations(NS, 6)
    grams, counts = _grams(Xs)
    return random_weights(3, 4, 6), grams, counts


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda W, G, n: ([W[0], W[1], torch.randn(4, 5, dtype=torch.float64)], G, n, {}), "weight shape"),
        (lambda W, G, n: ([W[0], W[1], torch.randn(3, 6, dtype=torch.float64)], G, n, {}), "weight shape"),
        (lambda W, G, n: (W, G[:2], n, {}), "3 weights and 2 Grams"),
        (lambda W, G, n: (W, [G[0], G[1], torch.eye(5, dtype=torch.float64)], n, {}), "Gram 2 has shape"),
        (lambda W, G, n: (W, G, n[:2], {}), "2 token counts for 3 models"),
        (lambda W, G, n: (W, G, [n[0], 0, n[2]], {}), "token counts must be positive"),
        (lambda W, G, n: (W, G, n, {"coeffs": [1.0, -0.5, 1.0]}), "non-negative"),
        (lambda W, G, n: (W, G, n, {"coeffs": [0.0, 0.0, 0.0]}), "not all be zero"),
        (lambda W, G, n: (W, G, n, {"coeffs": [1.0, 1.0]}), "2 coefficients for 3 models"),
        (lambda W, G, n: (W, G, n, {"coeffs": [1.0, float("nan"), 1.0]}), "finite"),
        (lambda W, G, n: (W, G, n, {"alpha": -0.1}), "alpha"),
        (lambda W, G, n: (W, G, n, {"alpha": 1.5}), "alpha"),
        (lambda W, G, n: (W, G, n, {"alpha": float("nan")}), "alpha"),
        (lambda W, G, n: (W, G, n, {"normalization": "max"}), "normalization"),
        (lambda W, G, n: ([], [], [], {}), "no models"),
    ],
)
def test_regmean_solve_bad_inputs(change, match):
    W, G, n, kwargs = change(*_layer())
    with pytest.raises(ValueError, match=match):
        ref.regmean_solve(W, G, counts=n, **kwargs)


def test_merge_state_dicts_bad_inputs():
    sds = _toy_state_dicts()
    _, grams, counts = _toy_grams()

    def merge(s=sds, g=grams, n=counts, **kw):
        kw.setdefault("conv1d", {"conv"})
        return ref.merge_state_dicts(s, g, n, **kw)

    merge()  # the unchanged inputs are fine
    with pytest.raises(ValueError, match="no models"):
        merge(s=[])
    missing = [sds[0], sds[1], {k: v for k, v in sds[2].items() if k != "lin.bias"}]
    with pytest.raises(ValueError, match=r"model 2 has different parameters.*lin\.bias"):
        merge(s=missing)
    reshaped = [sds[0], {**sds[1], "norm.weight": torch.randn(7)}, sds[2]]
    with pytest.raises(ValueError, match=r"norm\.weight: shape \(7,\) in model 1"):
        merge(s=reshaped)
    with pytest.raises(ValueError, match="no parameter 'nope.weight'"):
        merge(g={**grams, "nope": grams["lin"]})
    with pytest.raises(ValueError, match="2 Grams for 3 models"):
        merge(g={**grams, "lin": grams["lin"][:2]})
    with pytest.raises(ValueError, match="no token counts"):
        merge(n={"conv": counts["conv"]})
    with pytest.raises(ValueError, match="Gram 1 has shape"):
        merge(g={**grams, "lin": [grams["lin"][0], torch.eye(5), grams["lin"][2]]})
    with pytest.raises(ValueError, match="does not take inputs of size"):
        ref.merge_state_dicts(sds, grams, counts)  # conv weight not transposed: [6, 5] does not read 6 inputs
    with pytest.raises(ValueError, match="conv1d module 'convx'"):
        merge(conv1d={"conv", "convx"})
    with pytest.raises(ValueError, match="not all be zero"):
        merge(coeffs=[0, 0, 0])
    with pytest.raises(ValueError, match="alpha"):
        merge(alpha=2.0)
    with pytest.raises(ValueError, match="normalization"):
        merge(normalization="median")
    with pytest.raises(ValueError, match="has no Grams"):
        merge(groups={"g": ["lin", "norm"]})
    with pytest.raises(ValueError, match="more than one group"):
        merge(groups={"a": ["lin"], "b": ["lin"]})
    steps_differ = [sds[0], sds[1], {**sds[2], "steps": torch.tensor([4])}]
    with pytest.raises(ValueError, match="steps: non-floating"):
        merge(s=steps_differ)


# ----------------------------------------------------------------------------------------------
# The public fast path (regmean_fast.regmean_solve, solve.py) against the same oracle
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("with_coeffs", [False, True])
def test_public_fast_regmean_solve_matches_oracle(alpha, with_coeffs, dtype):
    import regmean_fast as rf

    Xs = random_activations(NS, 9, dtype=dtype)
    Ws = random_weights(3, 5, 9, dtype=dtype)
    coeffs = list(COEFFS) if with_coeffs else None
    normed = [X.T @ X / X.size(0) for X in Xs]  # already normalised ("mean"), as the public API expects
    W = rf.regmean_solve(Ws, normed, alpha, coeffs)
    assert W.shape == (5, 9) and W.dtype == dtype
    expected = lstsq_merge(Xs, Ws, alpha, coeffs, "mean")
    assert rel_err(W, expected) <= (F64_TOL if dtype == torch.float64 else F32_TOL)
    assert math.isfinite(rel_err(W, ref.regmean_solve(Ws, normed, alpha, coeffs)))
    assert rel_err(W, ref.regmean_solve(Ws, normed, alpha, coeffs)) <= (1e-10 if dtype == torch.float64 else F32_TOL)
