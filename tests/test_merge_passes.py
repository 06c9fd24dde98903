"""The merge's compiled per-entry passes (regmean_fast.ops.dare_drop_, consensus_merge_, scaled_add_): the
Philox generator against its published known answers, the compiled kernels against the torch paths and both
against definitions written here (numpy's unsigned Philox, fp64 loops)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mergekit_fp64 as mk

from regmean_fast import _ext, ops

compiled = pytest.mark.skipif(not (_ext.HAVE_EXTENSION and hasattr(_ext._C, "dare_drop_")),
                              reason="the compiled extension is not built")

# Random123's kat_vectors: counter (4 words), key (2 words) -> the 4 output words.
KATS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,want", KATS)
def test_philox_known_answers(ctr, key, want):
    assert tuple(int(x) for x in mk.philox4x32_10(np.array([ctr], dtype=np.uint64), key)[0]) == want


def test_philox_words_equal_numpy():
    """ops.philox_words (int64 torch arithmetic) = numpy's uint64 Philox, for windows that start and end
    inside blocks and counters past 2^32 blocks (the high counter word)."""
    key = (0x01234567, 0x89ABCDEF)
    for first, count in ((0, 1), (0, 4), (3, 10), (5, 1001), ((1 << 34) + 2, 9)):
        b0 = first // 4
        nb = (first + count + 3) // 4 - b0
        blocks = np.zeros((nb, 4), dtype=np.uint64)
        blocks[:, 0] = (np.arange(b0, b0 + nb, dtype=np.uint64)) & np.uint64(0xFFFFFFFF)
        blocks[:, 1] = (np.arange(b0, b0 + nb, dtype=np.uint64)) >> np.uint64(32)
        want = mk.philox4x32_10(blocks, key).reshape(-1)[first - 4 * b0:first - 4 * b0 + count]
        got = ops.philox_words(first, count, key)
        assert got.dtype == torch.int64 and got.tolist() == [int(x) for x in want], (first, count)


def _data(n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    x[:: max(1, n // 7)] = 0.0
    return x.to(dtype)


def _same(a, b):
    """Equal bit for bit where not NaN, NaN where the other is NaN."""
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(a[~nan], b[~nan])


@pytest.mark.parametrize("n", [1, 63, 65, 4099, 300001])
@pytest.mark.parametrize("density", [0.05, 0.5, 0.93])
def test_dare_drop_torch_path_equals_the_definition(n, density, monkeypatch):
    """The torch path in slices of 1000 (any device/dtype): the mask of mergekit_fp64.dare_mask, fp64 L1s."""
    monkeypatch.setattr(ops, "TASK_VECTOR_SLICE", 1000)
    x = _data(n, seed=n, dtype=torch.float64)
    key = (0xDEADBEEF, 0x00C0FFEE)
    keep = _mask_for(key, n, density)
    got = x.clone()
    before, after = ops.torch_dare_drop_(got, key, math.ceil(density * 2 ** 32))
    assert torch.equal(got, x * keep)
    assert before == pytest.approx(float(x.abs().sum()), rel=1e-12)
    assert after == pytest.approx(float((x * keep).abs().sum()), rel=1e-12, abs=1e-300)
    if n == 300001:
        sd = (density * (1 - density) / n) ** 0.5
        assert abs(float(keep.double().mean()) - density) < 5 * sd


def _mask_for(key, n, density):
    blocks = np.zeros(((n + 3) // 4, 4), dtype=np.uint64)
    blocks[:, 0] = np.arange(blocks.shape[0], dtype=np.uint64)
    words = mk.philox4x32_10(blocks, key).reshape(-1)[:n]
    return torch.from_numpy(words < math.ceil(density * 2 ** 32))


@compiled
@pytest.mark.parametrize("n", [1, 63, 65, 4099, 300001])
def test_dare_drop_kernel_equals_the_torch_path(n):
    """The compiled kernel: the same entries as the torch path bit for bit (an inf dropped is NaN in both),
    the same mask as a float64 tensor's (so any dtype and device draws the same), the L1s within fp64
    rounding, the same bits on 1 and 2 threads."""
    x = _data(n, seed=n)
    if n > 10:
        x[5] = float("inf")
    key, threshold = (0x9ABCDEF0, 0x12345678), math.ceil(0.37 * 2 ** 32)
    ref = x.clone()
    ref_l1 = ops.torch_dare_drop_(ref, key, threshold)
    results = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            got = x.clone()
            results.append((got, ops.dare_drop_(got, key, threshold)))
    finally:
        torch.set_num_threads(threads)
    (got, l1), (got2, l1_2) = results
    assert _same(got, ref) and _same(got2, got)
    assert _same(torch.tensor(l1, dtype=torch.float64), torch.tensor(l1_2, dtype=torch.float64))
    for a, b in zip(l1, ref_l1):  # (a dropped inf: NaN after, as the torch path's)
        assert (a == pytest.approx(b, rel=1e-12) or (math.isinf(a) and math.isinf(b))
                or (math.isnan(a) and math.isnan(b)))
    wide = x.double()
    ops.dare_drop_(wide, key, threshold)
    assert torch.equal(torch.isnan(wide) | (wide != 0), torch.isnan(got) | (got != 0))


def _consensus_fp64(base, deltas, coeffs, weights, normalize, scaling):
    taus = [c * d.double() for c, d in zip(coeffs, deltas)]
    elected = torch.where(sum(taus) >= 0, 1.0, -1.0).double()
    agree = [torch.sign(t) == elected for t in taus]
    mixed = sum(torch.where(a, t, 0.0) for a, t in zip(agree, taus))
    divisor = sum(a.double() * w for a, w in zip(agree, weights))
    if normalize:
        mixed = mixed / torch.where(divisor == 0, 1.0, divisor)
    return base.double() + scaling * mixed


@pytest.mark.parametrize("n", [1, 1023, 70001])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("path", ["compiled", "torch"])
def test_consensus_merge_equals_fp64(n, normalize, path, monkeypatch):
    if path == "compiled" and not (_ext.HAVE_EXTENSION and hasattr(_ext._C, "consensus_merge_")):
        pytest.skip("the compiled extension is not built")
    if path == "torch":
        monkeypatch.setattr(ops, "TASK_VECTOR_SLICE", 1000)
        monkeypatch.setattr(ops._ext, "HAVE_EXTENSION", False)
    deltas = [_data(n, seed=10 + i) for i in range(3)]
    deltas[1][: n // 2] = -deltas[0][: n // 2]  # cancelling pairs: the third decides the sign
    base = _data(n, seed=99)
    coeffs, weights = [1.0, 0.5, -0.25], [1.0, 2.0, 0.5]
    got = ops.consensus_merge_(base.clone(), deltas, coeffs, weights, normalize, 0.7)
    exp = _consensus_fp64(base, deltas, coeffs, weights, normalize, 0.7)
    torch.testing.assert_close(got.double(), exp, atol=2e-6, rtol=2e-6)


def test_consensus_merge_other_dtypes_take_the_torch_path():
    deltas = [_data(1000, seed=i, dtype=torch.bfloat16) for i in range(2)]
    base = _data(1000, seed=7, dtype=torch.bfloat16)
    got = ops.consensus_merge_(base.clone(), deltas, [1.0, 1.0], [1.0, 1.0], True, 1.0)
    exp = _consensus_fp64(base, deltas, [1.0, 1.0], [1.0, 1.0], True, 1.0)
    torch.testing.assert_close(got.double(), exp, atol=2e-2, rtol=2e-2)


def test_bad_arguments_are_one_line_errors():
    x = torch.zeros(10)
    with pytest.raises(ValueError, match="contiguous"):
        ops.dare_drop_(torch.zeros(4, 4).T, (1, 2), 5)
    with pytest.raises(ValueError, match="threshold"):
        ops.dare_drop_(x, (1, 2), (1 << 32) + 1)
    with pytest.raises(ValueError, match="one coefficient"):
        ops.consensus_merge_(x, [x], [1.0, 2.0], [1.0], True, 1.0)
    with pytest.raises(ValueError, match="one shape"):
        ops.consensus_merge_(x, [torch.zeros(11)], [1.0], [1.0], True, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["compiled", "torch"])
def test_scaled_add_equals_fp64(dtype, path, monkeypatch):
    """acc = c0 x0, then += c1 x1 and += c2 x2 from the stored dtype: each step within one fp32 rounding of
    the fp64 value of the same step (x widened exactly), odd sizes crossing the kernel's chunks."""
    if path == "torch":
        monkeypatch.setattr(ops._ext, "HAVE_EXTENSION", False)
    n = 3 * (1 << 16) + 5
    xs = [_data(n, seed=20 + i, dtype=dtype) for i in range(3)]
    xs[1][7] = 1e-40 if dtype != torch.float16 else 2.0 ** -20  # a subnormal (of fp32 / fp16), widened exactly
    cs = [0.3, -1.7, 2.0]
    acc = torch.full((n,), float("nan"))
    prev = torch.zeros(n, dtype=torch.float64)
    for i, (x, c) in enumerate(zip(xs, cs)):
        ops.scaled_add_(acc, x, c, assign=i == 0)
        step = c * x.double()
        # two fp32 roundings (the product, the sum) of the exact prev + step, prev being the fp32 acc before
        bound = 2.0 ** -23 * (prev.abs() + 2 * step.abs()) + 1e-44
        assert bool(((acc.double() - (prev + step)).abs() <= bound).all()), (dtype, i)
        prev = acc.double()


