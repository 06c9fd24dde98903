"""Parameter values as mergekit writes them, evaluated per tensor.

A value is one of
  * a scalar (number, true/false, a name);
  * a gradient: a list of numbers, interpolated linearly over the layer position t in [0, 1]
    ([0, 0.5, 1] gives layer 0 of 5 the value 0, layer 2 0.5, layer 4 1); a list of other scalars
    picks the element at int(t * (len - 1));
  * a list of {filter: "<substring of the tensor name>", value: <scalar or gradient>} entries: the first
    entry whose filter is in the tensor's name (no filter, or "*", matches every tensor) gives the value;
    when none matches the parameter falls through to the next level (model -> global -> default).

t is layer_index / (num_layers - 1) for a tensor of a layer (1 with a single layer) and 0 for every other
tensor (embeddings, final norm, head), as mergekit's planner sets it."""

from __future__ import annotations

import re

from .errors import MergeError


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_setting(where: str, value):
    """The value in its checked form (a lone {filter, value} mapping becomes a one-entry list); raises
    MergeError for anything mergekit's schema does not accept."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise MergeError(f"{where}: expected a number, a list of numbers (a gradient over the layers) or a list "
                         f"of {{filter, value}} entries, got {value!r}")
    if all(isinstance(e, dict) for e in value):
        out = []
        for e in value:
            bad = sorted(set(e) - {"filter", "value"})
            if bad or "value" not in e:
                raise MergeError(f"{where}: each filtered entry is {{filter: <part of a tensor name>, value: ...}}, "
                                 f"got {e!r}")
            f = e.get("filter")
            if f is not None and not isinstance(f, str):
                raise MergeError(f"{where}: filter must be a string (part of a tensor name), got {f!r}")
            v = check_setting(where, e["value"])
            if isinstance(v, list) and isinstance(v[0], dict):
                raise MergeError(f"{where}: a filtered value cannot itself be filtered")
            out.append({"filter": f, "value": v})
        return out
    if all(isinstance(e, (bool, int, float, str)) for e in value):
        return list(value)
    raise MergeError(f"{where}: a list must hold only numbers (a gradient) or only {{filter, value}} entries, "
                     f"got {value!r}")


def leaves(setting) -> list:
    """Every scalar the setting can evaluate to, or interpolate between (a gradient's elements)."""
    if isinstance(setting, list):
        if setting and isinstance(setting[0], dict):
            return [x for e in setting for x in leaves(e["value"])]
        return list(setting)
    return [setting]


def evaluate(setting, tensor_name: str, t: float):
    """The setting's value for one tensor at layer position t (None: a filter list with no match)."""
    if setting is None or not isinstance(setting, list):
        return setting
    if setting and isinstance(setting[0], dict):
        for e in setting:
            f = e["filter"]
            if f is None or f == "*" or f in tensor_name:
                return evaluate(e["value"], tensor_name, t)
        return None
    if all(_is_number(e) for e in setting):
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    return setting[int(t * (len(setting) - 1))]


def is_plain(setting) -> bool:
    """A single value for every tensor."""
    return not isinstance(setting, list)


_LAYER = re.compile(r"^(.*?)\.(\d+)\.")


def layer_positions(names) -> dict:
    """{tensor name: t}: the layers are the numbered entries of the prefix with the most of them
    (model.layers, transformer.h, encoder.layer); every other tensor has t = 0."""
    found = {}
    per_prefix: dict = {}
    for n in names:
        m = _LAYER.match(n)
        if m:
            found[n] = (m.group(1), int(m.group(2)))
            per_prefix.setdefault(m.group(1), set()).add(int(m.group(2)))
    if not per_prefix:
        return {n: 0.0 for n in names}
    prefix = max(sorted(per_prefix), key=lambda p: len(per_prefix[p]))
    num_layers = max(per_prefix[prefix]) + 1
    out = {}
    for n in names:
        p = found.get(n)
        if p is None or p[0] != prefix:
            out[n] = 0.0
        else:
            out[n] = p[1] / (num_layers - 1) if num_layers > 1 else 1.0
    return out
