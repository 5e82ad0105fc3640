"""The DPO baseline: the plain trl `DPOTrainer` script a user would write instead of inserting a document.

`bench.dpo` runs it as its own process, as `bench.baseline_train` is run for SFT: it reads the
same pairs from the database, trains with the same arguments and LoRA settings, saves the adapter and
prints one JSON line with the trainer's runtime, steps and last logged rewards.
"""

import argparse
import json

import torch
from datasets import Dataset
from peft import LoraConfig
from pymongo import MongoClient
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

from bench.trainer_log import rewards


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--uri", "--db", "--collection", "--model", "--output", "--job"):
        parser.add_argument(name, required=True)
    args = parser.parse_args()
    job = json.loads(args.job)
    fields = ("prompt", "chosen", "rejected")
    documents = MongoClient(args.uri)[args.db][args.collection].find({}, {name: 1 for name in fields}, sort=[("_id", 1)])
    pairs = Dataset.from_list([{name: d[name] for name in fields} for d in documents])
    model, tokenizer = AutoModelForCausalLM.from_pretrained(args.model), AutoTokenizer.from_pretrained(args.model)
    # On a CPU: no bf16, and no activation checkpointing (trl turns it on by default), as mongotune does.
    cpu = {"use_cpu": True, "bf16": False, "activation_checkpointing": False} if not torch.cuda.is_available() else {}
    config = DPOConfig(output_dir=args.output, save_strategy="no", report_to="none", **cpu, **job["trainer"])
    trainer = DPOTrainer(model=model, args=config, train_dataset=pairs, processing_class=tokenizer,
                         peft_config=LoraConfig(task_type="CAUSAL_LM", **job["lora"]))
    trainer.train()
    trainer.save_model(args.output)
    print(json.dumps(rewards(trainer.state.log_history)))


if __name__ == "__main__":
    main()
