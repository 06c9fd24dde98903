"""How the ranks of a merge share the work and meet: a strategy passed to the merge's phases (merge/api.py).

One process (`OneProcess`) writes every shard and meets no one; under torchrun (`Ranks`) the shards are
spread over the ranks by estimated cost, rank 0 judges the output for all, and the ranks' reports meet on
rank 0, which publishes. RegMean++ (merge/regmean_pp.py) shares the data instead: each rank runs its share of
every model's calibration batches, a block's Grams are summed into rank 0, which merges and writes the block,
and every rank receives the merged block to advance its own hidden states. The sync points' names are what a
rank's DistributedError says it was doing.
"""

from __future__ import annotations

from ..io.shards import MANIFEST_NAME, rank_manifest_name
from .plan import shard_owners


class OneProcess:
    """A world of one: everything is this process's, nothing is exchanged."""

    is_main = True

    def __init__(self, ctx):
        self.ctx = ctx
        self.manifest_name = MANIFEST_NAME  # the partial folder's record of this rank's shards

    def device(self, device: str) -> str:
        return device

    def fail(self, error: BaseException) -> None:
        pass

    def decide(self, judge):
        """judge() on rank 0, its answer on every rank (the output folder's state: a refusal stops all)."""
        return judge()

    def owned_shards(self, plan, layout, sources):
        """The shard files this rank writes; None: all of them."""
        return None

    def on_shard_done(self, hook):
        return hook

    def meet(self, plan, layout, tensor_report: dict, output):
        """Every rank's shards are written -> (tensor report, shard records, reused shards) of the whole merge
        on rank 0."""
        return tensor_report, dict(output.records), list(output.reused)

    def publish(self, report=None):
        """Rank 0 has put the merge in place (report) -> the report, on every rank."""
        return report

    # -- RegMean++: the data shared, the model merged on rank 0 -------------------------------------------
    def own_batches(self, batches: list) -> list:
        """This rank's share of a model's calibration batches."""
        return batches

    def writer_shards(self, layout):
        """The shard files this rank writes when rank 0 writes them all (None: all of them)."""
        return None

    def meet_grams(self, collectors: list, what: str) -> None:
        """Every rank's Grams of the part just run summed into rank 0's collectors."""

    def share_merged(self, merged: dict, specs: list, what: str) -> dict:
        """Rank 0's merged tensors {name: tensor} -> the same on every rank; specs: (name, dtype, shape) of each."""
        return merged

    def checkpoint_name(self, name: str) -> str:
        """This rank's checkpoint file (each rank holds its own share's hidden states)."""
        return name

    def any_stopped(self, stopped: bool) -> bool:
        """Did this rank (under torchrun: any rank) ask to stop?"""
        return bool(stopped)

    def agree_resume(self, next_block):
        """The block every rank's checkpoint resumes at, or None (start afresh) unless all have the same."""
        return next_block


class Ranks(OneProcess):
    """torchrun: one rank per process, the same calls in the same order on every rank."""

    def __init__(self, ctx):
        super().__init__(ctx)
        self.is_main, self.rank = ctx.is_main, ctx.rank
        self.manifest_name = rank_manifest_name(ctx.rank, ctx.world)

    def device(self, device: str) -> str:
        import torch

        return str(self.ctx.device) if torch.device(device).type == "cuda" else device  # cuda -> cuda:LOCAL_RANK

    def fail(self, error: BaseException) -> None:
        self.ctx.fail(error)  # first: the other ranks stop writing before rank 0 removes anything

    def decide(self, judge):
        self.ctx.sync(None, "the plan")  # every rank has a plan (else every rank stops here)
        answer = judge() if self.is_main else None
        self.ctx.sync(None, "the output folder")  # a refusal on rank 0 stops every rank here
        return self.ctx.broadcast_object(answer, "the resume decision")

    def owned_shards(self, plan, layout, sources):
        owners = shard_owners(plan, layout, sources, self.ctx.world)
        return {fname for j, (fname, _) in enumerate(layout.shards) if owners[j] == self.ctx.rank}

    def on_shard_done(self, hook):
        from ..distributed import die_after_shards_hook

        return _chain(hook, die_after_shards_hook(self.ctx))

    def meet(self, plan, layout, tensor_report: dict, output):
        self.ctx.sync(None, "the shards")  # the barrier: every rank's shards are written
        mine = {n: tensor_report[n] for n, _, _ in plan.outputs if output.owns(n)}
        parts = self.ctx.all_gather_object({"tensors": mine, "records": dict(output.records),
                                            "reused": list(output.reused), "warnings": plan.warnings}, "the reports")
        return _combine_reports(plan, layout, parts)

    def publish(self, report=None):
        self.ctx.sync(None, "the final output")  # rank 0 writes the index, config and report
        return self.ctx.broadcast_object(report, "the report")

    def own_batches(self, batches: list) -> list:
        return self.ctx.shard(batches)

    def writer_shards(self, layout):
        return {fname for fname, _ in layout.shards} if self.is_main else set()

    def meet_grams(self, collectors: list, what: str) -> None:
        self.ctx.sync(None, what)  # every rank has run its share (a failure there stops every rank here)
        for c in collectors:
            c.reduce_to_rank0(self.ctx, totals=False)

    def share_merged(self, merged: dict, specs: list, what: str) -> dict:
        import torch

        self.ctx.sync(None, what)  # rank 0 has merged and written the part (a failure there stops every rank)
        if self.is_main:  # on the host: the ranks' devices need not match (and gloo carries it)
            merged = {n: merged[n].to("cpu").contiguous() for n, _, _ in specs}
        else:
            merged = {n: torch.empty(shape, dtype=dtype) for n, dtype, shape in specs}
        for n, _, _ in specs:
            self.ctx.broadcast_(merged[n], f"{what} ({n})")
        return merged

    def checkpoint_name(self, name: str) -> str:
        stem, ext = name.rsplit(".", 1)
        return f"{stem}.rank{self.rank}-of-{self.ctx.world}.{ext}"

    def any_stopped(self, stopped: bool) -> bool:
        return self.ctx.all_sum([int(stopped)], "the interruption flags")[0] > 0

    def agree_resume(self, next_block):
        every = self.ctx.all_gather_object(next_block, "the checkpoints")
        if next_block is not None and all(b == next_block for b in every):
            return next_block
        if self.is_main and any(b is not None for b in every):
            self.ctx.log("note: the ranks' checkpoints are not of the same block "
                         f"({', '.join('none' if b is None else str(b) for b in every)}); merging every block again")
        return None


def strategy(ctx) -> OneProcess:
    return Ranks(ctx) if ctx.enabled else OneProcess(ctx)


def _chain(a, b):
    if a is None or b is None:
        return a if b is None else b

    def both(fname):
        a(fname)
        b(fname)

    return both


def _combine_reports(plan, layout, parts):
    """Rank reports -> (tensor report in plan order, shard records and reused shards in layout order)."""
    tensors, records, reused = {}, {}, set()
    for p in parts:
        tensors.update(p["tensors"])
        records.update(p["records"])
        reused.update(p["reused"])
        for w in p["warnings"]:
            if w not in plan.warnings:
                plan.warnings.append(w)
    order = [f for f, _ in layout.shards]
    return ({n: tensors[n] for n, _, _ in plan.outputs if n in tensors},
            {f: records[f] for f in order if f in records}, [f for f in order if f in reused])
