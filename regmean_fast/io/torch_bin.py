"""PyTorch `pytorch_model.bin` checkpoints, read as safely as they can be: torch.load(weights_only=True)
(tensors and plain containers only: a pickle that would run code or build other objects is refused),
memory-mapped where the file allows (zip format), one file open at a time.

TorchBinReader has SafetensorsReader's read interface (keys, info, get, close)."""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import torch


class TorchBinError(ValueError):
    """A .bin checkpoint that cannot be read safely (one line for the user)."""


@dataclass
class BinTensorInfo:
    dtype: torch.dtype
    shape: tuple


def load_weights_only(path: str) -> dict:
    """The file's state dict (tensors memory-mapped when the file is a zip archive)."""
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # the legacy (non-zip) format cannot be mapped: read it whole
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).splitlines()[0] if str(e) else ""
        if "GLOBAL" in str(e) or "global" in first.lower():  # a callable or class it would import and run
            raise TorchBinError(f"{path}: refused: the pickle holds code or objects other than tensors (read with "
                                "torch.load(weights_only=True)); convert it to safetensors where you trust it") \
                from None
        raise TorchBinError(f"{path}: not a readable PyTorch checkpoint (its pickle does not load weights-only)") \
            from None
    except (RuntimeError, OSError, EOFError, ValueError, KeyError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TorchBinError(f"{path}: not a readable PyTorch checkpoint ({first})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise TorchBinError(f"{path}: not a state dict of named tensors")
    return sd


class TorchBinReader:
    """One .bin file: names, shapes and dtypes kept; the tensors loaded (mapped) while this is the file being
    read (release() drops them, so that a model folder keeps one file open at a time)."""

    def __init__(self, path: str):
        self.path = str(path)
        sd = load_weights_only(self.path)
        self.tensors = {k: BinTensorInfo(v.dtype, tuple(v.shape)) for k, v in sd.items()}
        self._sd = sd

    def keys(self):
        return list(self.tensors)

    def info(self, name: str) -> BinTensorInfo:
        return self.tensors[name]

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        if self._sd is None:
            self._sd = load_weights_only(self.path)
        t = self._sd[name]
        if out is None:
            return t.detach().clone(memory_format=torch.contiguous_format)
        if out.dtype != t.dtype or tuple(out.shape) != tuple(t.shape):
            raise ValueError(f"{self.path}: {name} is {t.dtype} {list(t.shape)}; cannot read it into a {out.dtype} "
                             f"{list(out.shape)} tensor")
        return out.copy_(t)

    def release(self) -> None:
        self._sd = None

    def close(self) -> None:
        self._sd = None


def is_bin(fname: str) -> bool:
    return os.path.basename(fname).endswith(".bin")
