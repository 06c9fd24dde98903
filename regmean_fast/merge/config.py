"""Merge configuration: a mergekit-like YAML file and/or command-line flags, validated up front.

    method: regmean              # regmean (default), average (linear), task_arithmetic, ties, dare_ties,
                                 # dare_linear, slerp, fisher
    base_model: path             # task_arithmetic, ties, dare_*, slerp (under models: too, it is the base)
    models:                      # paths relative to the working directory (as mergekit); or mergekit's
                                 # slices: [{sources: [{model, layer_range: [0, n]}, ...]}] of whole models
      - model: path/to/model_a
        grams: path/to/grams_a.safetensors
        data: path/to/a.jsonl    # regmean++: calibration data, read at merge time
        weight: 1.0              # or parameters: {weight: ..., density: ...}; numbers, gradients, filters
      - model: path/to/model_b
        grams: path/to/grams_b.safetensors
    parameters: {alpha: 0.9, normalization: mean}
    dtype: float32               # mergekit's: the arithmetic's and the output's (16-bit: float32 arithmetic)
    solve_dtype: float32         # RegMean solve (float32 or float64)
    out_dtype: bfloat16          # default: the models' dtype
    regmean_exclude: [".*classifier.*"]   # regexes (re.search on tensor names) averaged instead
    allow_missing_grams: false
    shard_size: 5GB
    device: cpu
    max_memory: null             # host memory budget, e.g. 16GB
    copy_tokenizer: true
    calibration: {max_length: 512, batch_size: 8, max_examples: null, text_field: text}   # regmean++'s data
    checkpoint_every: null       # regmean++: a checkpoint every N blocks (and on Ctrl-C) for --resume
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field

import torch

from ..io.shards import parse_size
from .errors import MergeError
from .methods import METHODS
from .settings import check_setting, leaves

TOP_KEYS = {"method", "merge_method", "base_model", "models", "parameters", "dtype", "solve_dtype", "out_dtype",
            "regmean_exclude", "allow_missing_grams", "shard_size", "device", "max_memory", "copy_tokenizer", "seed",
            "tokenizer_source", "calibration", "checkpoint_every"}
MODEL_KEYS = {"model", "grams", "data", "weight", "parameters"}
# How regmean++ reads each model's data, with the meaning of the `grams` command's flags of the same names
# (max_length None: min(512, the model's limit)).
CALIBRATION_DEFAULTS = {"max_length": None, "batch_size": 8, "max_examples": None, "text_field": "text"}
FLOAT_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64,
                "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
# mergekit keys and methods with no equivalent here: refused in one line naming the nearest supported thing
REFUSED_KEYS = {
    "modules": "modules (per-module slices) are not supported; list whole models under models:",
    "tokenizer": "tokenizer (a merged vocabulary) is not supported; the tokenizer is copied from the base (or first) "
                 "model, as tokenizer_source: base",
    "chat_template": "chat_template is not supported; the chat template of the base (or first) model is copied with "
                     "its tokenizer files (edit tokenizer_config.json in the output to change it)",
}
NEAREST_METHOD = {"passthrough": "none (layer stacking); for whole models use linear", "breadcrumbs": "ties",
                  "breadcrumbs_ties": "ties", "della": "dare_ties", "della_linear": "dare_linear",
                  "model_stock": "linear", "nuslerp": "slerp", "multislerp": "slerp (two models) or linear",
                  "karcher": "linear", "arcee_fusion": "slerp", "sce": "ties", "nearswap": "slerp", "ram": "ties",
                  "ramplus_tl": "ties"}
METHOD_ALIASES = {"linear": "average"}  # mergekit's name for the (normalised by default) weighted average
PARAM_ALIASES = {"lambda": "scaling"}  # mergekit's name
IGNORED_PARAMS = {"int8_mask": "int8_mask is ignored: in mergekit it only saves memory (the masks here are boolean)"}
SLICES_REFUSED = ("slices: only one slice whose sources all take every layer (layer_range [0, n], the classic "
                  "slerp config) is supported: layer ranges that cut or stack models (frankenmerges, passthrough) "
                  "are not; list whole models under models:")
SLICE_KEYS = {"sources", "parameters", "base_model", "residual_weight"}
LOW_PRECISION = ("bfloat16", "bf16", "float16", "fp16", "half")


@dataclass
class ModelSpec:
    model: str
    grams: str | None = None
    weight: object = None  # a number or a mergekit setting (gradient, filters); None: 1
    parameters: dict = field(default_factory=dict)  # the other per-model parameters (density)
    hub_id: str | None = None  # the name as given when `model` was found in the Hugging Face cache
    data: str | None = None  # calibration data (regmean++)
    adapter: str | None = None  # a PEFT LoRA adapter folder folded into `model` (then its base) as it is read
    adapter_hub_id: str | None = None  # as hub_id, for the adapter


@dataclass
class MergeConfig:
    models: list = field(default_factory=list)  # list[ModelSpec]
    method: str = "regmean"
    base_model: str | None = None
    parameters: dict = field(default_factory=dict)
    dtype: str | None = None  # None: float32 arithmetic, output in the models' dtype
    solve_dtype: str = "float32"
    out_dtype: str | None = None
    regmean_exclude: list = field(default_factory=list)
    allow_missing_grams: bool = False
    shard_size: str | int = "5GB"
    device: str = "cpu"
    max_memory: str | int | None = None
    copy_tokenizer: bool = True
    seed: int = 0  # dare_ties, dare_linear: the random drop
    tokenizer_source: str | None = None  # mergekit's; only "base" (our behaviour) is accepted
    base_hub_id: str | None = None  # as ModelSpec.hub_id, for base_model
    base_adapter: str | None = None  # as ModelSpec.adapter, for base_model
    base_adapter_hub_id: str | None = None
    notes: list = field(default_factory=list)  # one line each, said once when the merge starts
    calibration: dict = field(default_factory=dict)  # regmean++: CALIBRATION_DEFAULTS' keys
    checkpoint_every: int | None = None  # regmean++: a checkpoint every N blocks (not part of the signature)
    slice_layers: int | None = None  # mergekit's slices form: every source's layer_range was [0, slice_layers]

    def as_dict(self) -> dict:
        return asdict(self)

    # resolved values, valid after validate()
    def torch_dtype(self) -> torch.dtype:
        return FLOAT_DTYPES[self.dtype or "float32"]

    def torch_solve_dtype(self) -> torch.dtype:
        return FLOAT_DTYPES[self.solve_dtype]

    def torch_out_dtype(self) -> torch.dtype | None:
        return FLOAT_DTYPES[self.out_dtype] if self.out_dtype else None

    def shard_bytes(self) -> int:
        return parse_size(self.shard_size)

    def max_memory_bytes(self) -> int | None:
        return parse_size(self.max_memory) if self.max_memory not in (None, "") else None

    def note(self, line: str) -> None:
        if line not in self.notes:
            self.notes.append(line)

    def absolute_paths(self) -> "MergeConfig":
        """Model, Gram and base paths made absolute (the saved regmean_config.yml works from any folder)."""
        for m in self.models:
            m.model = os.path.abspath(m.model)
            m.grams = os.path.abspath(m.grams) if m.grams else m.grams
            m.data = os.path.abspath(m.data) if m.data else m.data
            m.adapter = os.path.abspath(m.adapter) if m.adapter else m.adapter
        self.base_model = os.path.abspath(self.base_model) if self.base_model else self.base_model
        self.base_adapter = os.path.abspath(self.base_adapter) if self.base_adapter else self.base_adapter
        return self

    def validate(self, *, require_paths: bool = True) -> "MergeConfig":
        """Check everything that can be checked without reading a model; raises MergeError. Also puts mergekit's
        spellings into ours (linear, lambda, dtype: bfloat16) and drops a base model listed under models."""
        self.method = METHOD_ALIASES.get(self.method, self.method)
        if self.method not in METHODS:
            if self.method in NEAREST_METHOD:
                raise MergeError(f"merge method {self.method} (mergekit) is not supported; nearest here: "
                                 f"{NEAREST_METHOD[self.method]}")
            raise MergeError(f"unknown merge method {self.method!r} (known: {', '.join(METHODS)}, linear)")
        meth = METHODS[self.method]
        if len(self.models) < 1:
            raise MergeError("no models to merge")
        if require_paths:
            self._resolve_models()
            self._check_whole_slices()
        self._check_parameters(meth)
        self._check_dtypes()
        if meth.needs_base and not self.base_model:
            raise MergeError(f"method {self.method} needs base_model")
        self._validate_data(meth)  # first: --data given to another method is the likelier mistake
        if meth.needs_base:  # mergekit: a base_model listed under models is the base, not one more model
            same, same_adapter = _same_path(self.base_model), _same_path(self.base_adapter)
            self.models = [m for m in self.models if not (same(m.model) and (
                same_adapter(m.adapter) if self.base_adapter else m.adapter is None))]
            if not self.models:
                raise MergeError(f"method {self.method}: no models besides the base model")
        if self.method == "slerp":
            if len(self.models) != 1:
                raise MergeError(f"slerp merges two models, the base_model and one other: got {len(self.models)} "
                                 "others (for more, use linear)")
            if self.models[0].weight is not None:
                self.note("slerp: the model's weight is not used (t sets the mix), as in mergekit")
        if meth.needs_stats:
            n = sum(1 for m in self.models if m.grams)
            if n < len(self.models):
                raise MergeError(f"method {self.method} needs one Gram (statistics) file per model: "
                                 f"got {n} for {len(self.models)} models")
        self._check_tokenizer_source()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise MergeError(f"seed must be an integer, got {self.seed!r}")
        for rx in self.regmean_exclude:
            try:
                re.compile(rx)
            except re.error as e:
                raise MergeError(f"regmean_exclude: bad regular expression {rx!r} ({e})") from None
        for name, size in (("shard_size", self.shard_bytes), ("max_memory", self.max_memory_bytes)):
            try:
                size()
            except ValueError as e:
                raise MergeError(f"{name}: {e}") from None
        if not re.fullmatch(r"cpu|cuda(:\d+)?", str(self.device)):
            raise MergeError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        if str(self.device).startswith("cuda"):
            if not torch.cuda.is_available():
                raise MergeError(f"device {self.device} requested but CUDA is not available")
            idx = int(self.device.split(":")[1]) if ":" in self.device else 0
            if idx >= torch.cuda.device_count():
                raise MergeError(f"device {self.device} does not exist ({torch.cuda.device_count()} CUDA devices)")
        if require_paths:
            for m in self.models:
                if m.grams and not os.path.exists(m.grams):
                    raise MergeError(f"Gram file {m.grams} does not exist")
                if m.data and not os.path.isfile(m.data):
                    raise MergeError(f"data file {m.data} does not exist")
        return self

    def _resolve_models(self) -> None:
        """Each model (and the base) as a local folder: a folder, or a Hub id found in the Hugging Face cache; a LoRA
        adapter as its base's folder and the adapter's."""
        from ..io.models import resolve_model
        from ..io.hf import ModelFolderError

        try:
            for m in self.models:
                if m.adapter is None:  # not resolved yet (a MergeConfig is validated more than once)
                    ref = resolve_model(m.model)
                    m.model, m.adapter = ref.folder, ref.adapter
                    m.hub_id, m.adapter_hub_id = ref.hub_id or m.hub_id, ref.adapter_hub_id or m.adapter_hub_id
            if self.base_model and self.base_adapter is None:
                ref = resolve_model(self.base_model)
                self.base_model, self.base_adapter = ref.folder, ref.adapter
                self.base_hub_id = ref.hub_id or self.base_hub_id
                self.base_adapter_hub_id = ref.adapter_hub_id or self.base_adapter_hub_id
        except ModelFolderError as e:
            raise MergeError(str(e)) from None

    def _check_whole_slices(self) -> None:
        """The slices form stands for the models form only where each range covers the model's every layer."""
        if self.slice_layers is None:
            return
        from ..io.models import ModelLoadError, load_config

        for m in self.models:
            try:
                n = getattr(load_config(m.model, False), "num_hidden_layers", None)
            except ModelLoadError as e:
                raise MergeError(str(e)) from None
            if n != self.slice_layers:
                raise MergeError(f"{SLICES_REFUSED} ({m.model} has {n} layers, its layer_range is "
                                 f"[0, {self.slice_layers}])")

    def _check_parameters(self, meth) -> None:
        """Every parameter at every level: known to the method, of mergekit's forms, each value it can take
        valid (a gradient between valid values stays valid: every check is an interval)."""
        params = {}
        for key, v in self.parameters.items():
            key = self._param_name(key, params)
            if key is None:
                continue
            params[key] = check_setting(f"parameters.{key}", v)
        self.parameters = params
        known_global, known_model = set(meth.params), set(meth.model_params)
        unknown = sorted(set(params) - known_global - known_model)
        if unknown:
            raise MergeError(f"unknown parameter(s) for method {self.method}: {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(known_global | known_model)) or 'none'})")
        first = {k: leaves(v)[0] for k, v in params.items() if k in known_global}
        meth.check_params(first)
        for key in first:
            for leaf in leaves(params[key]):
                meth.check_params({**first, key: leaf})
        for key in set(params) & known_model:
            for leaf in leaves(params[key]):
                meth.check_model_params({key: leaf})
        for i, m in enumerate(self.models):
            where = f"models[{i}] ({m.model})"
            if m.weight is not None:
                m.weight = check_setting(f"{where}: weight", m.weight)
                for leaf in leaves(m.weight):
                    _model_check(meth, where, {"weight": leaf})
            mp = {}
            for given, v in (m.parameters or {}).items():
                key = PARAM_ALIASES.get(given, given)
                if key not in known_model or key == "weight":
                    raise MergeError(f"{where}: {given} is not a per-model parameter of method {self.method} "
                                     f"(per-model: {', '.join(sorted(known_model))}); global ones go under the "
                                     "top-level parameters")
                mp[key] = check_setting(f"{where}: {key}", v)
                for leaf in leaves(mp[key]):
                    _model_check(meth, where, {key: leaf})
            m.parameters = mp

    def _param_name(self, key, params):
        """Our name for a global parameter (None: accepted and ignored, with a note)."""
        if key in IGNORED_PARAMS:
            if not isinstance(self.parameters[key], bool):
                raise MergeError(f"{key} must be true or false, got {self.parameters[key]!r}")
            self.note(IGNORED_PARAMS[key])
            return None
        name = PARAM_ALIASES.get(key, key)
        if name in params:
            raise MergeError(f"parameters: give {name} once (lambda is mergekit's name for scaling)")
        return name

    def _check_dtypes(self) -> None:
        """mergekit's dtype is the arithmetic's, and the output's unless out_dtype is given: a float32 or
        float64 dtype is both; a 16-bit one is written, the arithmetic staying float32 (a note says so)."""
        if self.out_dtype is not None and self.out_dtype not in FLOAT_DTYPES:
            raise MergeError(f"out_dtype must be one of {', '.join(sorted(FLOAT_DTYPES))}, got {self.out_dtype!r}")
        if self.dtype is not None:
            if self.dtype not in FLOAT_DTYPES:
                raise MergeError(f"dtype must be one of {', '.join(sorted(FLOAT_DTYPES))}, got {self.dtype!r}")
            if self.out_dtype is None:
                self.out_dtype = self.dtype
            if self.dtype in LOW_PRECISION:
                self.note(f"dtype {self.dtype}: the arithmetic is float32 and the output {self.out_dtype} "
                          f"(mergekit computes in {self.dtype}; float32 is at least as precise)")
                self.dtype = "float32"
        v = self.solve_dtype
        if v not in FLOAT_DTYPES or FLOAT_DTYPES[v] not in (torch.float32, torch.float64):
            raise MergeError(f"solve_dtype must be float32 or float64, got {v!r}")

    def _check_tokenizer_source(self) -> None:
        src = self.tokenizer_source
        if src is None or src == "base":
            return
        if src == "union":
            raise MergeError("tokenizer_source: union (a merged vocabulary) is not supported; the tokenizer is "
                             "copied from the base (or first) model, as tokenizer_source: base")
        donor = self.base_model or self.models[0].model
        if not isinstance(src, str) or not _same_path(donor)(src):
            raise MergeError(f"tokenizer_source: {src} is not supported; the tokenizer is copied from the base (or "
                             "first) model, as tokenizer_source: base (make that model the base_model)")


    def calibration_options(self) -> dict:
        """The calibration settings with defaults filled in (valid after validate())."""
        return {**CALIBRATION_DEFAULTS, **self.calibration}

    def _validate_data(self, meth) -> None:
        n = sum(1 for m in self.models if m.data)
        if meth.needs_data and n < len(self.models):
            raise MergeError(f"method {self.method} needs one calibration data file per model (--data, or data: "
                             f"per model in the YAML): got {n} for {len(self.models)} models")
        if not meth.needs_data and (n or self.calibration):
            raise MergeError(f"calibration data is only read by regmean++, not by method {self.method}")
        unknown = sorted(set(self.calibration) - set(CALIBRATION_DEFAULTS))
        if unknown:
            raise MergeError(f"calibration: unknown key(s) {', '.join(unknown)} "
                             f"(known: {', '.join(CALIBRATION_DEFAULTS)})")
        for key in ("max_length", "batch_size", "max_examples"):
            v = self.calibration.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise MergeError(f"calibration: {key} must be an integer >= 1, got {v!r}")
        ce = self.checkpoint_every
        if ce is not None and (isinstance(ce, bool) or not isinstance(ce, int) or ce < 1):
            raise MergeError(f"checkpoint_every must be an integer >= 1, got {ce!r}")
        if ce is not None and not meth.needs_data:
            raise MergeError(f"checkpoint_every is only used by regmean++, not by method {self.method}")
        tf = self.calibration.get("text_field", "text")
        if not isinstance(tf, str) or not tf:
            raise MergeError(f"calibration: text_field must be a name, got {tf!r}")

