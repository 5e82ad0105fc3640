"""The training baseline: the plain trl script a user would write instead of inserting a document.

`bench.training` runs it as its own process, so it pays interpreter start and imports exactly as
mongotune's training child does. The job (filter, trainer and LoRA settings) arrives as JSON so
both sides train from one definition; the script evaluates on the `_fold: "valid"` documents at the
last step, as the job does. The last stdout line is JSON with what the bench compares, its phases
timed as the job's are (`training.phases`).
"""

import argparse
import json
import time

import psutil
import torch
from datasets import Dataset
from peft import LoraConfig
from pymongo import MongoClient
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from bench.trainer_log import summary


def main() -> None:
    phases = {"start": round(time.time() - psutil.Process().create_time(), 2)}
    last = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal last
        phases[name], last = round(time.perf_counter() - last, 2), time.perf_counter()

    parser = argparse.ArgumentParser()
    for name in ("--uri", "--db", "--collection", "--model", "--output", "--job"):
        parser.add_argument(name, required=True)
    args = parser.parse_args()
    job = json.loads(args.job)

    documents = list(MongoClient(args.uri)[args.db][args.collection].find(job["filter"], {"_id": 0}))
    folds = {fold: Dataset.from_list([{"messages": d["messages"]} for d in documents if (d.get("_fold") == "valid")
                                      == (fold == "valid")]) for fold in ("train", "valid")}
    lap("data")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(args.model), AutoTokenizer.from_pretrained(args.model)
    lap("model")
    # On a CPU: no bf16, and no activation checkpointing (trl turns it on by default), as mongotune does.
    cpu = {"use_cpu": True, "bf16": False, "activation_checkpointing": False} if not torch.cuda.is_available() else {}
    steps = job["trainer"]["max_steps"]
    config = SFTConfig(output_dir=args.output, save_strategy="no", report_to="none", eval_strategy="steps",
                       eval_steps=steps, **cpu, **job["trainer"])
    trainer = SFTTrainer(model=model, args=config, train_dataset=folds["train"], eval_dataset=folds["valid"],
                         processing_class=tokenizer, peft_config=LoraConfig(task_type="CAUSAL_LM", **job["lora"]))
    lap("trainer")
    trainer.train()
    lap("train")
    trainer.save_model(args.output)
    lap("save")
    print(json.dumps({**summary(trainer.state.log_history), "phases": phases}))


if __name__ == "__main__":
    main()