def test_scaled_add_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        ops.scaled_add_(torch.zeros(4), torch.zeros(5), 1.0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_passes_equal_the_cpu():
    """On CUDA the torch paths run: the same DARE mask as the CPU kernel (a counter-based stream), the
    consensus and the weighted sum within fp32 rounding of the CPU's."""
    x = _data(100003, seed=3)
    key, threshold = (0x01020304, 0x05060708), math.ceil(0.3 * 2 ** 32)
    cpu = x.clone()
    cpu_l1 = ops.dare_drop_(cpu, key, threshold)
    dev = x.cuda()
    dev_l1 = ops.dare_drop_(dev, key, threshold)
    assert torch.equal(dev.cpu(), cpu)
    assert dev_l1 == pytest.approx(cpu_l1, rel=1e-12)
    deltas = [_data(100003, seed=30 + i) for i in range(3)]
    base = _data(100003, seed=40)
    args = ([1.0, -0.5, 0.7], [1.0, 2.0, 1.0], True, 0.9)
    got = ops.consensus_merge_(base.cuda(), [d.cuda() for d in deltas], *args)
    torch.testing.assert_close(got.cpu(), ops.consensus_merge_(base.clone(), deltas, *args), atol=1e-6, rtol=1e-6)
    xs = [d.bfloat16() for d in deltas]
    acc_cpu, acc_dev = torch.empty(100003), torch.empty(100003, device="cuda")
    for i, t in enumerate(xs):
        ops.scaled_add_(acc_cpu, t, 0.3 * (i + 1), assign=i == 0)
        ops.scaled_add_(acc_dev, t.cuda(), 0.3 * (i + 1), assign=i == 0)
    torch.testing.assert_close(acc_dev.cpu(), acc_cpu, atol=1e-6, rtol=1e-6)


@compiled
@pytest.mark.parametrize("n", [1, 1037, 300001])
@pytest.mark.parametrize("tied", [False, True])
def test_magnitude_drop_kernel_equals_the_definition(n, tied):
    """TIES's compiled top-k drop: the k largest magnitudes kept, ties at the cut-off to the earliest (a stable
    sort written here), the same entries as the torch path, the L1s within fp64 rounding."""
    g = torch.Generator().manual_seed(n)
    x = (torch.randint(-3, 4, (n,), generator=g).float() * 2.0 ** -9) if tied else torch.randn(n, generator=g)
    if n > 100:
        x[17], x[50] = -0.0, float("inf")
    order = torch.sort(x.double().abs(), descending=True, stable=True).indices
    for k in sorted({1, n // 3 + 1, n}):
        keep = torch.zeros(n, dtype=torch.bool)
        keep[order[:k]] = True
        got, ref = x.clone(), x.clone()
        l1 = ops.magnitude_drop_(got, k)
        ref_l1 = ops.torch_magnitude_drop_(ref, k)
        assert _same(got, x * keep) and _same(got, ref), (n, k)
        for a, b in zip(l1, ref_l1):
            assert a == pytest.approx(b, rel=1e-12) or (math.isinf(a) and math.isinf(b)) or (
                math.isnan(a) and math.isnan(b))
    with pytest.raises(ValueError, match="outside"):
        ops.magnitude_drop_(x.clone(), 0)
