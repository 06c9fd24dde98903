"""Hugging Face model folders as transformers sees them: the checks before any work, the config, the head
class, the model on the meta device (names and shapes, nothing read) and the loaded model. Both jobs read the
same folders; `io.hf.ModelFolder` reads their tensors without transformers.

Every failure here is a ModelLoadError: one line for the user, which the jobs report as their own error."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from .hf import ModelFolderError, weight_files
from .lora import ADAPTER_CONFIG, adapter_base, is_adapter_folder, read_adapter_config
from .torch_bin import TorchBinError, is_bin, load_weights_only

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name, as the Hugging Face Hub names a model


class ModelLoadError(ModelFolderError):
    """A model folder that these checks refuse or transformers cannot load (one line for the user)."""


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else ""


def hub_cache_dir() -> str:
    """huggingface_hub's cache folder, from the environment as it is now (HF_HUB_CACHE, HF_HOME)."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return os.path.expanduser(env)
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


@dataclass
class ModelRef:
    """A model as resolved: its folder (the base, for an adapter), the Hub id it was found under, and the PEFT LoRA
    adapter folded into it (with its Hub id)."""
    folder: str
    hub_id: str | None = None
    adapter: str | None = None
    adapter_hub_id: str | None = None


def resolve_model(ref: str) -> ModelRef:
    """A model as users name it -> ModelRef. A folder that exists is that folder (relative paths from the working
    directory); else `org/name` or `org/name@revision` is looked up in huggingface_hub's cache, offline (nothing is
    downloaded). A PEFT LoRA adapter folder (adapter_config.json), named either way, is the base its config names
    (base_model_name_or_path, resolved the same way) with the adapter; mergekit's `base+adapter` names both."""
    path = os.path.expanduser(str(ref))
    if not os.path.exists(path) and "+" in str(ref):  # mergekit's base+adapter
        base_ref, adapter_ref = str(ref).split("+", 1)
        base, adapter = _find_folder(base_ref), _find_folder(adapter_ref)
        if not is_adapter_folder(adapter[0]):
            raise ModelLoadError(f"model {ref}: {adapter_ref} is not a PEFT adapter folder (no {ADAPTER_CONFIG})")
        return _adapted(base, adapter, ref)
    folder, hub_id = _find_folder(ref)
    if not is_adapter_folder(folder):
        return ModelRef(folder, hub_id)
    base_ref = adapter_base(folder)
    if base_ref is None:
        raise ModelLoadError(f"adapter {ref}: its {ADAPTER_CONFIG} names no base model (base_model_name_or_path); "
                             "name it as BASE+ADAPTER")
    try:
        base = _find_folder(base_ref)
    except ModelLoadError as e:
        raise ModelLoadError(f"adapter {ref}: its base model: {e}") from None
    return _adapted(base, (folder, hub_id), ref)


def _adapted(base: tuple, adapter: tuple, ref: str) -> ModelRef:
    read_adapter_config(adapter[0])  # refused here (DoRA, another PEFT type) before any work
    if is_adapter_folder(base[0]):
        raise ModelLoadError(f"model {ref}: the base model {base[0]} is itself an adapter (one adapter at a time)")
    return ModelRef(base[0], base[1], adapter[0], adapter[1])


def _find_folder(ref: str) -> tuple[str, str | None]:
    """A name -> (its local folder, its Hub id when it came from the Hub cache, else None)."""
    path = os.path.expanduser(str(ref))
    if os.path.exists(path):  # a folder (or something else there, which check_model_dir names)
        return path, None
    repo, _, revision = str(ref).partition("@")
    if not HUB_ID.fullmatch(repo) or (not revision and "@" in str(ref)):
        raise ModelLoadError(f"model folder not found: {ref}")
    try:
        from huggingface_hub import snapshot_download

        cache = hub_cache_dir()
        folder = snapshot_download(repo, revision=revision or None, cache_dir=cache, local_files_only=True)
    except ImportError:
        raise ModelLoadError(f"model folder not found: {ref} (and huggingface_hub, to look it up as a Hub id, "
                             "is not installed)") from None
    except Exception:  # noqa: BLE001 - not in the cache (LocalEntryNotFoundError) or the cache unreadable
        raise ModelLoadError(f"model {ref} is not a folder and not in the Hugging Face cache ({cache}); get it with: "
                             f"hf download {repo}" + (f" --revision {revision}" if revision else "")) from None
    return folder, str(ref)


def check_model_dir(model_dir: str) -> list[str]:
    """The folder is there, readable, with a valid config.json -> its weight files, as transformers picks them
    (never our own Gram files or checkpoints kept there)."""
    if not os.path.exists(model_dir):
        raise ModelLoadError(f"model folder not found: {model_dir}")
    if not os.path.isdir(model_dir):
        raise ModelLoadError(f"model path is not a folder: {model_dir}")
    if not os.access(model_dir, os.R_OK | os.X_OK):
        raise ModelLoadError(f"model folder is not readable: {model_dir}")
    cfg = os.path.join(model_dir, "config.json")
    if not os.path.isfile(cfg):
        raise ModelLoadError(f"no config.json in model folder {model_dir}")
    try:
        with open(cfg) as f:
            json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"unreadable config.json in {model_dir}: {e}") from None
    try:
        files = weight_files(model_dir)
        for f in files:  # a pickle is refused here, before transformers loads it
            if is_bin(f):
                load_weights_only(f)
        return files
    except (ModelFolderError, TorchBinError) as e:
        raise ModelLoadError(str(e)) from None


def model_limit(config) -> int | None:
    """The most positions the model takes, when its config says."""
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def load_config(model_dir: str, trust: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=trust)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "trust_remote_code" in str(e):
            msg = "the model needs custom code; pass --trust-remote-code if you trust it"
        raise ModelLoadError(f"cannot load the model config from {model_dir}: {msg}") from None


def load_tokenizer(model_dir: str, trust: bool):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=trust)
    except Exception as e:
        raise ModelLoadError(f"cannot load the tokenizer from {model_dir}: {_first_line(e)}") from None


def model_class(config, trust: bool):
    """The class the config's architectures name (the head: causal LM, classifier), else AutoModel."""
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass


def meta_model(config, trust: bool, dtype=None):
    """The model skeleton on the meta device: names and shapes, no memory, no weights read. dtype: what
    buffers built from Python numbers get (Gemma-3's embed_scale), as from_pretrained(dtype=...) gives them;
    by default the config's."""
    import torch

    cls = model_class(config, trust)
    kw = {} if dtype is None else {"dtype": dtype}
    try:
        with torch.device("meta"):
            if hasattr(cls, "_from_config"):
                return cls._from_config(config, trust_remote_code=trust, **kw) if cls.__name__.startswith("Auto") \
                    else cls._from_config(config, **kw)
            return cls.from_config(config, trust_remote_code=trust, **kw)
    except Exception as e:
        raise ModelLoadError(f"cannot build the model from its config: {_first_line(e)}") from None


def load_model(model_dir: str, config, dtype, device, trust: bool):
    quiet_transformers()
    cls = model_class(config, trust)
    try:
        model = cls.from_pretrained(model_dir, config=config, dtype=dtype, local_files_only=True,
                                    trust_remote_code=trust)
    except Exception as e:
        raise ModelLoadError(f"cannot load the model from {model_dir}: {_first_line(e)}") from None
    return model.to(device).eval()
