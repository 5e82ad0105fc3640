"""The training baseline: the plain trl script a user would write instead of inserting a document.

`bench.training` runs it as its own process, so it pays interpreter start and imports exactly as
mongotune's training child does. The job (filter, trainer and LoRA settings) arrives as JSON so
both sides train from one definition; the last stdout line is JSON with what the bench compares.
"""

import argparse
import json

import torch
from datasets import Dataset
from peft import LoraConfig
from pymongo import MongoClient
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--uri", "--db", "--collection", "--model", "--output", "--job"):
        parser.add_argument(name, required=True)
    args = parser.parse_args()
    job = json.loads(args.job)

    documents = MongoClient(args.uri)[args.db][args.collection].find(job["filter"], {"_id": 0, "messages": 1})
    dataset = Dataset.from_list(list(documents))
    # On a CPU: no bf16, and no activation checkpointing (trl turns it on by default), as mongotune does.
    cpu = {"use_cpu": True, "bf16": False, "activation_checkpointing": False} if not torch.cuda.is_available() else {}
    config = SFTConfig(output_dir=args.output, save_strategy="no", report_to="none", **cpu, **job["trainer"])
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(args.model), args=config, train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(args.model),
        peft_config=LoraConfig(task_type="CAUSAL_LM", **job["lora"]),
    )
    result = trainer.train()
    trainer.save_model(args.output)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    tokens = max(entry.get("num_tokens", 0) for entry in trainer.state.log_history)
    print(json.dumps({"train_runtime": result.metrics["train_runtime"], "loss": losses[-1], "tokens": tokens}))


if __name__ == "__main__":
    main()
