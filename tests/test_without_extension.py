"""The package must import and work when the compiled extension is missing (a checkout never built):
the same operators, registered from pure PyTorch, with one warning."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = r"""
import importlib.abc, sys, warnings

class HideExtension(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "regmean_fast._C":
            raise ImportError("hidden for this test")
        return None

sys.meta_path.insert(0, HideExtension())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import regmean_fast as rf
assert sum("compiled extension is not available" in str(w.message) for w in caught) == 1, caught
import torch
from regmean_fast import ops
assert rf.build_info()["extension"] is False
X = torch.randn(2, 5, 6, dtype=torch.float64).float()
mask = torch.rand(2, 5) > 0.3
G = torch.zeros(6, 6)
ops.symmetrize_(ops.gram_update(G, X, mask))
R = X.double().reshape(-1, 6)[mask.reshape(-1)]
assert torch.allclose(G.double(), R.T @ R, atol=1e-5)
A = ops.gram_reduce([ops.pack_triu(G), ops.pack_triu(G)], [0.5, 0.5], 0.9)
assert torch.allclose(A, 0.9 * G + 0.1 * torch.diag(torch.diagonal(G)), atol=1e-5)
assert torch.equal(ops.unpack_triu(ops.pack_triu(G)), G)
x = torch.randn(4, 3)
s = ops.split_bf16x3(x)
assert torch.equal(s[0].float() + s[1].float() + s[2].float(), x)
C = torch.zeros(2, 3)
W = torch.randn(2, 4).bfloat16()
ops.addmm_bf16x3_(C, W, s, 1.0)
assert torch.allclose(C, W.float() @ x, atol=1e-5)
assert not ops.exact_bf16_products_available("cpu")
W1, W2 = torch.randn(3, 6), torch.randn(3, 6)
merged = rf.regmean_solve([W1, W2], [G + torch.eye(6), G + torch.eye(6)])
assert torch.allclose(merged, (W1 + W2) / 2, atol=1e-4)
print("ok")
"""


def test_package_works_without_the_extension():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                       env={**os.environ, "PYTHONWARNINGS": "default"})
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
