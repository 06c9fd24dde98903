"""--fisher: the diagonal empirical Fisher, for the Fisher-merging baseline.

F[p] = sum over examples of (d log p(y | x) / d p)^2, one example at a time (no padding), where the
log-likelihood is the model's own loss: next-token prediction for causal LMs (every real token after
the first; for a chat example that ends with the assistant's turn, the answer's tokens only, as chat
fine-tuning trains: data.answer_starts), the labels for classifiers when the data has them (otherwise the model's own prediction,
recorded as fisher_labels = "predicted"). Stored as raw sums; divide by metadata fisher_examples.
A causal LM's log p(y | x) sums over the predicted tokens, so an example with a longer answer weighs more
(merging a task of one-token answers with one of long answers, the latter's Fisher dominates);
token_mean=True (grams --fisher-tokens mean) takes their mean instead: every example weighs alike.
"""

from __future__ import annotations

import torch

from .fileformat import GramsError


def _kind(model) -> str:
    name = type(model).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "causal"
    if name.endswith("ForSequenceClassification"):
        return "classifier"
    raise GramsError(f"--fisher needs a causal LM or a sequence classifier, not {name}")


class FisherAccumulator:
    def __init__(self, model: torch.nn.Module, token_mean: bool = False):
        self.model = model
        self.token_mean = token_mean  # causal LMs: the mean of the tokens' log-likelihoods, not their sum
        self.kind = _kind(model)
        self.params = {n: p for n, p in model.named_parameters()}
        self.sums: dict[str, torch.Tensor] = {}
        self.examples = 0
        self.sources: set = set()  # where the classifier's labels came from: "data", "predicted"
        self.answers_only = False  # a causal LM's log-likelihood left a chat prompt out (answer_start > 0)

    def _one(self, ids: torch.Tensor, label, start: int = 0) -> None:
        model = self.model
        for p in self.params.values():
            p.grad = None
            p.requires_grad_(True)
        att = torch.ones_like(ids)
        if self.kind == "causal":
            predicted = ids.size(1) - max(start, 1)  # tokens max(start, 1).. , each from the ones before it
            if predicted < 1:
                return  # no next token to predict
            targets = ids
            if start > 0:
                targets = ids.clone()
                targets[:, :start] = -100  # the prompt: context, not predicted
                self.answers_only = True
            out = model(input_ids=ids, attention_mask=att, labels=targets)
            loglik = -out.loss if self.token_mean else -out.loss * predicted  # (the loss: their mean)
        else:
            logits = model(input_ids=ids, attention_mask=att).logits.float()
            if logits.size(-1) == 1:
                raise GramsError("--fisher: regression heads are not supported")
            if label is None or label < 0:  # this example has no label
                label = int(logits.argmax(-1))
                self.sources.add("predicted")
            else:
                self.sources.add("data")
            loglik = torch.log_softmax(logits, -1)[0, int(label)]
        loglik.backward()
        with torch.no_grad():
            for n, p in self.params.items():
                if p.grad is None:
                    continue
                g2 = p.grad.float().pow(2)
                if n in self.sums:
                    self.sums[n].add_(g2)
                else:
                    self.sums[n] = g2
                p.grad = None
        self.examples += 1

    def add_batch(self, batch, device) -> None:
        """batch: a data.Batch (right-padded); one backward pass per example."""
        was = self.model.training
        self.model.eval()
        try:
            with torch.enable_grad():
                for r in range(batch.input_ids.size(0)):
                    n = int(batch.attention_mask[r].sum())
                    ids = batch.input_ids[r : r + 1, :n].to(device)
                    label = None if batch.labels is None else int(batch.labels[r])
                    start = batch.extra.get("answer_start")
                    self._one(ids, label, 0 if start is None else int(start[r]))
        finally:
            self.model.train(was)
            for p in self.params.values():
                p.grad = None

    @property
    def label_source(self) -> str | None:
        if len(self.sources) > 1:
            return "data, predicted where missing"
        return next(iter(self.sources), None)

    def result(self) -> dict[str, torch.Tensor]:
        return {n: F.detach().cpu() for n, F in self.sums.items()}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"fisher." + n: F for n, F in self.sums.items()}

    def load_state(self, tensors: dict, examples: int, device) -> None:
        self.sums = {k[len("fisher."):]: v.to(device) for k, v in tensors.items() if k.startswith("fisher.")}
        self.examples = examples