def _model_check(meth, where, params) -> None:
    try:
        meth.check_model_params(params)
    except MergeError as e:
        raise MergeError(f"{where}: {e}") from None


def _same_path(p):
    """A test: is this path the same model folder as p (mergekit compares model references)?"""
    real = os.path.realpath(os.path.expanduser(p)) if p else None
    return lambda q: real is not None and isinstance(q, str) and os.path.realpath(os.path.expanduser(q)) == real


def _bool(key, v):
    if not isinstance(v, bool):
        raise MergeError(f"{key} must be true or false, got {v!r}")
    return v


def config_from_dict(d: dict, *, source: str = "config") -> MergeConfig:
    """Build a MergeConfig from a parsed YAML mapping; unknown keys are errors. Relative paths are taken
    relative to the working directory, as mergekit takes them."""
    if not isinstance(d, dict):
        raise MergeError(f"{source}: expected a mapping at the top level")
    for key, why in REFUSED_KEYS.items():
        if key in d:
            raise MergeError(f"{source}: {why}")
    slice_layers, slice_notes = None, []
    if "slices" in d:
        d, slice_layers, slice_notes = _slices_as_models(d, source)
    unknown = sorted(set(d) - TOP_KEYS)
    if unknown:
        raise MergeError(f"{source}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(TOP_KEYS))})")
    if "method" in d and "merge_method" in d:
        raise MergeError(f"{source}: give either method or merge_method, not both")

    def path(p):
        if p is None:
            return None
        if not isinstance(p, str):
            raise MergeError(f"{source}: expected a path, got {p!r}")
        return os.path.expanduser(p)

    cfg = MergeConfig()
    cfg.models += _model_specs(d.get("models") or [], source, path)
    cfg.method = d.get("method", d.get("merge_method", cfg.method))
    if not isinstance(cfg.method, str):
        raise MergeError(f"{source}: method must be a name, got {cfg.method!r}")
    cfg.base_model = path(d.get("base_model"))
    params = d.get("parameters") or {}
    if not isinstance(params, dict):
        raise MergeError(f"{source}: parameters must be a mapping")
    cfg.parameters = dict(params)
    for key in ("dtype", "solve_dtype", "out_dtype", "shard_size", "device", "max_memory", "seed", "tokenizer_source"):
        if key in d and d[key] is not None:
            setattr(cfg, key, d[key] if key in ("shard_size", "max_memory", "seed") else str(d[key]))
    rx = d.get("regmean_exclude") or []
    if isinstance(rx, str):
        rx = [rx]
    if not isinstance(rx, list) or not all(isinstance(r, str) for r in rx):
        raise MergeError(f"{source}: regmean_exclude must be a list of regular expressions")
    cfg.regmean_exclude = rx
    if "allow_missing_grams" in d:
        cfg.allow_missing_grams = _bool("allow_missing_grams", d["allow_missing_grams"])
    if "copy_tokenizer" in d:
        cfg.copy_tokenizer = _bool("copy_tokenizer", d["copy_tokenizer"])
    cal = d.get("calibration") or {}
    if not isinstance(cal, dict):
        raise MergeError(f"{source}: calibration must be a mapping")
    cfg.calibration = dict(cal)
    cfg.checkpoint_every = d.get("checkpoint_every")
    cfg.slice_layers = slice_layers
    for line in slice_notes:
        cfg.note(line)
    return cfg


