"""How the ranks of a merge share the work and meet: a strategy passed to the merge's phases (merge/api.py).

One process (`OneProcess`) writes every shard and meets no one; under torchrun (`Ranks`) the shards are
spread over the ranks by estimated cost, rank 0 judges the output for all, and the ranks' reports meet on
rank 0, which publishes. The sync points' names are what a rank's DistributedError says it was doing.
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


class Ranks(OneProcess):
    """torchrun: one rank per process, the same calls in the same order on every rank."""

    def __init__(self, ctx):
        super().__init__(ctx)
        self.is_main = ctx.is_main
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
