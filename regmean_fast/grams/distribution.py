"""How the ranks of a statistics job share the batches and meet: a strategy passed to its phases (grams/job.py).

One process (`OneProcess`) runs every batch and meets no one; under torchrun (`Ranks`) each rank runs its own
disjoint share of the batches with its own checkpoint, rank 0 judges the output for all, an interruption of
one rank stops every rank, and the Grams (and Fisher sums) are summed into rank 0, which writes the file
(--sequential: each block's right after the block, at whose end a stop asked on any rank stops every rank). The
sync points' names are what a rank's DistributedError says it was doing.
"""

from __future__ import annotations

import hashlib


class OneProcess:
    """A world of one: every batch is this process's, nothing is exchanged."""

    is_main = True

    def __init__(self, ctx):
        self.ctx = ctx
        self.rank, self.world = ctx.rank, ctx.world

    def log(self, msg: str) -> None:
        self.ctx.log(msg)

    def own_batches(self, batches: list, signature: str) -> tuple[list, str]:
        """-> (this rank's batches, the signature its checkpoint records)."""
        return batches, signature

    def describe(self, metadata: dict) -> None:
        """What the Gram file's provenance says about the ranks."""

    def judge_output(self, judge):
        """judge() on rank 0 (the output's state), its answer on every rank."""
        return judge()

    def ready(self) -> None:
        """Every rank has its model and data (else all stop here)."""

    def done(self) -> None:
        """Every rank has left its loop."""

    def any_stopped(self, stopped: bool) -> bool:
        """Did this rank (under torchrun: any rank) stop before the end?"""
        return bool(stopped)

    def sequential_stop(self, stop):
        """The stop a --sequential run checks before each batch: one process stops at any batch."""
        return stop

    def meet_part(self, collector, keys: list, stop, what: str) -> None:
        """--sequential, a part (decoder block) just finished: its Grams (keys) summed into rank 0's collector, and
        under torchrun every rank told whether any asked to stop (stop.flag, from sequential_stop)."""

    def agree_resume(self, position):
        """--sequential --resume: the position (part, batch) of this rank's checkpoint, or None -> where every rank
        goes on from, or None (start afresh) unless every rank's checkpoint is at the same part's start."""
        return position

    def meet_fisher(self, fisher_acc):
        """-> (Fisher examples, Fisher sums on the host) of every rank, on rank 0."""
        return fisher_acc.examples, fisher_acc.result()

    def meet(self, collector) -> None:
        """Every rank's Grams and counts summed into rank 0's collector."""

    def written(self) -> None:
        """Rank 0 has written the Gram file (a failure there stops every rank)."""


class Ranks(OneProcess):
    """torchrun: one rank per process, the same calls in the same order on every rank."""

    def __init__(self, ctx):
        super().__init__(ctx)
        self.is_main = ctx.is_main

    def own_batches(self, batches: list, signature: str) -> tuple[list, str]:
        mine = self.ctx.shard(batches)  # a disjoint share of the batches, and a checkpoint of its own
        return mine, hashlib.sha256(f"{signature}:rank{self.rank}of{self.world}".encode()).hexdigest()

    def describe(self, metadata: dict) -> None:
        metadata["ranks"] = self.world

    def judge_output(self, judge):
        self.ctx.sync(None, "the resume check")  # every rank got here (a failing rank reports at this collective)
        return self.ctx.broadcast_object(judge() if self.is_main else None, "the output's state")

    def ready(self) -> None:
        self.ctx.sync(None, "the start")

    def done(self) -> None:
        self.ctx.sync(None, "the end of the statistics")

    def any_stopped(self, stopped: bool) -> bool:
        return self.ctx.all_sum([int(stopped)], "the interruption flags")[0] > 0

    def sequential_stop(self, stop):
        from .checkpoint import PartEndStop

        return PartEndStop(stop)  # raised at a part end, on every rank at once (meet_part)

    def meet_part(self, collector, keys: list, stop, what: str) -> None:
        self.ctx.sync(None, what)  # every rank has run its share of the part (a failure there stops every rank)
        collector.reduce_to_rank0(self.ctx, totals=False, keys=keys)  # the run's totals: once, in meet
        stop.flag = self.any_stopped(stop.asked.flag)

    def agree_resume(self, position):
        self.ctx.sync(None, "the checkpoints")  # a rank that failed to read its checkpoint stops every rank here
        every = self.ctx.all_gather_object(position, "the checkpoints")
        if position is not None and position[1] == 0 and all(p == position for p in every):
            return position
        if self.is_main and any(p is not None for p in every):
            where = ", ".join("none" if p is None else f"part {p[0]} batch {p[1]}" for p in every)
            self.ctx.log(f"note: the ranks' checkpoints are not all at the start of the same block ({where}); "
                         "starting from the beginning")
        return None

    def meet_fisher(self, fisher_acc):
        from ..distributed import reduce_tensor_dict

        examples = self.ctx.all_sum([fisher_acc.examples], "the Fisher counts")[0]
        summed = reduce_tensor_dict(self.ctx, fisher_acc.sums, "the Fisher sums")
        return examples, ({n: F.detach().cpu() for n, F in summed.items()} if self.is_main else None)

    def meet(self, collector) -> None:
        collector.reduce_to_rank0(self.ctx)  # one Gram at a time; --sequential: only the totals are left

    def written(self) -> None:
        self.ctx.sync(None, "the writing of the Gram file")


def strategy(ctx) -> OneProcess:
    return Ranks(ctx) if ctx.enabled else OneProcess(ctx)