def _slices_as_models(d: dict, source: str) -> tuple[dict, int, list[str]]:
    """mergekit's slices form where it says what the models form says: one slice whose sources all take the
    layers [0, n) (mergekit itself turns models: into such a slice; validate checks n against each model).
    The slice's parameters and base_model take precedence over the top level's, as in mergekit; a source's
    parameters are that model's. -> (d in the models form, n, notes); anything else is refused in one line."""
    def refuse(why=""):
        return MergeError(f"{source}: {SLICES_REFUSED}" + (f" ({why})" if why else ""))

    if "models" in d:
        raise MergeError(f"{source}: give either slices or models, not both")
    slices = d["slices"]
    if not isinstance(slices, list) or len(slices) != 1 or not isinstance(slices[0], dict):
        raise refuse(f"got {len(slices) if isinstance(slices, list) else 'no list of'} slices")
    sl = slices[0]
    if set(sl) - SLICE_KEYS:
        raise refuse(f"unknown slice key(s) {', '.join(sorted(set(sl) - SLICE_KEYS))}")
    sources = sl.get("sources")
    if not isinstance(sources, list) or not sources or not all(isinstance(x, dict) for x in sources):
        raise refuse("a slice needs a list of sources")
    ranges = set()
    for x in sources:
        r = x.get("layer_range")
        if not (isinstance(r, list) and len(r) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                            for v in r)):
            raise refuse(f"layer_range {r!r} of {x.get('model')}")
        ranges.add(tuple(r))
    if len(ranges) != 1 or next(iter(ranges))[0] != 0:
        raise refuse(f"layer ranges {', '.join(str(list(r)) for r in sorted(ranges))}")
    out = {k: v for k, v in d.items() if k != "slices"}
    out["models"] = [{k: v for k, v in x.items() if k != "layer_range"} for x in sources]
    if sl.get("parameters") is not None:
        if not isinstance(sl["parameters"], dict):
            raise MergeError(f"{source}: a slice's parameters must be a mapping")
        out["parameters"] = {**(d.get("parameters") or {}), **sl["parameters"]}
    if sl.get("base_model") is not None:
        out["base_model"] = sl["base_model"]
    notes = ["residual_weight is ignored, as mergekit 0.1.5 ignores it"] if sl.get("residual_weight") is not None \
        else []
    return out, next(iter(ranges))[1], notes


