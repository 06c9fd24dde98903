"""The Gram file, version 1: write, read, validate (see docs/gram-format.md).

This module knows nothing about models or hooks: it stores raw fp32 Gram sums, their token counts,
the module -> Gram mapping, a model fingerprint and provenance metadata in safetensors files.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from typing import Iterable, Mapping

import torch
from safetensors import safe_open

from .. import ops
from ..io.output import OutputTransaction
from ..io.resume import kill_point
from ..io.safetensors_file import SafetensorsError, SafetensorsReader

FORMAT_NAME = "regmean_fast.grams"
FORMAT_VERSION = "1"
LAYOUTS = ("full", "packed")
DEFAULT_FILE = "grams.safetensors"
INDEX_SUFFIX = ".index.json"
GRAM_PREFIX = "gram."
FISHER_PREFIX = "fisher."
SYMMETRY_RTOL = 1e-5


class GramsError(ValueError):
    """A user-facing problem with the grams command's inputs or outputs (the CLI exits with status 2)."""


class GramFileError(GramsError):
    """A Gram file is missing, malformed, of another version, or holds an invalid Gram."""


def check_gram_values(G: torch.Tensor, what: str) -> None:
    """A Gram read from anywhere must be finite, symmetric (to SYMMETRY_RTOL of its largest entry)
    and have a non-negative diagonal; one pass over G (regmean_fast.ops.symmetry_stats)."""
    check_gram_stats(ops.symmetry_stats(G), G.size(0), what)


def check_gram_stats(stats, d: int, what: str) -> None:
    """check_gram_values on the symmetry_stats of a [d, d] Gram, computed by whichever pass read it
    (the merge gets them from the same pass that uses the Gram: ops.gram_term)."""
    finite, max_abs, max_asym, min_diag = stats
    if not finite:
        raise GramFileError(f"{what} has non-finite values")
    if max_asym > SYMMETRY_RTOL * max(max_abs, 1e-30):
        raise GramFileError(f"{what} is not symmetric")
    if d and min_diag < 0:
        raise GramFileError(f"{what} has a negative diagonal entry (not a Gram)")


# --------------------------------------------------------------------------------------------------
# packing


def packed_dim(n: int) -> int:
    """d such that d (d + 1) / 2 == n, or -1."""
    try:
        return ops.packed_order(n)
    except ValueError:
        return -1


# --------------------------------------------------------------------------------------------------
# writing


_ST_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


class Deferred:
    """A tensor made when its turn to be written comes (make() -> a CPU tensor of this shape and dtype), so a
    file of many Grams holds one derived copy in memory at a time, not one per Gram."""

    def __init__(self, shape, dtype: torch.dtype, make):
        self.shape, self.dtype, self.make = tuple(shape), dtype, make

    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


class OnDisk:
    """A Gram that left memory for a file of the run's work folder (grams --sequential: a finished block's
    Grams, see spill_grams), read back whole when it is needed (load). finite: its upper triangle was checked
    when written, so saving need not read it twice."""

    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self, path: str, name: str, shape, finite: bool):
        self.path, self.name, self.shape, self.finite = path, name, tuple(shape), finite

    def dim(self) -> int:
        return len(self.shape)

    def size(self, i: int) -> int:
        return self.shape[i]

    def load(self) -> torch.Tensor:
        try:
            with SafetensorsReader(self.path) as f:
                return f.get(self.name)
        except (SafetensorsError, KeyError) as e:
            raise GramsError(f"the work file {self.path} holding Gram {self.name!r} is unreadable or was "
                             f"changed ({e}); delete it and its checkpoint, then rerun") from None

    def check(self, signature: str) -> str | None:
        """None when the file is there, made by the run with this signature, with this Gram in this shape;
        else why not."""
        try:
            with SafetensorsReader(self.path) as f:
                info = f.tensors.get(self.name)
                made_by = f.metadata.get("signature")
        except SafetensorsError as e:
            return str(e)
        if made_by != signature:
            return f"{self.path} was written by another run"
        if info is None or info.shape != self.shape or info.dtype != self.dtype:
            return f"{self.path} does not hold Gram {self.name!r} as {list(self.shape)} float32"
        return None


