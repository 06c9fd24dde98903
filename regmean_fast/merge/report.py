"""The merge report (JSON) and the short model card written next to the merged weights."""

from __future__ import annotations

import json

import yaml

from .._version import __version__


def build_report(cfg, plan, tensor_report: dict, *, shards: dict, total_s: float, reused: list, device: str) -> dict:
    return {
        "tool": "regmean_fast", "version": __version__, "method": plan.method, "parameters": plan.params,
        "models": [m.model for m in cfg.models], "grams": [m.grams for m in cfg.models],
        **({"adapters": [m.adapter for m in cfg.models]} if any(m.adapter for m in cfg.models) else {}),
        **({"data": [m.data for m in cfg.models], "calibration": cfg.calibration_options()}
           if any(m.data for m in cfg.models) else {}),
        "weights": plan.raw_weights, "coefficients": plan.coeffs, "base_model": cfg.base_model,
        **({"base_adapter": cfg.base_adapter} if cfg.base_adapter else {}),
        "dtype": cfg.dtype, "solve_dtype": cfg.solve_dtype, "out_dtype": cfg.out_dtype, "device": device,
        "seed": cfg.seed, "regmean_exclude": list(cfg.regmean_exclude), "notes": list(cfg.notes),
        "warnings": list(plan.warnings),
        "groups": plan.n_groups(), "solve": solve_summary(tensor_report), "tensors": tensor_report, "shards": shards,
        "reused_shards": list(reused), "total_time_s": round(total_s, 3),
    }


def solve_summary(tensor_report: dict) -> dict:
    """The RegMean groups (named by their first member) that needed more than a plain fp32 Cholesky: shifted
    (repair, ridge, least squares), solved again in fp64 (escalated), or above their tolerance even so
    ("tolerance": the tightest any group was held to; each tensor's entry has its own)."""
    from ..solve import PRECISION_TOL

    firsts = {}
    for name, e in tensor_report.items():
        if e.get("method") == "regmean":
            firsts.setdefault(e["group"][0] if e.get("group") else name, e)
    tols = {n: e.get("tolerance", PRECISION_TOL) for n, e in firsts.items()}
    return {"tolerance": min(tols.values(), default=PRECISION_TOL),
            "escalated": [n for n, e in firsts.items() if e.get("escalated")],
            "shifted": [n for n, e in firsts.items() if e.get("solve", "cholesky") != "cholesky"],
            "above_tolerance": [n for n, e in firsts.items()
                                if e.get("expected_error") is None or e["expected_error"] > tols[n]]}


def config_yaml(cfg, plan) -> str:
    """The merge as a YAML file that reproduces it: every parameter resolved, paths as in cfg (absolute)."""
    d = {"method": cfg.method}
    if cfg.base_model:
        d["base_model"] = model_name(cfg.base_model, cfg.base_hub_id, cfg.base_adapter, cfg.base_adapter_hub_id)
    d["models"] = [{k: v for k, v in (("model", model_name(m.model, m.hub_id, m.adapter, m.adapter_hub_id)),
                                      ("grams", m.grams), ("data", m.data),
                                      ("weight", m.weight), ("parameters", m.parameters or None)) if v is not None}
                   for m in cfg.models]
    if plan.params:
        d["parameters"] = dict(plan.params)
    for key in ("dtype", "solve_dtype", "out_dtype"):
        if getattr(cfg, key):
            d[key] = getattr(cfg, key)
    if cfg.regmean_exclude:
        d["regmean_exclude"] = list(cfg.regmean_exclude)
    if cfg.allow_missing_grams:
        d["allow_missing_grams"] = True
    if cfg.method.startswith("dare"):
        d["seed"] = cfg.seed
    if any(m.data for m in cfg.models):
        d["calibration"] = cfg.calibration_options()
    if cfg.checkpoint_every:
        d["checkpoint_every"] = cfg.checkpoint_every
    d["shard_size"] = cfg.shard_size
    return yaml.safe_dump(d, sort_keys=False)


def model_name(folder: str, hub_id: str | None, adapter: str | None = None, adapter_hub_id: str | None = None) -> str:
    """A model as the config names it: its Hub id where it came from the Hub, else its folder; a LoRA adapter as
    mergekit's base+adapter."""
    name = hub_id or folder
    return f"{name}+{adapter_hub_id or adapter}" if adapter else name


def model_card(cfg, plan) -> str:
    # base_model: the Hub ids where the models (a LoRA adapter and its base) came from the Hub (a local folder's
    # name is no Hub link)
    hub = [i for i in [cfg.base_hub_id, cfg.base_adapter_hub_id] + [i for m in cfg.models
                                                                     for i in (m.hub_id, m.adapter_hub_id)] if i]
    hub = list(dict.fromkeys(i.partition("@")[0] for i in hub))
    lines = (["---", "library_name: transformers", "tags:", "- merge", "- regmean_fast", f"- {plan.method}"]
             + (["base_model:"] + [f"- {n}" for n in hub] if hub else [])
             + ["---", "", "# Merged model", "",
                f"Merged with regmean_fast {__version__}, method `{plan.method}`"
                + (" (RegMean: \"Dataless Knowledge Fusion by Merging Weights of Language Models\", Jin et al. 2023)."
                   if plan.method == "regmean" else
                   " (RegMean++: each block's statistics through the already merged blocks, Nguyen et al. 2025)."
                   if plan.method == "regmean++" else "."), "", "## Models", ""])
    for i, m in enumerate(cfg.models):
        name = f"`{m.hub_id or m.model}`" + (f", with the LoRA adapter `{m.adapter_hub_id or m.adapter}`"
                                              if m.adapter else "")
        lines.append(f"- {name} (" + (f"coefficient {plan.coeffs[i]:.4g})" if plan.coeffs is not None
                                           else f"weight {plan.raw_weights[i]})"))
    if plan.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in plan.warnings]
    lines += ["", "## Configuration", "", "```yaml", config_yaml(cfg, plan).rstrip(), "```", "",
              "Per-tensor details (method, ridge, condition, expected error, time) are in `merge_report.json`.", ""]
    return "\n".join(lines)


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=str)
        f.write("\n")
