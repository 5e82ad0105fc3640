"""mongotune from Python: submit, wait, predict, list and load checkpoints, all through the documents.

    from mongotune import Client
    tune = Client("mongodb://localhost:27017/mydb?replicaSet=rs0")
    model_id = tune.submit({...})          # a `_models` document, checked by the daemon's parser first
    tune.wait(model_id)                    # progress bar; the final document
    tune.predict(model_id, "Hello?")       # a `_requests` document; its answer
    model, tokenizer = tune.load(model_id) # the best checkpoint, as a transformers model with its adapter
"""

from mongotune.client import Client, JobFailed
from training.config import SpecError

__all__ = ["Client", "JobFailed", "SpecError"]
