"""Sharded output with a fixed layout, a manifest of verified shards, and resumption."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import torch

from .resume import kill_point
from .safetensors_file import StreamingShardWriter, element_size, file_sha256, numel

MANIFEST_NAME = "regmean-manifest.json"
MANIFEST_GLOB = "regmean-manifest*.json"  # under torchrun each rank keeps regmean-manifest.rankR.json


def rank_manifest_name(rank: int, world: int) -> str:
    return MANIFEST_NAME if world <= 1 else f"regmean-manifest.rank{rank}.json"
MANIFEST_FORMAT = "regmean_fast.merge-manifest"
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value) -> int:
    """'5GB' -> 5_000_000_000, '512MiB', '1.5G', 1000 -> bytes (Hugging Face's units: GB = 10^9)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        n = int(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"not a size: {value!r} (use e.g. 5GB, 500MB, 2GiB)")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return n


@dataclass
class ShardLayout:
    """Which output tensor goes to which file, in write order."""

    shards: list  # list of (filename, [(name, dtype, shape), ...])

    @classmethod
    def build(cls, entries, shard_size: int) -> "ShardLayout":
        groups, cur, cur_bytes = [], [], 0
        for name, dtype, shape in entries:
            nb = numel(shape) * element_size(dtype)
            if cur and cur_bytes + nb > shard_size:
                groups.append(cur)
                cur, cur_bytes = [], 0
            cur.append((name, dtype, tuple(int(s) for s in shape)))
            cur_bytes += nb
        if cur or not groups:
            groups.append(cur)
        n = len(groups)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        return cls(list(zip(names, groups)))

    def total_bytes(self) -> int:
        return sum(numel(s) * element_size(d) for _, ents in self.shards for _, d, s in ents)

    def weight_map(self) -> dict:
        return {name: fname for fname, ents in self.shards for name, _, _ in ents}

    def describe(self) -> list:
        return [[fname, [[n, str(d), list(s)] for n, d, s in ents]] for fname, ents in self.shards]


def _write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifests(folder: str) -> list[dict]:
    """Every readable manifest in `folder` (under torchrun one per rank of the run that wrote it)."""
    import glob

    mans = []
    for mpath in sorted(glob.glob(os.path.join(glob.escape(folder), MANIFEST_GLOB))):
        try:
            with open(mpath) as f:
                mans.append(json.load(f))
        except (OSError, json.JSONDecodeError):
            continue  # a torso from a kill: its shards are in another record or get rewritten
    return mans


def manifests_mismatch(mans: list[dict], plan_hash: str, folder: str) -> str | None:
    """None when every manifest is of this plan, else the one-line reason for the user."""
    if all(m.get("format") == MANIFEST_FORMAT and m.get("plan_hash") == plan_hash for m in mans):
        return None
    return ("the partial merge left in " + folder + " was made with a different configuration or different "
            "inputs; drop --resume to start again")


class ShardedOutput:
    """Writes the shards of `layout` into `folder` as tensors arrive in layout order.

    Every finished shard is fsynced and recorded (size, sha256) in a manifest; with resume=True the
    shards already recorded, and still matching their record, are kept and their tensors skipped.

    Several processes (torchrun): `owned` (shard file names) are the shards this rank writes; it keeps
    its own manifest (`manifest_name`) and, resuming, trusts the records of every manifest in the folder
    (whatever the earlier world size) for the shards it owns now, after checking size and sha256.
    """

    def __init__(self, folder: str, layout: ShardLayout, plan_hash: str, resume: bool = False, on_shard_done=None,
                 owned=None, manifest_name: str = MANIFEST_NAME):
        self.folder = folder
        self.owned = None if owned is None else set(owned)
        self.layout = layout
        self.plan_hash = plan_hash
        self.on_shard_done = on_shard_done
        self._shard_of = {}
        for j, (_, ents) in enumerate(layout.shards):
            for name, _, _ in ents:
                self._shard_of[name] = j
        self.records: dict[str, dict] = {}
        self._others: dict[str, dict] = {}
        self.reused: list[str] = []
        self._writer = None
        self._writer_j = -1
        self._manifest = os.path.join(folder, manifest_name)
        if resume:
            self._load_verified()
        self._save_manifest()

    def _load_verified(self) -> None:
        mans = read_manifests(self.folder)
        why = manifests_mismatch(mans, self.plan_hash, self.folder)
        if why:
            raise ValueError(why)
        for man in mans:
            self._load_records(man)

    def _load_records(self, man) -> None:
        valid = {fname for fname, _ in self.layout.shards}
        for fname, rec in man.get("shards", {}).items():
            path = os.path.join(self.folder, fname)
            if fname not in valid or fname in self.records or not os.path.isfile(path):
                continue
            if self.owned is not None and fname not in self.owned:
                self._others.setdefault(fname, rec)  # another rank's: kept in our manifest, checked by its owner
                continue
            if os.path.getsize(path) == rec.get("size") and file_sha256(path) == rec.get("sha256"):
                self.records[fname] = {"size": rec["size"], "sha256": rec["sha256"]}
                self.reused.append(fname)

    def _save_manifest(self) -> None:
        _write_json_atomic(self._manifest, {"format": MANIFEST_FORMAT, "plan_hash": self.plan_hash,
                                            "shards": {**self._others, **self.records}})

    def owns(self, name: str) -> bool:
        """This process writes `name` (always true in one process)."""
        return self.owned is None or self.layout.shards[self._shard_of[name]][0] in self.owned

    def is_done(self, name: str) -> bool:
        return self.layout.shards[self._shard_of[name]][0] in self.records

    def write(self, name: str, tensor: torch.Tensor) -> None:
        j = self._shard_of[name]
        fname, ents = self.layout.shards[j]
        if fname in self.records:
            return
        if self._writer is None or self._writer_j != j:
            if self._writer is not None:
                raise RuntimeError(f"tensor {name} arrived before shard {self.layout.shards[self._writer_j][0]} was full")
            self._writer = StreamingShardWriter(os.path.join(self.folder, fname), ents, metadata={"format": "pt"})
            self._writer_j = j
        self._writer.write(name, tensor)
        kill_point("shard.tensor")  # tests: a shard half on disk, not in the manifest
        if self._writer.done:
            digest = self._writer.finish()
            self.records[fname] = {"size": self._writer.total_size, "sha256": digest}
            self._writer = None
            self._save_manifest()
            kill_point("shard.recorded")
            if self.on_shard_done is not None:
                self.on_shard_done(fname)

    def complete(self) -> bool:
        return all(fname in self.records for fname, _ in self.layout.shards
                   if self.owned is None or fname in self.owned)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
