"""Merge configuration: a mergekit-like YAML file and/or command-line flags, validated up front.

    method: regmean              # regmean (default), average, task_arithmetic, ties, fisher
    base_model: path             # needed by task_arithmetic and ties
    models:
      - model: path/to/model_a
        grams: path/to/grams_a.safetensors
        data: path/to/a.jsonl    # regmean++: calibration data, read at merge time
        weight: 1.0
      - model: path/to/model_b
        grams: path/to/grams_b.safetensors
    parameters: {alpha: 0.9, normalization: mean}
    dtype: float32               # compute dtype (float32 or float64)
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
from .methods.base import as_number

TOP_KEYS = {"method", "merge_method", "base_model", "models", "parameters", "dtype", "solve_dtype", "out_dtype",
            "regmean_exclude", "allow_missing_grams", "shard_size", "device", "max_memory", "copy_tokenizer",
            "calibration", "checkpoint_every"}
MODEL_KEYS = {"model", "grams", "data", "weight", "parameters"}
# How regmean++ reads each model's data, with the meaning of the `grams` command's flags of the same names
# (max_length None: min(512, the model's limit)).
CALIBRATION_DEFAULTS = {"max_length": None, "batch_size": 8, "max_examples": None, "text_field": "text"}
FLOAT_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64,
                "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class ModelSpec:
    model: str
    grams: str | None = None
    weight: float = 1.0
    data: str | None = None  # calibration data (regmean++)


@dataclass
class MergeConfig:
    models: list = field(default_factory=list)  # list[ModelSpec]
    method: str = "regmean"
    base_model: str | None = None
    parameters: dict = field(default_factory=dict)
    dtype: str = "float32"
    solve_dtype: str = "float32"
    out_dtype: str | None = None
    regmean_exclude: list = field(default_factory=list)
    allow_missing_grams: bool = False
    shard_size: str | int = "5GB"
    device: str = "cpu"
    max_memory: str | int | None = None
    copy_tokenizer: bool = True
    calibration: dict = field(default_factory=dict)  # regmean++: CALIBRATION_DEFAULTS' keys
    checkpoint_every: int | None = None  # regmean++: a checkpoint every N blocks (not part of the signature)

    def as_dict(self) -> dict:
        return asdict(self)

    # resolved values, valid after validate()
    def torch_dtype(self) -> torch.dtype:
        return FLOAT_DTYPES[self.dtype]

    def torch_solve_dtype(self) -> torch.dtype:
        return FLOAT_DTYPES[self.solve_dtype]

    def torch_out_dtype(self) -> torch.dtype | None:
        return FLOAT_DTYPES[self.out_dtype] if self.out_dtype else None

    def shard_bytes(self) -> int:
        return parse_size(self.shard_size)

    def max_memory_bytes(self) -> int | None:
        return parse_size(self.max_memory) if self.max_memory not in (None, "") else None

    def method_params(self) -> dict:
        return METHODS[self.method].check_params(dict(self.parameters))

    def weights(self) -> list:
        return [float(m.weight) for m in self.models]

    def absolute_paths(self) -> "MergeConfig":
        """Model, Gram and base paths made absolute (the saved regmean_config.yml works from any folder)."""
        for m in self.models:
            m.model = os.path.abspath(m.model)
            m.grams = os.path.abspath(m.grams) if m.grams else m.grams
            m.data = os.path.abspath(m.data) if m.data else m.data
        self.base_model = os.path.abspath(self.base_model) if self.base_model else self.base_model
        return self

    def validate(self, *, require_paths: bool = True) -> "MergeConfig":
        """Check everything that can be checked without reading a model; raises MergeError."""
        if self.method not in METHODS:
            raise MergeError(f"unknown merge method {self.method!r} (known: {', '.join(METHODS)})")
        meth = METHODS[self.method]
        if len(self.models) < 1:
            raise MergeError("no models to merge")
        self.method_params()
        for name in ("dtype", "solve_dtype"):
            v = getattr(self, name)
            if v not in FLOAT_DTYPES or FLOAT_DTYPES[v] not in (torch.float32, torch.float64):
                hint = f"; for a {v} output (mergekit's dtype) set out_dtype: {v}" if v in FLOAT_DTYPES else ""
                raise MergeError(f"{name} must be float32 or float64, got {v!r}{hint}")
        if self.out_dtype is not None and self.out_dtype not in FLOAT_DTYPES:
            raise MergeError(f"out_dtype must be one of {', '.join(sorted(FLOAT_DTYPES))}, got {self.out_dtype!r}")
        ws = []
        for i, m in enumerate(self.models):
            w = as_number(f"model {i} ({m.model}): weight", m.weight)
            if w != w or w < 0 or w == float("inf"):
                raise MergeError(f"model {i} ({m.model}): weight must be a non-negative finite number, got {m.weight!r}")
            ws.append(w)
        if sum(ws) <= 0:
            raise MergeError("model weights must not all be zero")
        if meth.needs_base and not self.base_model:
            raise MergeError(f"method {self.method} needs base_model")
        self._validate_data(meth)  # first: --data given to another method is the likelier mistake
        if meth.needs_stats:
            n = sum(1 for m in self.models if m.grams)
            if n < len(self.models):
                raise MergeError(f"method {self.method} needs one Gram (statistics) file per model: "
                                 f"got {n} for {len(self.models)} models")
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
            paths = [m.model for m in self.models] + ([self.base_model] if self.base_model else [])
            for p in paths:
                if not os.path.isdir(p):
                    raise MergeError(f"model folder {p} does not exist")
            for m in self.models:
                if m.grams and not os.path.exists(m.grams):
                    raise MergeError(f"Gram file {m.grams} does not exist")
                if m.data and not os.path.isfile(m.data):
                    raise MergeError(f"data file {m.data} does not exist")
        return self

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


def _bool(key, v):
    if not isinstance(v, bool):
        raise MergeError(f"{key} must be true or false, got {v!r}")
    return v


def config_from_dict(d: dict, *, source: str = "config") -> MergeConfig:
    """Build a MergeConfig from a parsed YAML mapping; unknown keys are errors. Paths are taken
    relative to the YAML file's folder when `source` is a file path."""
    if not isinstance(d, dict):
        raise MergeError(f"{source}: expected a mapping at the top level")
    unknown = sorted(set(d) - TOP_KEYS)
    if unknown:
        raise MergeError(f"{source}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(TOP_KEYS))})")
    if "method" in d and "merge_method" in d:
        raise MergeError(f"{source}: give either method or merge_method, not both")
    base_dir = os.path.dirname(os.path.abspath(source)) if os.path.isfile(source) else None

    def path(p):
        if p is None:
            return None
        if not isinstance(p, str):
            raise MergeError(f"{source}: expected a path, got {p!r}")
        p = os.path.expanduser(p)
        return os.path.join(base_dir, p) if base_dir and not os.path.isabs(p) else p

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
    if cfg.method == "linear":  # mergekit's name for the weighted average (normalised by default)
        if cfg.parameters.pop("normalize", True) is not True:
            raise MergeError(f"{source}: method linear with normalize: false (an unnormalised weighted sum) is not "
                             "supported; use average (weights are normalised) or task_arithmetic with a base_model")
        cfg.method = "average"
    for key in ("dtype", "solve_dtype", "out_dtype", "shard_size", "device", "max_memory"):
        if key in d and d[key] is not None:
            setattr(cfg, key, d[key] if key in ("shard_size", "max_memory") else str(d[key]))
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
    return cfg


def _model_specs(models, source: str, path) -> list[ModelSpec]:
    """The YAML's models list (paths through `path`)."""
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
        w = m.get("weight", (m.get("parameters") or {}).get("weight", 1.0))
        extra = sorted(set(m.get("parameters") or {}) - {"weight"})
        if extra:
            raise MergeError(f"{source}: models[{i}].parameters: unknown key(s) {', '.join(extra)}")
        specs.append(ModelSpec(model=path(m["model"]), grams=path(m.get("grams")), weight=w,
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
