"""Padding-free batches: a batch's sequences laid end to end, so no step computes on padding.

trl's collator can flatten a batch into one row with `position_ids` restarting at each sequence;
the model must then keep the sequences apart (flash attention through `cu_seq_lens`; transformers'
sdpa and eager attention through a block-diagonal mask built from `position_ids`). A model that does
not would let each sequence attend to the ones before it and train on that silently, so the job asks
the model first: a short sequence must get the same logits at the start of a row and packed behind
another (OPT, which counts positions from the attention mask, fails; Llama, GPT-2, NeoX pass).

trl refuses `padding_free` together with `max_length` unless packing, although it truncates the
dataset itself; so the trainer is built padded (truncating as asked) and its collator then flattens.
The loss is the same either way: the same examples in the same order, the same tokens counted.

By default batches go flat only where that is cheap, with flash attention (`varlen`); elsewhere they stay
padded and are grouped by length (`sampling`), which saves most of the padding without the whole-row mask.
"""

import logging

import torch
from transformers.utils.generic import is_flash_attention_requested
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from training.config import SpecError

log = logging.getLogger(__name__)

PROBE_LENGTHS = (7, 9)  # a short sequence, another, then the first again: one forward of 23 tokens
TOLERANCE = 0.02  # of the largest logit: bf16 rounding stays far below it, attending across sequences far above


def keeps_sequences_apart(model) -> bool:
    """Whether a sequence packed behind others gets the logits it gets at the start of the row, where nothing
    precedes it: one forward pass (a third of a training step's work), so every job can afford to ask."""
    embeddings = model.get_input_embeddings()
    vocab, device = embeddings.num_embeddings, embeddings.weight.device
    generator = torch.Generator().manual_seed(0)
    first, other = (torch.randint(vocab // 2, vocab, (n,), generator=generator) for n in PROBE_LENGTHS)
    row = torch.cat([first, other, first])[None].to(device)
    positions = torch.cat([torch.arange(n) for n in (*PROBE_LENGTHS, PROBE_LENGTHS[0])])[None].to(device)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=row, position_ids=positions, use_cache=False).logits[0].float()
    finally:
        model.train(training)
    alone, packed = logits[:len(first)], logits[-len(first):]
    return bool((packed - alone).abs().max() <= TOLERANCE * alone.abs().max())


def flattened_here(arguments: dict) -> bool:
    """Padding-free batches this module makes; when trl packs, it makes its own."""
    return bool(arguments.get("padding_free")) and not arguments.get("packing")


def for_trl(arguments: dict) -> dict:
    """The SFTConfig arguments: padded when this module flattens, so that trl still truncates to `max_length`."""
    return {**arguments, "padding_free": False} if flattened_here(arguments) else arguments


def varlen(model) -> bool:
    """Whether the model's attention takes a flat row as sequence lengths (flash attention's varlen kernels).

    sdpa and eager attention instead mask the whole row: a batch of B sequences of L tokens costs (B*L)^2 there
    against B*L^2 padded. On this 2-core CPU (SmolLM2-135M, LoRA r=8, batch 4, sdpa) flat steps took 1.34-1.39 s
    against 1.30-1.34 s padded and grouped by length on 42-74-token chats, and 12.9 s against 3.9 s on 110-256-token ones.
    """
    return is_flash_attention_requested(model.config)


def decide(model, asked: bool) -> bool:
    """Padding-free for this run when the model keeps packed sequences apart and, unless the document asked for
    flat batches, its attention is varlen; padded otherwise (with a warning when the model would mix sequences).

    `asked` is the document's explicit `padding_free: true`: then a model that cannot is an error, not a fallback.
    """
    if not asked and not varlen(model):
        log.info("padding-free batches off: %s attention would mask the whole flat row",
                 model.config._attn_implementation)
        return False
    try:
        apart = keeps_sequences_apart(model)
    except Exception as exc:  # a model that cannot run the probe trains padded, as a plain script would
        log.warning("cannot check the model with packed sequences: %s", exc)
        apart = False
    if not apart and asked:
        raise SpecError("trainer.padding_free", "this model lets packed sequences attend to each other (or could "
                        "not be checked), so padding-free batches would train on mixed sequences; remove padding_free")
    if not apart:
        log.warning("padding-free batches off: this model does not keep packed sequences apart")
    return apart


def sampling(arguments: dict, given: dict) -> dict:
    """Length-grouped sampling where batches of several sequences stay padded, unless the document names a sampler.

    Each batch then holds sequences of about one length, so little of it is padding: on the bench's chats (42 to
    74 tokens, batch 4, 10% padding in random order, 2% grouped) a step took 1.30-1.34 s grouped against 1.47-1.48 s
    in random order. Flat batches have no padding to save, so they keep the random order.
    """
    several = arguments.get("per_device_train_batch_size", 8) > 1 and not arguments.get("packing")
    if "train_sampling_strategy" in given or not several or arguments.get("padding_free"):
        return {}
    return {"train_sampling_strategy": "group_by_length"}


def arrange(trainer, arguments: dict) -> None:
    """The batches as decided once the model was checked: flat, or padded in the order `arguments` names (the
    trainer's arguments were built before the model was loaded, so they may still name the random order)."""
    if flattened_here(arguments):
        flatten_batches(trainer)
    trainer.args.train_sampling_strategy = arguments.get("train_sampling_strategy", "random")


def flatten_batches(trainer) -> None:
    """Switch the trainer's collator, built padded so that trl truncates to `max_length`, to padding-free batches."""
    if not isinstance(trainer.data_collator, DataCollatorForLanguageModeling):
        raise TypeError(f"padding-free batches need trl's language-modeling collator, not "
                        f"{type(trainer.data_collator).__name__}")
    trainer.data_collator.padding_free = True
