"""What the promotion gate scores for a preference run (`method` dpo or kto): its held-out rows, as the trainer
tokenized them, scored by the implicit reward of each answer against one common reference, the base model.

A checkpoint's implicit reward for an answer y to a prompt x is `beta * sum over y's tokens of (log p_policy -
log p_base)`: the sum, as DPO's reward is the log-ratio of whole sequences and as trl's `rewards/*` metrics count
it (so the gate's margins read in the units of the run's logs); a mean would weigh long answers less than the
training did. The reference is the base (the adapters disabled, or, for full weights, the model every run starts
from), whatever reference trl trained against (a retrain's is the adapter it started from): both checkpoints are
measured against the same one, so their scores compare. DPO: a pair is ranked right when r(chosen) > r(rejected);
`reward_margin` is the mean of r(chosen) - r(rejected). KTO: an example is ranked right when the sign of r agrees
with its label (desirable above 0); `reward_margin` is the mean r of the desirable examples minus the mean r of the
undesirable ones (None without one of each), so neither label's count weighs more. A reward of exactly 0 (the
reference itself) ranks nothing right.

The forgetting guard scores SFT batches (`promotion.measure`): those `held_out` derives from the same rows (the
prompt with the chosen, or desirable, answer as a prompt-completion example), or the ones a caller passes (a feedback
run's: the model's own `data` valid fold, `training.forgetting`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from training.config import DPO, KTO

REFERENCE = "the base model (adapters disabled), one reference for both checkpoints"  # as the run's entry says it
COLUMNS = {DPO: ("prompt_ids", "chosen_ids", "rejected_ids"), KTO: ("prompt_ids", "completion_ids", "label")}


@dataclass
class HeldOut:
    """A preference run's held-out rows in its trainer's batches, the SFT batches of the forgetting guard, and the
    trainer's beta. DPO batches hold each pair's chosen row in the first half and its rejected row in the second."""

    method: str
    batches: list
    sft: list
    beta: float
    guarded_on: dict = field(default_factory=dict)  # where `sft` comes from, as the promotion entry's `forgetting_on`

    @property
    def rows(self) -> int:
        """Pairs (DPO) or labelled examples (KTO)."""
        return sum(len(b["input_ids"]) // (2 if self.method == DPO else 1) for b in self.batches)


def held_out(batches: list, method: str, beta: float, sft: list | None = None,
             guarded_on: dict | None = None) -> HeldOut:
    """A preference run's held-out rows, `batches` of its `COLUMNS` as its trainer collates them
    (`promotion.held_out_batches`). `sft`: the SFT batches the forgetting guard scores, each `{input_ids,
    attention_mask, labels}`; by default these rows' prompts with their chosen or desirable answers. `guarded_on`: what
    they are, for the promotion entry."""
    return HeldOut(method, batches, sft if sft is not None else sft_batches(batches, method), beta, guarded_on or {})


def sft_batches(batches: list, method: str) -> list:
    """Prompt-completion SFT batches of the chosen (DPO) or desirable (KTO) rows: the loss on the answer alone."""
    out = []
    for batch in batches:
        keep = slice(0, len(batch["input_ids"]) // 2) if method == DPO else batch["label"].bool()
        ids, mask, answer = batch["input_ids"][keep], batch["attention_mask"][keep], batch["completion_mask"][keep]
        if len(ids):
            out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(answer == 0, -100)})
    return out


def answer_logps(model, batch: dict):
    """Each row's summed log-probability of its answer tokens (`completion_mask`), on the CPU: trl's own
    `selective_log_softmax`, which never holds a log-softmax over the whole vocabulary for every row."""
    from trl.trainer.utils import selective_log_softmax

    device = next(model.parameters()).device
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    logps = selective_log_softmax(logits, ids[:, 1:])
    return (logps * batch["completion_mask"][:, 1:].to(device)).sum(-1).cpu()


def all_logps(model, held: HeldOut) -> list:
    """`answer_logps` of every held-out batch, in eval mode without gradients."""
    import torch

    model.eval()
    with torch.inference_mode():
        return [answer_logps(model, batch) for batch in held.batches]


def scores(held: HeldOut, policy: list, reference: list) -> dict:
    """`preference_accuracy` and `reward_margin` from each batch's policy and reference logps."""
    import torch

    rewards = [held.beta * (p - r) for p, r in zip(policy, reference)]
    if held.method == DPO:
        margins = torch.cat([r[: len(r) // 2] - r[len(r) // 2:] for r in rewards])
        return pair_scores(margins)
    return example_scores(torch.cat(rewards), torch.cat([b["label"].bool() for b in held.batches]))


def pair_scores(margins) -> dict:
    """DPO: the fraction of pairs whose chosen answer's reward is above the rejected one's, and the mean margin."""
    return {"preference_accuracy": (margins > 0).float().mean().item(), "reward_margin": margins.mean().item()}


def example_scores(rewards, labels) -> dict:
    """KTO: the fraction of examples whose reward's sign agrees with the label, and the desirable examples' mean
    reward minus the undesirable ones' (None without one of each)."""
    right = (rewards > 0) & labels | (rewards < 0) & ~labels
    both = labels.any() and (~labels).any()
    margin = (rewards[labels].mean() - rewards[~labels].mean()).item() if both else None
    return {"preference_accuracy": right.float().mean().item(), "reward_margin": margin}
