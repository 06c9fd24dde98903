"""Hugging Face model folders: lazy reading of (sharded) safetensors checkpoints, folder conventions."""

from __future__ import annotations

import json
import os
import shutil

import torch

from .safetensors_file import SafetensorsError, SafetensorsReader, TensorInfo
from .torch_bin import TorchBinError, TorchBinReader, is_bin

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"  # checkpoints without safetensors: read weights-only
BIN_SINGLE_NAME = "pytorch_model.bin"
# Files copied from the donor model (the base model, or the first one) next to the merged weights.
AUX_FILES = (
    "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "added_tokens.json",
    "merges.txt", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
    "chat_template.json", "generation_config.json", "preprocessor_config.json",
)


class ModelFolderError(ValueError):
    """A model folder that cannot be read (missing files, bad index, corrupt shard)."""


class ModelFolder:
    """A Hugging Face model folder read lazily: tensor names, shapes and dtypes from the headers,
    tensors read from the shards on request (pread, nothing mapped). One open handle per shard.
    A folder with only pytorch_model.bin (or its shards) is read with torch.load(weights_only=True), one
    file loaded at a time."""

    def __init__(self, path: str):
        self.path = os.path.abspath(str(path))
        if not os.path.isdir(self.path):
            raise ModelFolderError(f"model folder {path} does not exist")
        self.config = None
        cfg = os.path.join(self.path, "config.json")
        if os.path.exists(cfg):
            try:
                with open(cfg) as f:
                    self.config = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise ModelFolderError(f"{cfg}: unreadable config.json ({e})") from None
        self._readers: dict[str, SafetensorsReader | TorchBinReader] = {}
        self._where: dict[str, str] = {}
        self._bin_loaded: TorchBinReader | None = None
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _reader(self, fname: str) -> SafetensorsReader:
        r = self._readers.get(fname)
        if r is None:
            full = os.path.join(self.path, fname)
            if not os.path.exists(full):
                raise ModelFolderError(f"{self.path}: shard {fname} is missing")
            try:
                r = TorchBinReader(full) if is_bin(fname) else SafetensorsReader(full)
            except (SafetensorsError, TorchBinError) as e:
                raise ModelFolderError(str(e)) from None
            if is_bin(fname):  # its names and shapes are known: let the file go until it is read
                r.release()
            self._readers[fname] = r
        return r

    def _open(self) -> None:
        weight_map = weight_index(self.path)
        if weight_map is None and not _has_safetensors(self.path):
            weight_map = weight_index(self.path, BIN_INDEX_NAME)
        if weight_map is not None:
            for name, fname in weight_map.items():
                r = self._reader(fname)
                if name not in r.tensors:
                    raise ModelFolderError(f"{os.path.join(self.path, INDEX_NAME)}: {name} is not in shard {fname}")
                self._where[name] = fname
            return
        for full in weight_files(self.path):
            fname = os.path.basename(full)
            for name in self._reader(fname).keys():
                if name in self._where:
                    raise ModelFolderError(f"{self.path}: tensor {name} appears in two files")
                self._where[name] = fname

    # -- the tensor-source protocol ---------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._where)

    def info(self, name: str) -> TensorInfo:
        return self._readers[self._where[name]].info(name)

    def shape(self, name: str) -> tuple:
        return self.info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self.info(name).dtype

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """A copy of tensor `name`, fresh or in `out` (see SafetensorsReader.get)."""
        r = self._readers[self._where[name]]
        if isinstance(r, TorchBinReader) and r is not self._bin_loaded:
            if self._bin_loaded is not None:
                self._bin_loaded.release()  # one .bin file loaded at a time
            self._bin_loaded = r
        try:
            return r.get(name, out)
        except TorchBinError as e:
            raise ModelFolderError(str(e)) from None

    def files(self) -> list[str]:
        return [os.path.join(self.path, f) for f in sorted(self._readers)]

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def weight_index(path: str, index_name: str = INDEX_NAME) -> dict[str, str] | None:
    """The weight_map (tensor name -> shard file name) of the folder's model.safetensors.index.json (or another
    index), checked; None when there is no index."""
    index = os.path.join(path, index_name)
    if not os.path.exists(index):
        return None
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise ModelFolderError(f"{index}: corrupt index (no usable weight_map)") from None
    for name, fname in weight_map.items():
        if not isinstance(fname, str) or os.path.basename(fname) != fname:
            raise ModelFolderError(f"{index}: bad shard name {fname!r} for {name}")
    return weight_map


def weight_files(path: str) -> list[str]:
    """The safetensors files holding a model folder's weights, as transformers picks them: the index's shards,
    else model.safetensors, else every *.safetensors (one saved under another name). Gram files or
    checkpoints kept beside model.safetensors are not weights. Raises ModelFolderError (bad index, missing
    shard, no safetensors at all)."""
    weight_map = weight_index(path)
    if weight_map is not None:
        names = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(path, SINGLE_NAME)):
        names = [SINGLE_NAME]
    else:
        names = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not names:  # as transformers: the PyTorch checkpoint (read weights-only here)
        bin_map = weight_index(path, BIN_INDEX_NAME)
        if bin_map is not None:
            names = sorted(set(bin_map.values()))
        elif os.path.isfile(os.path.join(path, BIN_SINGLE_NAME)):
            names = [BIN_SINGLE_NAME]
    if not names:
        raise ModelFolderError(f"{path}: no safetensors or pytorch_model.bin weights found")
    for fname in names:
        if not os.path.isfile(os.path.join(path, fname)):
            raise ModelFolderError(f"{path}: shard {fname} is missing")
    return [os.path.join(path, f) for f in names]


def _has_safetensors(path: str) -> bool:
    return os.path.isfile(os.path.join(path, SINGLE_NAME)) or any(f.endswith(".safetensors") for f in os.listdir(path))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def write_config(config: dict | None, out_dir: str, out_dtype: torch.dtype | None) -> None:
    """config.json of the donor with the output dtype set (transformers 5 `dtype`, older `torch_dtype`)."""
    if config is None:
        return
    cfg = dict(config)
    if out_dtype is not None:
        if "dtype" in cfg or "torch_dtype" not in cfg:
            cfg["dtype"] = dtype_name(out_dtype)
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = dtype_name(out_dtype)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def copy_aux_files(src_dir: str, out_dir: str) -> list[str]:
    """Copy tokenizer and generation files from the donor folder; returns the names copied."""
    copied = []
    for name in AUX_FILES:
        src = os.path.join(src_dir, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(out_dir, name))
            copied.append(name)
    return copied


def copy_model_code(config: dict | None, src_dir: str, out_dir: str) -> list[str]:
    """A model with custom code (config.json's auto_map, loaded with trust_remote_code) needs the donor's
    *.py files beside its weights, or the output does not load; returns the names copied."""
    if not (config or {}).get("auto_map"):
        return []
    copied = []
    for name in sorted(os.listdir(src_dir)):
        src = os.path.join(src_dir, name)
        if name.endswith(".py") and os.path.isfile(src):
            shutil.copyfile(src, os.path.join(out_dir, name))
            copied.append(name)
    return copied


def write_index(out_dir: str, weight_map: dict, total_size: int, extra_metadata: dict | None = None) -> None:
    meta = {"total_size": int(total_size)}
    if extra_metadata:
        meta.update(extra_metadata)
    with open(os.path.join(out_dir, INDEX_NAME), "w") as f:
        json.dump({"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
        f.write("\n")
