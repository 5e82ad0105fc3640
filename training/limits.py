"""The operator's caps on what a document may ask for, passed to every parse and every child.

A document is untrusted; these numbers are not. They come from the listener's settings (options
over environment over defaults), travel to the training child and the serving worker as JSON, and
every refusal names the cap and the setting that raises it (`Limits.refusal`).
"""

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

ENV_PREFIX = "MONGOTUNE_"


class Limits(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_steps: int = Field(100_000, ge=1, description="optimizer steps in one run")
    max_batch_size: int = Field(64, ge=1, description="per-device train or eval batch size")
    max_seq_length: int = Field(8192, ge=16, description="tokens per training example (trainer.max_length)")
    max_dataloader_workers: int = Field(4, ge=0, description="data-loading processes per run")
    max_processes: int = Field(8, ge=1, description="processes or GPUs one run may use on one node")
    max_nodes: int = Field(8, ge=1, description="nodes (daemons, each on its host) one run may use")
    max_checkpoints: int = Field(10, ge=1, description="checkpoints kept per run (trainer.save_total_limit)")
    max_saves: int = Field(200, ge=1, description="checkpoints one run may store over its life")
    max_checkpoint_bytes: int = Field(50 * 2**30, ge=2**20, description="bytes of checkpoints stored per model")
    max_documents: int = Field(1_000_000, ge=1, description="training documents read for one run")
    max_feedback_rows: int = Field(2_000, ge=2, description="rated requests one feedback run reads, newest first; "
                                   "also caps feedback.every")
    min_retrain_interval_s: float = Field(300.0, gt=0, description="shortest time allowed between two "
                                          "firings of a model's retrain.schedule")
    max_model_params: int = Field(8_000_000_000, ge=1, description="parameters of a base model, checked before loading")
    max_download_bytes: int = Field(50 * 2**30, ge=2**20, description="bytes of one base model fetched from the hub")
    max_new_tokens: int = Field(512, ge=1, description="tokens generated for one request")
    max_input_chars: int = Field(32_000, ge=1, description="characters of one request's input, all messages together")
    max_messages: int = Field(200, ge=1, description="messages in one chat request")
    model_roots: tuple[Path, ...] = Field((), description="folders a model_name_or_path may point into")
    private_roots: tuple[Path, ...] = Field((), description="folders no document may point into (the listener's own)")
    hub_models: tuple[str, ...] = Field(("*",), description="hub ids (fnmatch patterns) a document may name")
    hub_token_models: tuple[str, ...] = Field((), description="hub ids (patterns) that may use the host's hub token")
    collections: tuple[str, ...] = Field((), description="data collections (patterns) a document may train on; "
                                                          "empty: any not starting with '_' or 'system.'; "
                                                          "never the listener's own or the server's")
    answer_collections: tuple[str, ...] = Field((), description="collections (patterns) a request over a collection "
                                                "may write its answers into; empty: none")
    trust_remote_code: bool = Field(False, description="let a model run the Python code it ships")
    allow_init_from: bool = Field(True, description="let a model start from another model's adapter (init_from)")

    @staticmethod
    def setting(name: str) -> str:
        """The environment variable that sets a cap (each also has a `listener start` option)."""
        return ENV_PREFIX + name.upper()

    def refusal(self, name: str, asked) -> str:
        """What to say when a document asks for more than a cap allows."""
        return (f"{asked} is over the operator's cap of {getattr(self, name)} {type(self).model_fields[name].description}; "
                f"ask for less, or the operator raises it with {self.setting(name)}")
