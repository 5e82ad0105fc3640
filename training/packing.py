"""Packing (`trainer.packing: true`): several examples laid into each row of `max_length` tokens.

Fewer, fuller rows: fewer steps per epoch for the same tokens. trl packs in one of two ways. "bfd"
(best-fit decreasing) places whole examples into rows, an example longer than `max_length` truncated
as without packing, and restarts `position_ids` at each example; its batches are padding-free, with
no attention mask, so the model must keep the examples apart by those positions: flash attention does
through `cu_seq_lens`, and transformers' sdpa and eager attention through a block-diagonal mask built
from `position_ids` whenever no cache is in use (trl's loss and the promotion gate run without one).
"wrapped" cuts examples mid-sequence and lets each attend to the ones before it, on any attention, so
it is never used. The model is asked first (`training.padding.keeps_sequences_apart`); one that would
let packed examples see each other is refused rather than trained on mixed examples.
"""

from training.config import SpecError
from training.padding import keeps_sequences_apart

STRATEGY = "bfd"  # written into the run's resolved arguments, so its entry says how it packed


def arguments(given: dict) -> dict:
    """What packing adds to the SFTConfig arguments when the document asks for it."""
    return {"packing_strategy": STRATEGY} if given.get("packing") else {}


def check(model) -> None:
    """Refuse packing for a model that lets packed examples attend to each other."""
    if not keeps_sequences_apart(model):
        raise SpecError("trainer.packing", "this model lets packed examples attend to each other, so packing "
                        "would train on mixed examples; remove packing")
