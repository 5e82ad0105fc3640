"""The forgetting guard of a feedback run (`training.forgetting`): the model's own `data` valid fold, tokenized and
batched exactly as its SFT runs evaluate it; the held-out feedback rows when the model has no such fold."""

import pytest
import torch

from training import dataset, forgetting, padding
from training.arguments import resolved_arguments, to_config
from training.config import SFT, parse_model
from training.models import load_tokenizer
from training.promotion import held_out_batches

FEEDBACK = {"method": "kto", "every": 2}


def spec_of(path, limits, collection="notes", data=None, **fields):
    """A model with feedback whose own data is `collection` (chat unless `data` says otherwise)."""
    return parse_model({"_id": "m", "model_name_or_path": path,
                        "data": {"collection": collection, **(data or {"key": "messages"})},
                        "trainer": {"max_seq_length": 24, "per_device_eval_batch_size": 3}, "feedback": FEEDBACK,
                        **fields}, limits)


def chats(n: int) -> list[dict]:
    """Chat documents, some longer than `max_seq_length`: truncation is part of what must match."""
    return [{"_id": i, "messages": [{"role": "user", "content": f"question {i} " * (1 + i % 4)},
                                    {"role": "assistant", "content": f"arr, answer {i} " * (1 + i % 5)}]}
            for i in range(n)]


@pytest.mark.parametrize("data", [{"key": "messages"}, {"key": ["q", "a"]}])
def test_the_guard_scores_the_models_valid_fold_as_its_sft_runs_tokenize_and_batch_it(db, tiny_model_path, limits,
                                                                                      tmp_path, data):
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    db["notes"].insert_many([{**doc, "q": doc["messages"][0]["content"], "a": doc["messages"][1]["content"]}
                             for doc in chats(40)])
    spec = spec_of(tiny_model_path, limits, data=data)
    tokenizer = load_tokenizer(spec, limits)
    batches, on = forgetting.guard(db, spec, limits, tokenizer, tmp_path / "guard")
    assert on == {"source": "data", "collection": "notes"}

    # What an SFT run of this model evaluates on: its own trainer, built as the child builds it.
    train, valid, _ = dataset.read_datasets(db, spec.data, limits)
    args = to_config(SFT, padding.for_trl(resolved_arguments(spec.trainer, str(tmp_path / "sft"), has_eval=True,
                                                             use_cpu=True)))
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_path), args=args, train_dataset=train,
                         eval_dataset=valid, processing_class=load_tokenizer(spec, limits))
    expected = held_out_batches(trainer)
    assert [len(b["input_ids"]) for b in batches] == [3, 1]  # the seeded 10% (4 documents) an SFT run holds out
    assert len(batches) == len(expected)
    for got, want in zip(batches, expected):
        assert set(got) == set(want)
        for name in want:
            assert torch.equal(got[name], want[name]), name
    assert any((b["labels"] == -100).any() for b in batches) == (data["key"] != "messages")  # answers alone scored


def test_without_a_valid_fold_of_its_own_documents_the_guard_falls_back_to_the_feedback_rows_and_says_why(
        db, tiny_model_path, limits, tmp_path):
    db["few"].insert_many(chats(5))
    db["marked"].insert_many([{**doc, "_fold": "train"} for doc in chats(30)])
    for collection, why in (("few", "no valid fold"), ("marked", "no valid fold"),
                            ("absent", "could not be read now (data.collection")):
        batches, on = forgetting.guard(db, spec_of(tiny_model_path, limits, collection), limits, None, tmp_path)
        assert batches is None and on["source"] == "feedback" and why in on["why"], on
    preference = spec_of(tiny_model_path, limits, "few", method="dpo", data={"key": ["p", "c", "r"]})
    batches, on = forgetting.guard(db, preference, limits, None, tmp_path)
    assert batches is None and on["source"] == "feedback" and "own method is dpo" in on["why"]