def spill_grams(path: str, grams: Mapping[str, torch.Tensor], signature: str) -> dict[str, OnDisk]:
    """Write grams (key -> fp32 [d, d], upper triangle valid) to the work file `path` (atomically, fsync'ed;
    signature: the run's, checked when a resumed run reads it back) -> key -> its OnDisk stand-in."""
    tensors = {k: G.detach().to("cpu").contiguous() for k, G in grams.items()}
    finite = {k: _upper_finite(G) for k, G in tensors.items()}
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write_safetensors(tmp, tensors, {"signature": signature})
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):  # a full disk: the user's to fix, in one line
            raise GramsError(f"cannot write the work file {path} ({e.strerror or e}); finished blocks' Grams wait "
                             "there until the Gram file is written: as much space as the Gram file") from None
        raise
    return {k: OnDisk(path, k, G.shape, finite[k]) for k, G in tensors.items()}


def write_safetensors(fname: str, tensors: Mapping, metadata: Mapping[str, str]) -> None:
    """A safetensors file with a deterministic header (keys in the given order, metadata sorted), so the
    same Grams always give the same bytes; fsync'ed. A value may be a Deferred, made as it is written."""
    header: dict = {"__metadata__": {k: str(metadata[k]) for k in sorted(metadata)}}
    off = 0
    items = []
    for name, t in tensors.items():
        if not isinstance(t, Deferred):
            t = t.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.dtype.itemsize
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + nbytes]}
        items.append(t)
        off += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    with open(fname, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in items:
            if isinstance(t, Deferred):
                made = t.make()
                if tuple(made.shape) != t.shape or made.dtype != t.dtype:
                    raise RuntimeError(f"deferred tensor made {tuple(made.shape)} {made.dtype}, announced "
                                       f"{t.shape} {t.dtype}")
                t = made.contiguous()
            if t.numel():
                f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
            del t
        f.flush()
        os.fsync(f.fileno())


def _parse_module_map(module_map: Mapping, conv1d: Iterable[str] | None) -> dict:
    conv = set(conv1d or ())
    out = {}
    for mod, v in module_map.items():
        if isinstance(v, Mapping):
            out[mod] = {"key": str(v["key"]), "conv1d": bool(v.get("conv1d", False)) or mod in conv}
        else:
            out[mod] = {"key": str(v), "conv1d": mod in conv}
    return out


def check_writable_folder(folder: str) -> None:
    """GramFileError unless a file can be created in `folder`, tried for real (permission bits do not tell
    for root, read-only mounts or ACLs)."""
    if not os.path.isdir(folder):
        raise GramFileError(f"output folder does not exist: {folder}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".regmean_fast-probe-", dir=folder)
    except OSError as e:
        raise GramFileError(f"output folder is not writable: {folder} ({e.strerror or e})") from None
    os.close(fd)
    os.remove(probe)


def _refuse_existing(final: str, overwrite: bool) -> None:
    if os.path.lexists(final) and not overwrite:
        raise GramFileError(f"output already exists: {final}")


def _write_error(e: BaseException, path: str) -> GramFileError | None:
    """The output transaction's user errors: a full disk, a vanished folder -> one line, nothing left behind."""
    return GramFileError(f"cannot write the Gram file {path}: {e.strerror or e}") if isinstance(e, OSError) else None


def _shard_plan(names: list[str], sizes: dict[str, int], shard_size: int | None) -> list[list[str]]:
    if not shard_size:
        return [names]
    shards, cur, cur_bytes = [], [], 0
    for n in names:
        if cur and cur_bytes + sizes[n] > shard_size:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(n)
        cur_bytes += sizes[n]
    if cur:
        shards.append(cur)
    return shards


def save_grams(
    path,
    grams: Mapping[str, torch.Tensor],
    counts: Mapping[str, int],
    module_map: Mapping,
    fingerprint: Mapping,
    metadata: Mapping,
    packed: bool = False,
    shard_size: int | None = None,
    fisher: Mapping[str, torch.Tensor] | None = None,
    *,
    conv1d: Iterable[str] | None = None,
    overwrite: bool = False,
    symmetrize: bool = True,
) -> str:
    """Write a Gram file (version 1) atomically; returns the path to pass to load_grams.

    path: "X.safetensors" writes that file (or, sharded, "X-0000i-of-0000n.safetensors" beside it and
    the index "X.safetensors.index.json"); any other path is a folder, created whole and renamed into
    place, holding grams.safetensors (or its shards and grams.safetensors.index.json).
    grams: key -> fp32 [d, d]; only the upper triangle is read (symmetrize=True copies it down).
    counts: key -> tokens summed (> 0). module_map: module -> key, or module -> {"key", "conv1d"}.
    conv1d: module names whose weight is stored [in, out] (transformers Conv1D).
    """
    path = os.fspath(path)
    mods = _parse_module_map(module_map, conv1d)
    used = {m["key"] for m in mods.values()}
    missing = sorted(used - set(grams))
    if missing:
        raise GramFileError(f"module map refers to Grams that are not given: {missing[:5]}")
    tensors, dims, cnts = _gram_tensors(mods, grams, counts, packed, symmetrize)
    _check_input_sizes(mods, fingerprint, dims)
    for pname, F in sorted((fisher or {}).items()):  # by name: the same Fisher gives the same bytes
        tensors[FISHER_PREFIX + pname] = F.detach().to("cpu", torch.float32).contiguous()

    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "layout": "packed" if packed else "full",
        "modules": json.dumps(mods, sort_keys=False),
        "counts": json.dumps(cnts),
        "dims": json.dumps(dims),
        "fingerprint": json.dumps(dict(fingerprint)),
        "provenance": json.dumps(dict(metadata), default=str),
    }
    sizes = {n: tensors[n].numel() * 4 for n in tensors}
    plan = _shard_plan(list(tensors), sizes, shard_size)
    return _write_and_place(path, tensors, header, sizes, plan, overwrite)


def _gram_tensors(mods: dict, grams, counts, packed: bool, symmetrize: bool):
    """Each distinct Gram checked and stored in model order (deterministic files) -> (tensors, dims, counts).
    Every Gram is checked here, before anything is written; the stored form (symmetric copy, or packed
    triangle) is Deferred: one Gram's copy at a time while writing (an 8B model's Grams are ~30 GB)."""
    tensors: dict = {}
    dims: dict[str, int] = {}
    cnts: dict[str, int] = {}
    for key in dict.fromkeys(m["key"] for m in mods.values()):
        G = grams[key]
        if G.dim() != 2 or G.size(0) != G.size(1):
            raise GramFileError(f"Gram {key!r} is not square: shape {tuple(G.shape)}")
        d = G.size(0)
        if isinstance(G, OnDisk):  # checked when it was written; read once, when its turn comes
            stored_part_finite = G.finite if symmetrize or packed else ops.all_finite(G.load())
        else:
            stored_part_finite = ops.all_finite(G.detach()) if not (symmetrize or packed) else _upper_finite(G)
        if not stored_part_finite:
            raise GramFileError(f"Gram {key!r} has non-finite values")
        c = int(counts[key])
        if c <= 0:
            raise GramFileError(f"Gram {key!r} has count {c}; counts must be > 0")
        dims[key] = d
        cnts[key] = c
        shape = (d * (d + 1) // 2,) if packed else (d, d)
        tensors[GRAM_PREFIX + key] = Deferred(shape, torch.float32,
                                              lambda G=G: _stored_gram(G, packed, symmetrize))
    return tensors, dims, cnts


def _upper_finite(G: torch.Tensor, rows: int = 256) -> bool:
    """No inf or NaN in the upper triangle of G (what is stored), a band of rows at a time (no d x d copy)."""
    G = G.detach()
    for r in range(0, G.size(0), rows):
        if not bool(torch.isfinite(torch.triu(G[r:r + rows, r:])).all()):
            return False
    return True


def _stored_gram(G: torch.Tensor, packed: bool, symmetrize: bool) -> torch.Tensor:
    """G as the file stores it: its packed upper triangle, or full (the upper triangle mirrored down)."""
    if isinstance(G, OnDisk):
        G = G.load()  # a fresh copy: mirrored in place
        return ops.pack_triu(G) if packed else ops.symmetrize_(G) if symmetrize else G
    G = G.detach().to("cpu", torch.float32)
    if packed:
        return ops.pack_triu(G.contiguous())
    if not symmetrize:
        return G.contiguous()
    return ops.symmetrize_(G.clone(memory_format=torch.contiguous_format))  # one d x d copy, mirrored in place


def _check_input_sizes(mods: dict, fingerprint: Mapping, dims: dict) -> None:
    for mod, v in mods.items():
        shape = (fingerprint.get("weights") or {}).get(mod)
        if shape is not None and len(shape) == 2:
            d_in = shape[0] if v["conv1d"] else shape[1]
            if d_in != dims[v["key"]]:
                raise GramFileError(
                    f"module {mod!r} has input size {d_in} but its Gram {v['key']!r} is {dims[v['key']]}"
                )


def _write_and_place(path: str, tensors: dict, header: dict, sizes: dict, plan: list, overwrite: bool) -> str:
    """The files into a temporary folder beside the output, then into place (io.output's transaction)."""
    is_file = path.endswith(".safetensors")
    if is_file:
        final_dir = os.path.dirname(os.path.abspath(path))
        stem = os.path.basename(path)[: -len(".safetensors")]
        check_writable_folder(final_dir)
        existing = [p for p in (path, path + INDEX_SUFFIX) if os.path.lexists(p)]  # either form of X
        if existing and not overwrite:
            raise GramFileError(f"output already exists: {existing[0]}")
        work_dir = tempfile.mkdtemp(prefix=f".{stem}.tmp-", dir=final_dir)
    else:
        parent = os.path.dirname(os.path.abspath(path)) or "."
        stem = DEFAULT_FILE[: -len(".safetensors")]
        check_writable_folder(parent)
        if os.path.lexists(path) and not overwrite:
            raise GramFileError(f"output already exists: {path}")
        work_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    final = os.path.join(final_dir, os.path.basename(path)) if is_file else path
    with OutputTransaction(final, work_dir, created=True, resumable=False, user_error=lambda e: _write_error(e, path),
                           old_suffix=".old-", kill_prefix="grams-file") as tx:
        files = _write_files(work_dir, stem, tensors, header, sizes, plan)
        kill_point("grams-file.written")  # tests (io.resume): all in the temporary folder, nothing in place
        if is_file:
            return _place_files(tx, path, final_dir, stem, files, overwrite)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(work_dir, 0o777 & ~umask)  # mkdtemp made it private; the folder gets the modes mkdir gives
        _refuse_existing(path, overwrite)
        tx.publish()
        return path


def _write_files(work_dir: str, stem: str, tensors: dict, header: dict, sizes: dict, plan: list) -> list[str]:
    """The shards (one file, or several and their index) into work_dir -> the shard file names."""
    n = len(plan)
    files = []
    weight_map = {}
    for i, shard in enumerate(plan):
        fname = f"{stem}.safetensors" if n == 1 else f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors"
        write_safetensors(os.path.join(work_dir, fname), {k: tensors[k] for k in shard}, header)
        files.append(fname)
        for k in shard:
            weight_map[k] = fname
    if n > 1:
        index = {"metadata": dict(header, total_size=str(sum(sizes.values()))), "weight_map": weight_map}
        with open(os.path.join(work_dir, stem + ".safetensors" + INDEX_SUFFIX), "w") as f:
            json.dump(index, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
    return files


def _place_files(tx: OutputTransaction, path: str, final_dir: str, stem: str, files: list, overwrite: bool) -> str:
    """X.safetensors: the shards beside it first, the file that names the output (X or its index) last."""
    n = len(files)
    for fname in files if n > 1 else []:
        tx.place(fname)
        kill_point("grams-file.shard-placed")
    last = stem + ".safetensors" + (INDEX_SUFFIX if n > 1 else "")
    _refuse_existing(os.path.join(final_dir, last), overwrite)
    tx.place(last)
    tx.discard()
    if overwrite:
        _remove_replaced_files(final_dir, stem, keep=set(files) | {last})
    return os.path.join(final_dir, last) if n > 1 else path


def _remove_replaced_files(folder: str, stem: str, keep: set[str]) -> None:
    """After X.safetensors was overwritten: what is left of the earlier output in its other form (the
    single file, or the index and its shards), which load_grams would otherwise find instead of the new one."""
    ours = re.compile(re.escape(stem) + r"(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")
    for f in os.listdir(folder):
        if ours.fullmatch(f) and f not in keep:
            os.remove(os.path.join(folder, f))


# --------------------------------------------------------------------------------------------------
# reading


def _read_header(fname: str) -> tuple[dict, dict[str, list[int]]]:
    """(metadata, {tensor name: shape}) of one safetensors file, reading no tensor data."""
    try:
        with safe_open(fname, framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except FileNotFoundError:
        raise GramFileError(f"Gram file not found: {fname}") from None
    except PermissionError:
        raise GramFileError(f"Gram file is not readable: {fname}") from None
    except Exception as e:  # safetensors raises its own errors for truncated or garbled files
        raise GramFileError(f"not a valid safetensors Gram file ({fname}): {e}") from None
    try:
        size = os.path.getsize(fname)
        with open(fname, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            hdr = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in hdr.items() if k != "__metadata__"), default=0)
        if 8 + n + end != size:
            raise GramFileError(f"Gram file is truncated or has trailing bytes: {fname}")
    except GramFileError:
        raise
    except Exception as e:
        raise GramFileError(f"not a valid safetensors Gram file ({fname}): {e}") from None
    return meta, shapes


def _resolve(path: str) -> tuple[str | None, str | None]:
    """-> (single file, index file): exactly one is set."""
    if os.path.isdir(path):
        idx = os.path.join(path, DEFAULT_FILE + INDEX_SUFFIX)
        one = os.path.join(path, DEFAULT_FILE)
        if os.path.isfile(idx):
            return None, idx
        if os.path.isfile(one):
            return one, None
        idxs = [f for f in os.listdir(path) if f.endswith(".safetensors" + INDEX_SUFFIX)]
        files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
        if len(idxs) == 1:
            return None, os.path.join(path, idxs[0])
        if len(files) == 1:
            return os.path.join(path, files[0]), None
        raise GramFileError(f"no Gram file found in folder {path}")
    if path.endswith(INDEX_SUFFIX):
        if not os.path.isfile(path):
            raise GramFileError(f"Gram index not found: {path}")
        return None, path
    if os.path.isfile(path):
        return path, None
    if os.path.isfile(path + INDEX_SUFFIX):
        return None, path + INDEX_SUFFIX
    raise GramFileError(f"Gram file not found: {path}")


def _loads(meta: dict, field: str, where: str):
    if field not in meta:
        raise GramFileError(f"{where}: header lacks {field!r}")
    try:
        return json.loads(meta[field])
    except (TypeError, json.JSONDecodeError) as e:
        raise GramFileError(f"{where}: header field {field!r} is not valid JSON: {e}") from None


class GramSet:
    """Read access to a Gram file (or to Grams held in memory); Grams are read lazily and validated.

    See docs/gram-format.md for the meaning of every method.
    """

    def __init__(self, *, modules, counts, dims, fingerprint, metadata, layout, tensor_source, fisher_names, where):
        self._modules = modules  # module -> {"key", "conv1d"}
        self._counts = counts
        self._dims = dims
        self.fingerprint = fingerprint
        self.metadata = metadata
        self.layout = layout
        self._source = tensor_source  # name -> loader()
        self._fisher_names = fisher_names
        self.path = where
        self._keys_of_module = {}  # set by _validate_structure, once the entries are known to be well formed

    # ---- construction
    @classmethod
    def from_memory(cls, grams, counts, module_map, fingerprint=None, metadata=None, fisher=None, conv1d=None):
        """A GramSet over tensors held in memory (e.g. straight from collect_grams)."""
        mods = _parse_module_map(module_map, conv1d)
        tensors = {}
        for key in {m["key"] for m in mods.values()}:
            G = grams[key]
            tensors[GRAM_PREFIX + key] = (lambda G=G: torch.triu(G) + torch.triu(G, diagonal=1).T)
        for p, F in (fisher or {}).items():
            tensors[FISHER_PREFIX + p] = (lambda F=F: F)
        gs = cls(
            modules=mods,
            counts={k: int(counts[k]) for k in {m["key"] for m in mods.values()}},
            dims={m["key"]: int(grams[m["key"]].size(0)) for m in mods.values()},
            fingerprint=dict(fingerprint or {}),
            metadata=dict(metadata or {}),
            layout="full",
            tensor_source=tensors,
            fisher_names=sorted(fisher or {}),
            where="<memory>",
        )
        gs._validate_structure()
        return gs

    # ---- API
    def modules(self) -> list[str]:
        return list(self._modules)

    def gram_key(self, module: str) -> str:
        try:
            return self._keys_of_module[module]
        except KeyError:
            raise KeyError(f"no Gram for module {module!r} in {self.path}") from None

    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for m, v in self._modules.items():
            out.setdefault(v["key"], []).append(m)
        return out

    def keys(self) -> list[str]:
        return list(self.groups())

    def _key(self, name: str) -> str:
        if name in self._keys_of_module:
            return self._keys_of_module[name]
        if name in self._counts:
            return name
        raise KeyError(f"no Gram named {name!r} in {self.path}")

    def count(self, name: str) -> int:
        return self._counts[self._key(name)]

    def dim(self, name: str) -> int:
        return self._dims[self._key(name)]

    def is_conv1d(self, module: str) -> bool:
        if module not in self._modules:
            raise KeyError(f"no Gram for module {module!r} in {self.path}")
        return self._modules[module]["conv1d"]

    def gram(self, name: str) -> torch.Tensor:
        """Full symmetric fp32 [d, d] raw sum for a module or a key; validated on read."""
        t = self.raw_gram(name)
        self.check_gram(name, ops.symmetry_stats(t))
        return t

    def raw_gram(self, name: str) -> torch.Tensor:
        """gram(name) before the value checks (shape and dtype are checked): for a caller that computes
        symmetry_stats in a pass of its own and hands them to check_gram (never skipped)."""
        key = self._key(name)
        d = self._dims[key]
        t = self._source[GRAM_PREFIX + key]()
        if t.dtype != torch.float32:
            raise GramFileError(f"{self.path}: Gram {key!r} is {t.dtype}, expected float32")
        if self.layout == "packed":
            t = ops.unpack_triu(t.contiguous())
        elif tuple(t.shape) != (d, d):
            raise GramFileError(f"{self.path}: Gram {key!r} has shape {tuple(t.shape)}, expected {(d, d)}")
        return t

    def check_gram(self, name: str, stats) -> None:
        """Raises GramFileError, as gram() would, when stats (ops.symmetry_stats of raw_gram(name)) show
        an invalid Gram."""
        key = self._key(name)
        check_gram_stats(stats, self._dims[key], f"{self.path}: Gram {key!r}")

    @property
    def has_fisher(self) -> bool:
        return bool(self._fisher_names)

    def fisher_params(self) -> list[str]:
        return list(self._fisher_names)

    def fisher(self, param_name: str) -> torch.Tensor | None:
        name = FISHER_PREFIX + param_name
        if name not in self._source:
            return None
        t = self._source[name]()
        if t.dtype != torch.float32:
            raise GramFileError(f"{self.path}: Fisher {param_name!r} is {t.dtype}, expected float32")
        if not ops.all_finite(t):
            raise GramFileError(f"{self.path}: Fisher {param_name!r} has non-finite values")
        return t

    def verify(self) -> "GramSet":
        """Read and validate every Gram (and Fisher tensor); returns self."""
        for key in self.keys():
            self.gram(key)
        for p in self._fisher_names:
            self.fisher(p)
        return self

    def __repr__(self) -> str:
        return f"GramSet({self.path!r}, {len(self._modules)} modules, {len(self._counts)} Grams, {self.layout})"

    # ---- validation of the header
    def _validate_structure(self) -> None:
        """Every header field has the type the readers assume (a file edited by hand or damaged must
        give GramFileError, never a TypeError deep in the merge), and the fields agree with each other."""
        where = self.path
        for name, value in (("modules", self._modules), ("counts", self._counts), ("dims", self._dims),
                            ("fingerprint", self.fingerprint), ("provenance", self.metadata)):
            if not isinstance(value, dict):
                raise GramFileError(f"{where}: header field {name!r} is not a JSON object")
        for key, d in self._dims.items():
            if not _is_int(d) or d < 0:
                raise GramFileError(f"{where}: Gram {key!r} has dimension {d!r}; dimensions must be integers >= 0")
        for key, c in self._counts.items():
            if not _is_int(c) or c <= 0:
                raise GramFileError(f"{where}: Gram {key!r} has count {c!r}; counts must be integers > 0")
        for key in ("model_type",):
            if self.fingerprint.get(key) is not None and not isinstance(self.fingerprint[key], str):
                raise GramFileError(f"{where}: fingerprint {key!r} is not a string")
        archs = self.fingerprint.get("architectures")
        if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
            raise GramFileError(f"{where}: fingerprint 'architectures' is not a list of names")
        shapes = self.fingerprint.get("weights")
        if shapes is None:
            shapes = {}
        if not isinstance(shapes, dict):
            raise GramFileError(f"{where}: fingerprint 'weights' is not a JSON object")
        for m, shape in shapes.items():
            if not (isinstance(shape, list) and all(_is_int(s) and s >= 0 for s in shape)):
                raise GramFileError(f"{where}: fingerprint shape of {m!r} is {shape!r}, not a list of sizes")
        for m, v in self._modules.items():
            if not (isinstance(v, dict) and isinstance(v.get("key"), str) and isinstance(v.get("conv1d"), bool)):
                raise GramFileError(f"{where}: malformed module entry for {m!r}: {v!r} "
                                    '(expected {"key": name, "conv1d": true or false})')
            key = v["key"]
            if key not in self._counts:
                raise GramFileError(f"{where}: module {m!r} maps to Gram {key!r}, which has no count")
            if key not in self._dims:
                raise GramFileError(f"{where}: Gram {key!r} has no dimension")
            if GRAM_PREFIX + key not in self._source:
                raise GramFileError(f"{where}: Gram {key!r} (module {m!r}) has no tensor")
            shape = shapes.get(m)
            if shape is not None and len(shape) == 2:
                d_in = shape[0] if v["conv1d"] else shape[1]
                if d_in != self._dims[key]:
                    raise GramFileError(
                        f"{where}: module {m!r} has input size {d_in} but its Gram {key!r} is {self._dims[key]}"
                    )
        self._keys_of_module = {m: v["key"] for m, v in self._modules.items()}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_meta(meta: dict, where: str) -> None:
    if meta.get("format") != FORMAT_NAME:
        raise GramFileError(f"{where}: not a regmean_fast Gram file (format {meta.get('format')!r})")
    if meta.get("version") != FORMAT_VERSION:
        raise GramFileError(
            f"{where}: unsupported Gram file version {meta.get('version')!r} (this reader knows {FORMAT_VERSION})"
        )
    if meta.get("layout") not in LAYOUTS:
        raise GramFileError(f"{where}: unknown layout {meta.get('layout')!r}")


def load_grams(path, verify: bool = False) -> GramSet:
    """Open a Gram file (a .safetensors file, a *.index.json of shards, or a folder holding one).

    The header is validated now (format, version, layout, mapping, counts, shapes, file sizes); each
    Gram is read and checked (finite, symmetric, non-negative diagonal) when asked for, or all of them
    now with verify=True. Raises GramFileError.
    """
    path = os.fspath(path)
    single, index = _resolve(path)
    if single is not None:
        meta, shapes = _read_header(single)
        where = single
        _check_meta(meta, where)
        weight_map = {k: single for k in shapes}
    else:
        where = index
        meta, shapes, weight_map = _read_index(index)
    modules = _loads(meta, "modules", where)
    counts = _loads(meta, "counts", where)
    dims = _loads(meta, "dims", where)
    fingerprint = _loads(meta, "fingerprint", where)
    provenance = _loads(meta, "provenance", where)
    layout = meta["layout"]

    def loader(name, fname):
        def load():
            try:
                with safe_open(fname, framework="pt") as f:
                    return f.get_tensor(name)
            except Exception as e:
                raise GramFileError(f"{fname}: cannot read {name}: {e}") from None

        return load

    source = {n: loader(n, weight_map[n]) for n in shapes}
    gs = GramSet(
        modules=modules,
        counts=counts,
        dims=dims,
        fingerprint=fingerprint,
        metadata=provenance,
        layout=layout,
        tensor_source=source,
        fisher_names=sorted(n[len(FISHER_PREFIX) :] for n in shapes if n.startswith(FISHER_PREFIX)),
        where=path,
    )
    gs._validate_structure()
    _check_gram_shapes(dims, shapes, layout, where)
    if verify:
        gs.verify()
    return gs


def _read_index(index: str):
    """A sharded Gram file's index and its shards' headers -> (metadata, {tensor: shape}, {tensor: shard path})."""
    try:
        with open(index) as f:
            idx = json.load(f)
        meta = idx["metadata"]
        wm = idx["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GramFileError(f"{index}: unreadable Gram index: {e}") from None
    if not (isinstance(meta, dict) and isinstance(wm, dict) and all(isinstance(v, str) for v in wm.values())):
        raise GramFileError(f"{index}: malformed Gram index (expected metadata and a weight_map of file names)")
    _check_meta(meta, index)
    base = os.path.dirname(os.path.abspath(index))
    shapes = {}
    weight_map = {}
    for fname in sorted(set(wm.values())):
        full = os.path.join(base, fname)
        smeta, sshapes = _read_header(full)
        _check_meta(smeta, full)
        for k, s in sshapes.items():
            shapes[k] = s
            weight_map[k] = full
    lost = sorted(set(wm) - set(shapes))
    if lost:
        raise GramFileError(f"{index}: tensors listed in the index are missing from the shards: {lost[:5]}")
    return meta, shapes, weight_map


def _check_gram_shapes(dims: dict, shapes: dict, layout: str, where: str) -> None:
    for key, d in dims.items():
        name = GRAM_PREFIX + key
        if name not in shapes:
            continue
        want = [d, d] if layout == "full" else [d * (d + 1) // 2]
        if shapes[name] != want:
            raise GramFileError(f"{where}: Gram {key!r} has shape {shapes[name]}, expected {want} ({layout} layout)")


_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?i?b?)?\s*$", re.I)


def parse_size(text: str) -> int:
    """'500MB', '2GiB', '1e6' (bytes) -> int bytes."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 500MB, 2GB)")
    unit = (m.group(2) or "").lower().rstrip("b").rstrip("i")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[unit]
    return int(float(m.group(1)) * mult)