def _model_specs(models, source: str, path) -> list[ModelSpec]:
    """The YAML's models list (paths through `path`); a model's parameters are checked by MergeConfig.validate."""
    if not isinstance(models, list):
        raise MergeError(f"{source}: models must be a list")
    specs = []
    for i, m in enumerate(models):
        if isinstance(m, str):
            m = {"model": m}
        if not isinstance(m, dict) or "model" not in m:
            raise MergeError(f"{source}: models[{i}] needs a `model` path")
        bad = sorted(set(m) - MODEL_KEYS)
        if bad:
            raise MergeError(f"{source}: models[{i}]: unknown key(s) {', '.join(bad)} (known: {', '.join(sorted(MODEL_KEYS))})")
        mp = dict(m.get("parameters") or {})
        if not isinstance(m.get("parameters") or {}, dict):
            raise MergeError(f"{source}: models[{i}].parameters must be a mapping")
        if "weight" in m and "weight" in mp:
            raise MergeError(f"{source}: models[{i}]: give weight once (as weight or parameters.weight)")
        w = m.get("weight", mp.pop("weight", None))
        specs.append(ModelSpec(model=path(m["model"]), grams=path(m.get("grams")), weight=w, parameters=mp,
                               data=path(m.get("data"))))
    return specs


def load_yaml(path: str) -> MergeConfig:
    import yaml

    try:
        with open(path) as f:
            d = yaml.safe_load(f)
    except OSError as e:
        raise MergeError(f"cannot read {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise MergeError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return config_from_dict(d or {}, source=path)
