"""The documents users write, parsed once into validated, typed objects.

`ModelSpec` is a `_models` document and `RequestSpec` a `_requests` document. Parsing either
raises `SpecError` naming the field and saying what to change; nothing downstream re-checks.
Trainer argument names are checked against trl's `SFTConfig` (`DPOConfig`, `KTOConfig` for the
preference methods) in `training.arguments`, where trl is imported anyway.
"""

import difflib
import fnmatch
import os
import re
import typing
from typing import Annotated, Any, Literal

import bson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from training import defaults, ids, schedule, transforms
from training.errors import cut
from training.limits import Limits
from training.template import TemplateError, template_fields

# Written by the listener; present on documents it has touched, never part of the user's definition.
LISTENER_FIELDS = frozenset({
    "status", "run", "attempts", "progress", "metrics", "checkpoints", "best_checkpoint", "error",
    "lease", "created_at", "started_at", "finished_at", "output", "usage", "latency_ms",
    "completed_at", "history", "checkpoint_used", "batch_size", "warnings", "timing", "events", "runs",
    "trigger", "finish_reason", "changed", "answers_token", "nodes", "feedback_run",
})
# What a user-supplied filter may not hold: a filter selects documents, it never computes. JavaScript runs code on
# the server; `$expr` evaluates aggregation expressions (`$range`, `$reduce`...), whose cost no size bound limits.
FORBIDDEN_OPERATORS = {
    **dict.fromkeys(("$where", "$function", "$accumulator"), "runs JavaScript on the server"),
    "$expr": "evaluates aggregation expressions, whose cost has no bound; select with query operators "
             "($eq, $in, $gt, $exists, $regex...)",
}
FIELD_PATH = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"  # a dotted field name, never an operator
TEMPLATE_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)\}")
# Accepted so a reference workflow's arguments work as copied, and ignored: written to `warnings`.
IGNORED = {
    "output_dir": "ignored: checkpoints go to GridFS, never to a folder a document names",
    "overwrite_output_dir": "ignored: every run writes to a fresh folder of the listener's",
}
REVISION = r"^[A-Za-z0-9](\.?[A-Za-z0-9_/-])*\.?$"  # a branch, tag or commit hash: never "..", which git refuses too
PLAIN_NAME = r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}$"  # one file or folder name inside the model, never a path
FIELD_NAME = r"^[A-Za-z_][A-Za-z0-9_.-]{0,99}$"
MAX_KEY_CHARS = 1024  # a field name the data section reads: errors and skip reasons quote it, so it stays short
# A top-level field: any name a collection may hold (spaces, accents), not starting with `$`, with no dot and no NUL.
# The read projects it and the rows are read by name, so `arr.$` would be an operator, and `meta.title` (projected
# as `{meta: {title}}`) a name no row holds.
DATA_FIELD_PATH = r"^[^.$\x00][^.\x00]*$"
# A field of the user's documents that `data` names: the length bound and the pattern reach the write-time
# validator, which keeps every quote of it small.
DataField = Annotated[str, Field(min_length=1, max_length=MAX_KEY_CHARS, pattern=DATA_FIELD_PATH)]
# What a refusal by pattern says to change, where the pattern alone would not say it plainly.
PATTERN_HINTS = {DATA_FIELD_PATH: "must name a top-level field of your documents: a name with no dot, not starting "
                                  "with $ (operators such as arr.$ are not field names; a nested field needs "
                                  "data.transform or a top-level copy)"}


class SpecError(Exception):
    """A document that cannot be used as written: `field` is the dotted path to fix. Both are cut to a few KB, as
    either may repeat what the writer gave."""

    def __init__(self, field: str, message: str):
        field, message = cut(field, 500), cut(message)
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message

    def as_error(self) -> dict:
        return {"type": "invalid_document", "field": self.field, "message": str(self)}


def _reported(check, value, error: type[Exception]):
    """`value` once `check(value)` accepts it; its complaint becomes the ValueError pydantic reports under the field."""
    try:
        check(value)
    except error as exc:
        raise ValueError(str(exc.args[0]) if exc.args else type(exc).__name__) from None
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


MAX_FILTER_BYTES = 16 * 2**10  # a filter goes with every count, find and watched event of the run or request


def _bounded_filter(value: dict) -> dict:
    """A filter that is small as BSON and only selects (no JavaScript, no `$expr`); ValueError, reported under the
    field, otherwise."""
    try:
        size = len(bson.encode(value))
    except (bson.errors.BSONError, TypeError, ValueError, OverflowError):
        raise ValueError("cannot be sent to the server as BSON") from None
    if size > MAX_FILTER_BYTES:
        raise ValueError(f"takes {size:,} bytes as BSON, more than {MAX_FILTER_BYTES:,}: select with fewer, "
                         "shorter conditions (or mark the documents with a field and filter on it)")
    _check_filter(value)
    _check_top_level(value)
    return value


LOGICAL = ("$and", "$or", "$nor")  # top-level operators whose items are filters in turn
# The other operators a filter may start with ($where and $expr are refused above), as MongoDB and the embedded
# server both take them ($text needs a text index, which the server checks).
TOP_LEVEL_OPERATORS = {*LOGICAL, "$text", "$comment", "$jsonSchema"}


def _check_top_level(value: dict) -> None:
    """Refuses what every server refuses in a filter's shape, at the top of the filter or of an `$and`/`$or`/`$nor`
    item: an operator the server takes only under a field (`{$ne: null}`), or a logical operator not given a non-empty
    list of filters. Such a query fails at each read, which would fail a job again and again instead of once, at the
    parse, naming the field. What a server refuses further in (an operator's argument) is its to say, at the read."""
    for key, inner in value.items():
        if isinstance(key, str) and key.startswith("$") and key not in TOP_LEVEL_OPERATORS:
            raise ValueError(f"{key} applies to a field, not to the whole document: write {{field: {{{key}: ...}}}}")
        if key in LOGICAL:
            if not (isinstance(inner, list) and inner and all(isinstance(item, dict) for item in inner)):
                raise ValueError(f"{key} takes a non-empty list of filters, e.g. {{{key}: [{{a: 1}}, {{b: 2}}]}}")
            for item in inner:
                _check_top_level(item)


def _check_filter(value: Any) -> None:
    """Refuses a forbidden operator at any depth, the innermost first: `$expr` around `$function` is JavaScript."""
    if isinstance(value, dict):
        for key, inner in value.items():
            _check_filter(inner)
            if key in FORBIDDEN_OPERATORS:
                raise ValueError(f"{key} {FORBIDDEN_OPERATORS[key]} and is not allowed in a filter")
    elif isinstance(value, list):
        for inner in value:
            _check_filter(inner)


SFT, DPO, KTO = "sft", "dpo", "kto"  # what a model's runs train with (`ModelSpec.method`)
PREFERENCE_METHODS = (DPO, KTO)
# The loss types trl 1.16 accepts: DPOConfig.loss_type (one, or several combined) and KTOConfig.loss_type.
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
KTO_LOSSES = ("kto", "apo_zero_unpaired")
SMOOTHED_LOSSES = ("exo_pair", "robust", "aot", "aot_unpaired")  # the only losses trl 1.16 reads label_smoothing in
# The fields `data.key` names for each method, in order.
KEYS = {DPO: ("prompt", "chosen", "rejected"), KTO: ("prompt", "completion", "label")}
# Trainer names that apply to some methods only: given with another method, they are refused naming the field.
METHOD_ONLY = {
    **dict.fromkeys(("beta", "loss_type", "precompute_ref_log_probs"), PREFERENCE_METHODS), "label_smoothing": (DPO,),
    **dict.fromkeys(("desirable_weight", "undesirable_weight"), (KTO,)),
    # SFT's batch arrangements, and transformers' label smoothing, which only SFT's loss applies
    **dict.fromkeys(("packing", "dataset_text_field", "completion_only_loss", "assistant_only_loss", "padding_free",
                     "label_smoothing_factor"), (SFT,)),
}


class DataSpec(_Strict):
    collection: str = Field(min_length=1, max_length=255)
    filter: dict = Field(default_factory=dict)
    key: DataField | list[DataField] = "text"
    template: str | None = Field(default=None, max_length=10_000)
    transform: str | None = Field(default=None, min_length=1, max_length=200)
    fold_field: DataField = "_fold"
    valid_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    seed: int = 42
    limit: int | None = Field(default=None, gt=0)

    @field_validator("filter")
    @classmethod
    def _bounded(cls, value: dict) -> dict:
        return _bounded_filter(value)

    @field_validator("key")
    @classmethod
    def _key_shape(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) not in (2, 3):
            raise ValueError('a list key names two fields, the prompt and the response: ["prompt", "response"] (or, '
                             'for method dpo or kto, three: see `method`)')
        return value

    @field_validator("transform")
    @classmethod
    def _registered(cls, value: str | None) -> str | None:
        return value if value is None else _reported(transforms.check, value, KeyError)

    @model_validator(mode="after")
    def _one_way_to_shape(self) -> "DataSpec":
        if self.transform and self.template:
            raise SpecError("data.template", "give either a template or a transform, not both")
        return self

    @field_validator("template")
    @classmethod
    def _plain_template(cls, value: str | None) -> str | None:
        return value if value is None else _reported(template_fields, value, TemplateError)

    def read_fields(self) -> list[str]:
        """The fields the read projects, the fold last; none where a transform, which may read any field, gets whole
        documents."""
        if self.transform:
            return []
        fields = template_fields(self.template) if self.template else []
        fields += self.key if isinstance(self.key, list) else ([] if self.template else [self.key])
        return [*dict.fromkeys(fields), self.fold_field]


class ModelKwargs(_Strict):
    """What `from_pretrained` may get from a document; weights always load as safetensors."""

    dtype: Literal["float32", "float16", "bfloat16", "auto"] | None = None
    torch_dtype: Literal["float32", "float16", "bfloat16", "auto"] | None = None
    revision: str | None = Field(default=None, pattern=REVISION, max_length=100)
    subfolder: str | None = Field(default=None, pattern=PLAIN_NAME)
    gguf_file: str | None = Field(default=None, pattern=PLAIN_NAME)
    attn_implementation: Literal["eager", "sdpa"] | None = None
    low_cpu_mem_usage: bool | None = None
    use_cache: bool | None = None
    trust_remote_code: bool = False


class TokenizerKwargs(_Strict):
    """What `AutoTokenizer.from_pretrained` may get from a document."""

    revision: str | None = Field(default=None, pattern=REVISION, max_length=100)
    subfolder: str | None = Field(default=None, pattern=PLAIN_NAME)
    gguf_file: str | None = Field(default=None, pattern=PLAIN_NAME)
    use_fast: bool | None = None
    padding_side: Literal["left", "right"] | None = None
    truncation_side: Literal["left", "right"] | None = None
    model_max_length: int | None = Field(default=None, gt=0, le=1_000_000)
    add_bos_token: bool | None = None
    add_eos_token: bool | None = None
    trust_remote_code: bool = False


Steps = Annotated[int | float, Field(gt=0, le=10_000_000)]  # a count, or below 1 a fraction of the run


class FsdpConfig(_Strict):
    """FSDP settings a document may give (TrainingArguments.fsdp_config): no paths, no XLA, full state dicts only,
    since a checkpoint stored in GridFS must load whole on any host."""

    version: Literal[1, 2] | None = None
    reshard_after_forward: bool | None = None
    cpu_offload: bool | None = None
    activation_checkpointing: bool | None = None
    cpu_ram_efficient_loading: bool | None = None
    auto_wrap_policy: Literal["TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP"] | None = None
    transformer_layer_cls_to_wrap: list[Annotated[str, Field(pattern=FIELD_NAME)]] | None = Field(default=None,
                                                                                                   max_length=20)
    min_num_params: int | None = Field(default=None, ge=0, le=10**12)


class TrainingArgs(_Strict):
    """The TrainingArguments/SFTConfig names a document may set, each bounded; every other name is refused.

    A name a future transformers or trl release adds stays refused until it is listed here. Old names
    from earlier releases are accepted and translated by `training.arguments`.
    """

    num_train_epochs: float | None = Field(default=None, gt=0, le=10_000)
    max_steps: int | None = Field(default=None, ge=-1, le=2**62)
    per_device_train_batch_size: int | None = Field(default=None, ge=1)
    per_device_eval_batch_size: int | None = Field(default=None, ge=1)
    gradient_accumulation_steps: int | None = Field(default=None, ge=1, le=4096)
    learning_rate: float | None = Field(default=None, gt=0, le=10)
    weight_decay: float | None = Field(default=None, ge=0, le=10)
    adam_beta1: float | None = Field(default=None, ge=0, lt=1)
    adam_beta2: float | None = Field(default=None, ge=0, lt=1)
    adam_epsilon: float | None = Field(default=None, gt=0, le=1)
    max_grad_norm: float | None = Field(default=None, ge=0, le=1e6)
    lr_scheduler_type: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
        "cosine_with_min_lr", "warmup_stable_decay"] | None = None
    warmup_steps: Steps | None = None
    warmup_ratio: float | None = Field(default=None, ge=0, lt=1)
    logging_steps: Steps | None = None
    eval_steps: Steps | None = None
    save_steps: Steps | None = None
    logging_strategy: Literal["no", "steps", "epoch"] | None = None
    save_strategy: Literal["steps", "epoch"] | None = None  # never "no": a run that stores nothing has nothing to serve
    eval_strategy: Literal["no", "steps", "epoch"] | None = None
    evaluation_strategy: Literal["no", "steps", "epoch"] | None = None
    logging_first_step: bool | None = None
    save_total_limit: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    data_seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    bf16: bool | None = None
    fp16: bool | None = None
    tf32: bool | None = None
    optim: Literal[
        "adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop", "adamw_8bit", "adamw_bnb_8bit",
        "paged_adamw_8bit", "paged_adamw_32bit", "lion_8bit", "lion_32bit", "paged_lion_8bit"] | None = None
    activation_checkpointing: bool | None = None
    gradient_checkpointing: bool | None = None
    dataloader_num_workers: int | None = Field(default=None, ge=0)
    dataloader_drop_last: bool | None = None
    label_smoothing_factor: float | None = Field(default=None, ge=0, lt=1)
    neftune_noise_alpha: float | None = Field(default=None, ge=0, le=100)
    load_best_model_at_end: bool | None = None
    metric_for_best_model: Literal["loss", "eval_loss", "mean_token_accuracy", "eval_mean_token_accuracy"] | None = None
    greater_is_better: bool | None = None
    eval_on_start: bool | None = None
    use_cpu: bool | None = None
    no_cuda: bool | None = None
    max_length: int | None = Field(default=None, ge=1)
    max_seq_length: int | None = Field(default=None, ge=1)
    packing: bool | None = None
    dataset_text_field: str | None = Field(default=None, pattern=FIELD_NAME)
    completion_only_loss: bool | None = None
    assistant_only_loss: bool | None = None
    padding_free: bool | None = None  # unset: flat batches when the model keeps them apart (training.padding)
    # unset: grouped by length where batches stay padded, else random (training.padding.sampling)
    train_sampling_strategy: Literal["random", "sequential", "group_by_length"] | None = None
    dataset_num_proc: int | None = Field(default=None, ge=1)
    fsdp: bool | Literal["full_shard", "shard_grad_op", "full_shard auto_wrap", "shard_grad_op auto_wrap"] | None = None
    fsdp_config: FsdpConfig | None = None  # FSDP runs only with trainer.num_processes above 1 (training.ranks)
    # Preference trainers' names (trl's DPOConfig / KTOConfig): each applies to the methods `METHOD_ONLY` names.
    # beta 1e-3 at least: IPO divides by 2*beta, which overflows float32 (and the weights become NaN) near 1e-38
    beta: float | None = Field(default=None, ge=1e-3, le=100)
    loss_type: Literal[DPO_LOSSES + KTO_LOSSES] | list[Literal[DPO_LOSSES]] | None = None
    label_smoothing: float | None = Field(default=None, ge=0, lt=0.5)
    desirable_weight: float | None = Field(default=None, gt=0, le=100)
    undesirable_weight: float | None = Field(default=None, gt=0, le=100)
    precompute_ref_log_probs: bool | None = None
    # Accepted so the reference workflow's arguments work as copied, and ignored (see `warnings`).
    output_dir: str | None = Field(default=None, max_length=1000)
    overwrite_output_dir: bool | None = None

    @field_validator("max_steps")
    @classmethod
    def _some_steps(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("a run of zero steps trains nothing; give a positive number, or -1 to use num_train_epochs")
        return value


class ZeroOffload(_Strict):
    device: Literal["cpu", "none"]
    pin_memory: bool | None = None


AutoInt = Annotated[int, Field(ge=0, le=10**12)] | Literal["auto"]


class ZeroOptimization(_Strict):
    stage: int = Field(ge=0, le=3)
    offload_optimizer: ZeroOffload | None = None
    offload_param: ZeroOffload | None = None
    overlap_comm: bool | None = None
    contiguous_gradients: bool | None = None
    reduce_scatter: bool | None = None
    round_robin_gradients: bool | None = None
    reduce_bucket_size: AutoInt | None = None
    allgather_bucket_size: AutoInt | None = None
    sub_group_size: AutoInt | None = None
    stage3_prefetch_bucket_size: AutoInt | None = None
    stage3_param_persistence_threshold: AutoInt | None = None
    stage3_max_live_parameters: AutoInt | None = None
    stage3_max_reuse_distance: AutoInt | None = None
    stage3_gather_16bit_weights_on_model_save: bool | None = None


class Precision(_Strict):
    enabled: bool | Literal["auto"] = "auto"
    loss_scale: float | None = Field(default=None, ge=0, le=2**32)
    initial_scale_power: int | None = Field(default=None, ge=0, le=32)
    loss_scale_window: int | None = Field(default=None, ge=1, le=10**6)
    hysteresis: int | None = Field(default=None, ge=1, le=1000)
    min_loss_scale: float | None = Field(default=None, ge=0, le=2**32)


class DeepSpeedSpec(_Strict):
    """The DeepSpeed settings a document may give: no paths, no monitors, no profilers, no NVMe."""

    zero_optimization: ZeroOptimization = Field(default_factory=lambda: ZeroOptimization(stage=2))
    bf16: Precision | None = None
    fp16: Precision | None = None
    gradient_clipping: float | Literal["auto"] | None = None
    train_micro_batch_size_per_gpu: AutoInt | None = None
    gradient_accumulation_steps: AutoInt | None = None
    train_batch_size: AutoInt | None = None
    zero_allow_untested_optimizer: bool | None = None
    steps_per_print: int | None = Field(default=None, ge=1, le=10**9)


class TrainerSpec(TrainingArgs):
    """mongotune's own trainer fields beside the allowed TrainingArguments names.

    `lora_dropout` defaults to 0.0, peft's own default, not the reference workflow's 0.05: at 0.0 peft
    leaves the dropout module out of every adapted layer, and the dropout costs on every step. On this
    2-core CPU (SmolLM2-135M, r=8, batch 2, 128 tokens, one thread, two alternating pairs of 4 steps) it
    took 1.63-1.69 CPU s a step against 1.43-1.56 without, for the same training loss (3.016 against
    3.011); the issue's held-out run measured 53.7 s against 35.0 s for 30 steps. What it buys is
    regularization over many epochs of small data, which a document asks for with `lora_dropout: 0.05`.
    The value used is recorded in the run's entry (`runs[].arguments.trainer`).
    """

    use_lora: bool = True
    lora_r: int = Field(default=8, gt=0, le=1024)
    lora_alpha: int = Field(default=16, gt=0, le=65_536)
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    lora_target_modules: str | list[Annotated[str, Field(pattern=FIELD_NAME)]] = Field(default="all-linear", max_length=200)
    bits: Literal[4, 8] | None = None
    deepspeed: DeepSpeedSpec | None = None
    num_gpus: int = Field(default=1, ge=0, le=64)
    num_processes: int | None = Field(default=None, ge=1, le=64)  # per node; None: num_gpus, else 1 (training.ranks)
    num_nodes: int = Field(default=1, ge=1, le=64)  # daemons that run the job together (listener.gangs)
    early_stopping_patience: int | None = Field(default=None, ge=1, le=10_000)  # evaluations without improvement
    training_kwargs: TrainingArgs = Field(default_factory=TrainingArgs)

    @model_validator(mode="after")
    def _saves_weights(self) -> "TrainerSpec":
        """Full fine-tuning under ZeRO-3 leaves whole weights in a checkpoint only when they are gathered at save:
        without, no checkpoint could be stored, so the run is refused before it trains (`training.progress` still
        fails one that saved none)."""
        zero = self.deepspeed.zero_optimization if self.deepspeed is not None else None
        if not self.use_lora and zero and zero.stage == 3 and zero.stage3_gather_16bit_weights_on_model_save is False:
            raise SpecError("trainer.deepspeed.zero_optimization.stage3_gather_16bit_weights_on_model_save",
                            "full fine-tuning (use_lora: false) under ZeRO-3 saves whole weights only when this is "
                            "true (the default here), and a checkpoint without them cannot be stored: leave it out")
        return self

    def training_arguments(self) -> dict:
        """TrainingArguments names as the user wrote them, `training_kwargs` merged in."""
        own = self.model_dump(include=set(TrainingArgs.model_fields), exclude_unset=True)
        return {**own, **self.training_kwargs.model_dump(exclude_unset=True)}

    def field(self, name: str) -> str:
        """The field a TrainingArguments name was given as, to name in a refusal: inside `training_kwargs` when
        written there."""
        return f"trainer.training_kwargs.{name}" if name in self.training_kwargs.model_fields_set else f"trainer.{name}"


def _method_names(trainer: TrainerSpec, method: str) -> None:
    """Trainer names for another method are refused, never silently ignored."""
    for name in trainer.training_arguments():
        methods = METHOD_ONLY.get(name, (method,))
        if method not in methods:
            raise SpecError(trainer.field(name), f"applies to method {' or '.join(methods)} only, and this model's "
                            f"method is {method!r}: remove it")


def _data_key(data: "DataSpec", method: str) -> None:
    if method == SFT:
        if isinstance(data.key, list) and len(data.key) != 2:
            raise SpecError("data.key", 'for method sft a list key names two fields, the prompt and the response: '
                            '["prompt", "response"]')
        return
    shape = ", ".join(f'"{name}"' for name in KEYS[method])
    if not isinstance(data.key, list) or len(data.key) != 3:
        raise SpecError("data.key", f"method {method} reads three fields of each document, named in this order: "
                        f"[{shape}] (the names are your documents' field names)")
    for name in ("template", "transform"):
        if getattr(data, name) is not None:
            raise SpecError(f"data.{name}", f"applies to method sft only; method {method} reads the three fields "
                            "data.key names: remove it")


def _preference_trainer(trainer: TrainerSpec, method: str) -> None:
    """What trl's preference trainers would refuse, or trip on once training, refused before a run starts. Several
    processes, DeepSpeed (ZeRO-2 and 3) and FSDP run them as they run SFT (tried on the CPU, in one and two ranks)."""
    given = trainer.training_arguments()
    if given.get("train_sampling_strategy") == "group_by_length":  # transformers measures `input_ids` alone
        raise SpecError(trainer.field("train_sampling_strategy"), f"method {method}'s rows have no single length "
                        "to group by: give random or sequential")
    if method == KTO and "mean_token_accuracy" in (given.get("metric_for_best_model") or ""):
        raise SpecError(trainer.field("metric_for_best_model"), "method kto logs no token accuracy: give loss or "
                        "eval_loss")
    _loss_type(trainer, method, given)
    loss = given.get("loss_type")
    if method == KTO and loss != "apo_zero_unpaired":  # KTO's KL term pairs each example with its batch neighbours
        if given.get("per_device_train_batch_size") == 1:
            raise SpecError(trainer.field("per_device_train_batch_size"), "method kto estimates its KL term within "
                            "a batch: give at least 2 (or loss_type apo_zero_unpaired)")
        if given.get("train_sampling_strategy", "sequential") != "sequential":
            raise SpecError(trainer.field("train_sampling_strategy"), "method kto estimates its KL term from "
                            "neighbours in a batch of fixed order: leave it out or give sequential (or loss_type "
                            "apo_zero_unpaired)")


def _loss_type(trainer: TrainerSpec, method: str, given: dict) -> None:
    """One of the method's losses, or (DPO) a list of distinct ones; label_smoothing only where the loss reads it,
    and above 0 where trl requires it (exo_pair)."""
    loss = given.get("loss_type")
    losses = loss if isinstance(loss, list) else [loss or ("kto" if method == KTO else "sigmoid")]
    allowed = KTO_LOSSES if method == KTO else DPO_LOSSES
    if not losses or len(set(losses)) != len(losses) or any(item not in allowed for item in losses):
        raise SpecError(trainer.field("loss_type"), f"method {method} takes one of {', '.join(allowed)}"
                        + (" (or a list of distinct ones, combined with equal weights)" if method == DPO else ""))
    smoothing = given.get("label_smoothing")
    if smoothing is not None and not set(losses) & set(SMOOTHED_LOSSES):
        raise SpecError(trainer.field("label_smoothing"), f"only the losses {', '.join(SMOOTHED_LOSSES)} read it, "
                        f"and this model's loss_type is {', '.join(losses)}: remove it, or choose one of those losses")
    if "exo_pair" in losses and not smoothing:
        raise SpecError(trainer.field("label_smoothing"), "loss_type exo_pair needs a label_smoothing above 0 "
                        "(its paper suggests 0.001)")


def check_method(spec: "ModelSpec") -> None:
    """The data shape and trainer names fit the model's `method`; SpecError naming the field otherwise."""
    _data_key(spec.data, spec.method)
    _method_names(spec.trainer, spec.method)
    if spec.method in PREFERENCE_METHODS:
        _preference_trainer(spec.trainer, spec.method)


def _gate_fits(promotion: "Promotion", spec: "ModelSpec") -> None:
    """The metric is one the model's method's gate judges by (its default filled in): a feedback run of an sft model
    is judged by the same metric, on its forgetting guard's documents. The loss guard is for a model with preference
    runs (its own or its feedback's), and only under a metric that does not already keep any rise of that loss."""
    method, allowed = spec.method, gate_metrics(spec.method)
    if promotion.metric is None:
        promotion.metric = allowed[0]
    elif promotion.metric not in allowed:
        also = " (its feedback runs are judged by the same metric)" if spec.feedback is not None else ""
        raise SpecError("promotion.metric", f"method {method}'s gate scores {', '.join(allowed)}, not "
                        f"{promotion.metric}{also}")
    preferences = {method, spec.feedback.method if spec.feedback else method} & set(PREFERENCE_METHODS)
    guards_itself = not GATE_METRICS[promotion.metric].higher_is_better  # a lower loss or perplexity: no rise passes
    if promotion.max_eval_loss_rise is not None and not preferences:
        raise SpecError("promotion.max_eval_loss_rise", "guards a preference run's held-out SFT loss, and this model "
                        "has no preference runs (method sft, no feedback); its gate scores that loss itself: remove "
                        "it, or give metric eval_loss and a min_delta")
    if promotion.max_eval_loss_rise is not None and guards_itself:
        raise SpecError("promotion.max_eval_loss_rise", f"metric {promotion.metric} already keeps a candidate whose "
                        "held-out loss rose at all, so no allowance applies: remove it, or choose a metric where "
                        "higher is better")
    if preferences and not guards_itself and promotion.max_eval_loss_rise is None:
        promotion.max_eval_loss_rise = MAX_EVAL_LOSS_RISE


def _plain_id(value):
    return _reported(ids.check, value, ids.BadId)


PlainId = Annotated[Any, AfterValidator(_plain_id)]  # a model's id: a value, never a pattern or a document


class CheckpointRef(_Strict):
    run: int = Field(ge=1, le=2**31)
    step: int = Field(ge=0, le=2**62)


class GateMetric(typing.NamedTuple):
    higher_is_better: bool
    methods: tuple[str, ...]  # the model methods whose gate may judge by it


# What `promotion.metric` may name: a preference run's scores of held-out pairs or labelled examples, and SFT's scores
# of held-out documents (a preference run measures `eval_loss` on its forgetting guard's). A method's default is the
# first here that it may name.
GATE_METRICS = {"preference_accuracy": GateMetric(True, PREFERENCE_METHODS),
                "reward_margin": GateMetric(True, PREFERENCE_METHODS),
                "eval_loss": GateMetric(False, (SFT, *PREFERENCE_METHODS)),
                "eval_perplexity": GateMetric(False, (SFT,)),
                "eval_mean_token_accuracy": GateMetric(True, (SFT,))}


def gate_metrics(method: str) -> tuple[str, ...]:
    """What `method`'s gate may judge by, its default first."""
    return tuple(name for name, metric in GATE_METRICS.items() if method in metric.methods)


MAX_EVAL_LOSS_RISE = 0.05  # nats a token: a preference run may raise the held-out loss by e^0.05, about 5% perplexity


class Promotion(_Strict):
    """When a finished run replaces the serving checkpoint: only if it is better by at least `min_delta`. `metric`
    defaults to the method's first (`gate_metrics`); `max_eval_loss_rise` (a model with preference runs, under a
    metric where higher is better) keeps a candidate whose held-out SFT loss rose above the serving one's by more,
    whatever its metric says."""

    metric: Literal[tuple(GATE_METRICS)] | None = None
    min_delta: float = Field(default=0.0, ge=0, le=1e6)
    max_eval_loss_rise: float | None = Field(default=None, ge=0, le=1e3)


class InitFrom(_Strict):
    """Start from another model's adapter (same base, same database): its `best`, `latest` or `{run, step}`."""

    model: PlainId
    checkpoint: Literal["best", "latest"] | CheckpointRef = "best"


class RetrainSpec(_Strict):
    """When the daemons start a new run by themselves (`listener.retrain`); either trigger, or both.

    `on_new_documents`: after that many inserts matching `data.filter` since the last run started.
    `schedule`: a cron expression in UTC (`training.schedule`). `from`: what a retrain continues from.
    """

    on_new_documents: int | None = Field(default=None, ge=1, le=10**9)
    schedule: str | None = Field(default=None, min_length=1, max_length=200)
    from_: Literal["best", "base"] = Field(default="best", alias="from")

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        return value if value is None else _reported(schedule.trigger, value, schedule.ScheduleError)


class FeedbackSpec(_Strict):
    """Preference runs from the ratings of this model's own answers (`listener.feedback`, `training.feedback`).

    `every`: a run starts once that many new ratings were written since the last run started. `filter` narrows
    whose ratings count: a filter on `_requests`, always ANDed with this model's own done requests."""

    method: Literal["kto", "dpo"]
    every: int = Field(ge=1, le=10**6)
    filter: dict = Field(default_factory=dict)

    @field_validator("filter")
    @classmethod
    def _bounded(cls, value: dict) -> dict:
        return _bounded_filter(value)


def check_feedback_trainer(spec: "ModelSpec") -> None:
    """A feedback run trains with the model's trainer and `feedback.method`: its names must fit that method too."""
    if spec.feedback is None or spec.feedback.method == spec.method:
        return
    try:
        _method_names(spec.trainer, spec.feedback.method)
        _preference_trainer(spec.trainer, spec.feedback.method)
    except SpecError as exc:
        raise SpecError(exc.field, f"feedback runs train with method {spec.feedback.method} and this trainer: "
                        f"{exc.message}") from None


class Feedback(_Strict):
    """A rating a driver wrote on a done request (`feedback`), as a feedback run reads it: a number in [-1, 1]
    whose sign says good or bad (0 is neutral), and perhaps a better answer. Never parsed when the request is
    served: a wrong shape is skipped by the run that reads it, and fails nothing."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    rating: float = Field(ge=-1, le=1)
    better: str | None = Field(default=None, min_length=1)


def parse_feedback(value, limits: Limits) -> Feedback:
    """A request's `feedback`; ValueError (its reason) when it is not of the shape a run reads. `better` is
    bounded like an input (`max_input_chars`)."""
    if not isinstance(value, dict):
        raise ValueError("feedback is not an object")
    if isinstance(value.get("rating"), bool):
        raise ValueError("feedback.rating: input should be a valid number")
    try:
        parsed = Feedback.model_validate(value)
    except ValidationError as exc:
        err = exc.errors()[0]  # its message never quotes the value; an unknown field's name (anyone's) is left out
        if err["type"] == "extra_forbidden":
            raise ValueError("feedback has fields other than rating and better") from None
        raise ValueError(f"feedback.{err['loc'][0]}: {err['msg'].lower()}") from None
    if parsed.better is not None and len(parsed.better) > limits.max_input_chars:
        raise ValueError("feedback.better is longer than an input may be")
    return parsed


class ModelSpec(_Strict):
    id: PlainId = Field(alias="_id")
    model_name_or_path: str = Field(min_length=1, max_length=1000)
    model_kwargs: ModelKwargs = Field(default_factory=ModelKwargs)
    tokenizer_kwargs: TokenizerKwargs = Field(default_factory=TokenizerKwargs)
    data: DataSpec
    trainer: TrainerSpec = Field(default_factory=TrainerSpec)
    description: str | None = Field(default=None, max_length=10_000)
    cancel: bool = False
    promotion: Promotion | Literal[False] = Field(default_factory=Promotion)  # false: every finished run serves
    init_from: InitFrom | None = None
    retrain: RetrainSpec | None = None
    method: Literal["sft", "dpo", "kto"] = SFT  # what the runs train with: trl's SFT, DPO or KTO trainer
    feedback: FeedbackSpec | None = None

    @model_validator(mode="after")
    def _fits_method(self) -> "ModelSpec":
        check_method(self)
        check_feedback_trainer(self)
        if self.promotion is not False:
            _gate_fits(self.promotion, self)
        return self

    def warnings(self) -> list[str]:
        """Settings accepted for compatibility but not used, and why: written to the document at claim."""
        given = self.trainer.training_arguments()
        return [f"trainer.{name}: {why}" for name, why in IGNORED.items() if name in given]


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class GenerationParams(_Strict):
    max_new_tokens: int = Field(default=128, gt=0)
    temperature: float | None = Field(default=None, gt=0.0, le=10.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, gt=0, le=100_000)
    do_sample: bool | None = None
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)


MAX_REQUEST_ID_BYTES = 1024  # a claim lists a batch's ids in one command, which the server caps at 16 MB


def check_request_id(value):
    """A request's id, any BSON type, if it is small; SpecError naming `_id` otherwise."""
    try:
        size = len(bson.encode({"_id": value}))
    except (bson.errors.BSONError, TypeError, ValueError, OverflowError):
        raise SpecError("_id", "cannot be written back as BSON") from None
    if size > MAX_REQUEST_ID_BYTES:
        raise SpecError("_id", f"takes {size:,} bytes as BSON, more than {MAX_REQUEST_ID_BYTES:,}: use an ObjectId "
                        "(the default), a number or a short string")
    return value


def _request_id(value):
    try:
        return check_request_id(value)
    except SpecError as exc:
        raise ValueError(exc.message) from None


class RequestSpec(_Strict):
    id: Annotated[Any, AfterValidator(_request_id)] = Field(alias="_id")
    model: PlainId
    input: str | list[Message]
    params: GenerationParams = Field(default_factory=GenerationParams)
    checkpoint: Literal["best", "latest", "base"] | CheckpointRef = "best"
    cancel: bool = False
    stream: bool = False  # `output` grows in place while generating; `done` and `usage` come last
    timeout_s: float | None = Field(default=None, ge=1, le=86_400)  # generation time; the operator's cap still holds
    # Predictions over a collection (listener.batch_predictions): `input` names a field or is a "{field}" template.
    collection: str | None = Field(default=None, min_length=1, max_length=255)
    filter: dict | None = None
    output_field: str | None = Field(default=None, pattern=FIELD_PATH, max_length=200)
    watch: bool = False
    # Written by any driver once the request is done (`Feedback`): accepted as anything here, so that no shape of
    # it ever fails the request; a feedback run parses it when it reads it.
    feedback: Any = None

    @field_validator("filter")
    @classmethod
    def _bounded(cls, value: dict | None) -> dict | None:
        return value if value is None else _bounded_filter(value)

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value: str | list[Message]) -> str | list[Message]:
        if not value:
            raise ValueError("give the text, or at least one {role, content} message")
        return value

    def prompt_chars(self) -> int:
        return len(self.input) if isinstance(self.input, str) else sum(len(m.content) for m in self.input)


def _real_path(loc: tuple, document: dict, missing: bool) -> list:
    """The part of a pydantic error location that exists in the document (drops union branch names)."""
    path, current = [], document
    for i, part in enumerate(loc):
        if isinstance(current, dict) and part in current:
            current = current[part]
        elif isinstance(current, list) and isinstance(part, int) and part < len(current):
            current = current[part]
        elif not (missing and i == len(loc) - 1):
            continue
        path.append(part)
    return path


def _first_error(exc: ValidationError, document: dict) -> SpecError:
    """The most specific problem: the error reaching deepest into the document."""
    errors = exc.errors()
    paths = [_real_path(err["loc"], document, err["type"] == "missing") for err in errors]
    index = max(range(len(errors)), key=lambda i: len(paths[i]))
    err = errors[index]
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        name = str(paths[index][-1]) if paths[index] else ""
        close = difflib.get_close_matches(name, KNOWN_NAMES, n=1, cutoff=0.75)
        message = NOT_FROM_DOCUMENTS.get(name) or (f"unknown field; did you mean {close[0]!r}?" if close else
                                                   "unknown field; remove it or check its spelling")
    elif err["type"] == "missing":
        message = "required field is missing"
    elif err["type"] == "string_pattern_mismatch":
        message = PATTERN_HINTS.get(err["ctx"]["pattern"], message)
    return SpecError(".".join(str(part) for part in paths[index]), message)


def _field_names(model: type[BaseModel]) -> set[str]:
    names = set(model.model_fields)
    for field in model.model_fields.values():
        for inner in typing.get_args(field.annotation) or (field.annotation,):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                names |= _field_names(inner)
    return names


KNOWN_NAMES = sorted(_field_names(ModelSpec) | _field_names(RequestSpec))
# Names people copy from tutorials that a document may never set, with the reason to show.
NOT_FROM_DOCUMENTS = {
    "push_to_hub": "cannot be set in a document: checkpoints go to GridFS",
    "hub_token": "cannot be set in a document: credentials never belong in a document",
    "hub_model_id": "cannot be set in a document: checkpoints go to GridFS",
    "report_to": "cannot be set in a document: metrics go to the model document",
    "logging_dir": "cannot be set in a document: logs go to the model document",
    "resume_from_checkpoint": "cannot be set in a document: the listener resumes from the last checkpoint in GridFS",
    "use_safetensors": "cannot be set in a document: weights are always loaded as safetensors",
    "chat_template": "cannot be set in a document: the chat template comes with the model",
}


MAX_DEPTH = 100  # levels of objects and arrays in one document: what MongoDB itself stores at most


def too_deep(field: str) -> SpecError:
    return SpecError(field, f"nested deeper than the listener reads: at most {MAX_DEPTH} levels of objects and "
                            "arrays (MongoDB's own limit)")


def check_depth(document: dict) -> None:
    """SpecError naming the top-level field nested past `MAX_DEPTH` levels. Another server (the embedded one) may
    store such a document where MongoDB refuses it; every reader after this one (pydantic, the driver, a
    worker's JSON) recurses over it. Level by level, so this check itself never recurses."""
    for field, value in document.items():
        level, depth = [value], 1
        while level := [inner for item in level if isinstance(item, (dict, list))
                        for inner in (item.values() if isinstance(item, dict) else item)]:
            depth += 1
            if depth > MAX_DEPTH:
                raise too_deep(field)


def _parse(cls: type[BaseModel], document: dict):
    if not isinstance(document, dict):
        raise SpecError("", "a document must be an object")
    check_depth(document)
    user_part = {k: v for k, v in document.items() if k not in LISTENER_FIELDS}
    try:
        return cls.model_validate(user_part)
    except SpecError:
        raise
    except ValidationError as exc:
        raise _first_error(exc, user_part) from None


def parse_model(document: dict, limits: Limits = Limits()) -> ModelSpec:
    """The model document as one validated object, within the operator's `limits`."""
    spec = _parse(ModelSpec, document)
    check_model(spec, limits)
    return spec


def parse_request(document: dict, limits: Limits = Limits()) -> RequestSpec:
    spec = _parse(RequestSpec, document)
    check_request(spec, limits)
    return spec


def _cap(limits: Limits, field: str, name: str, asked) -> None:
    if asked is not None and asked > getattr(limits, name):
        raise SpecError(field, limits.refusal(name, asked))


def check_model(spec: ModelSpec, limits: Limits) -> None:
    """The operator's caps on a model document; each refusal names the field, the cap and its setting."""
    args = spec.trainer.training_arguments()
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size"):
        _cap(limits, f"trainer.{name}", "max_batch_size", args.get(name))
    for name in ("max_length", "max_seq_length"):
        _cap(limits, f"trainer.{name}", "max_seq_length", args.get(name))
    _cap(limits, "trainer.max_steps", "max_steps", args.get("max_steps"))
    _cap(limits, "trainer.save_total_limit", "max_checkpoints", args.get("save_total_limit"))
    _cap(limits, "trainer.dataloader_num_workers", "max_dataloader_workers", args.get("dataloader_num_workers"))
    _cap(limits, "trainer.dataset_num_proc", "max_processes", args.get("dataset_num_proc"))
    _cap(limits, "trainer.num_gpus", "max_processes", spec.trainer.num_gpus)
    _cap(limits, "trainer.num_processes", "max_processes", spec.trainer.num_processes)
    _cap(limits, "trainer.num_nodes", "max_nodes", spec.trainer.num_nodes)
    _cap(limits, "data.limit", "max_documents", spec.data.limit)
    if spec.feedback is not None:
        _cap(limits, "feedback.every", "max_feedback_rows", spec.feedback.every)
    if spec.init_from is not None and not limits.allow_init_from:
        raise SpecError("init_from", "starting from another model's adapter is off on this listener; remove "
                        f"init_from, or the operator enables it with {Limits.setting('allow_init_from')}=1")
    if not limits.trust_remote_code:
        for section in ("model_kwargs", "tokenizer_kwargs"):
            if getattr(spec, section).trust_remote_code:
                raise SpecError(f"{section}.trust_remote_code", "running a model's own code is off; the operator "
                                f"enables it with {Limits.setting('trust_remote_code')}=1")
    check_collection(spec.data.collection, limits)
    check_source(spec.model_name_or_path, limits)
    check_retrain(spec.retrain, limits)  # last: a schedule's check costs CPU, the others next to none


def check_retrain(retrain: RetrainSpec | None, limits: Limits) -> None:
    """A retrain may not ask for more documents than a run may read, nor fire more often than the operator allows."""
    if retrain is None:
        return
    _cap(limits, "retrain.on_new_documents", "max_documents", retrain.on_new_documents)
    if retrain.schedule is not None:
        try:
            schedule.check(retrain.schedule, limits.min_retrain_interval_s)
        except schedule.ScheduleError as exc:
            raise SpecError("retrain.schedule", f"{exc} (the operator sets the minimum with "
                            f"{Limits.setting('min_retrain_interval_s')})") from None


def check_request(spec: RequestSpec, limits: Limits) -> None:
    _cap(limits, "params.max_new_tokens", "max_new_tokens", spec.params.max_new_tokens)
    _cap(limits, "input", "max_input_chars", spec.prompt_chars())
    if isinstance(spec.input, list):
        _cap(limits, "input", "max_messages", len(spec.input))
    if spec.collection is None:
        given = [name for name in ("filter", "output_field", "watch") if getattr(spec, name) not in (None, False)]
        if given:
            raise SpecError(given[0], "only for predictions over a collection; name the collection too")
        return
    try:
        check_collection(spec.collection, limits)
    except SpecError as exc:
        raise SpecError("collection", exc.message) from None
    if spec.output_field is None:
        raise SpecError("output_field", "a request over a `collection` names the field each document's answer is written to")
    if spec.stream:
        raise SpecError("stream", "predictions over a collection write each answer once; leave stream out")
    if not isinstance(spec.input, str) or not input_fields(spec.input):
        raise SpecError("input", 'name the field to answer, or write a template such as "{title}: {body}"')
    roots = {name.split(".")[0] for name in input_fields(spec.input)}
    if spec.output_field.split(".")[0] in roots | {"_id"}:
        raise SpecError("output_field", "must differ from the input fields and _id, or answers would feed themselves")
    if not any(fnmatch.fnmatchcase(spec.collection, pattern) for pattern in limits.answer_collections):
        raise SpecError("collection", "answers may not be written into this collection: reading it for training "
                        "grants no writes; the operator lists the collections answers may be written into with "
                        f"{Limits.setting('answer_collections')}")


def input_fields(text: str) -> list[str]:
    """The fields a collection request reads: its "{field}" placeholders, or the one field it names."""
    names = TEMPLATE_FIELD.findall(text)
    return names if names else [text] if re.fullmatch(FIELD_PATH, text) else []


# The listener's own collections (and its GridFS bucket's) and the server's: never a document's data.
LISTENER_COLLECTIONS = frozenset({defaults.MODELS, defaults.REQUESTS, defaults.LISTENER, defaults.CHECKPOINTS})
RESERVED_PREFIXES = (defaults.CHECKPOINTS + ".", "system.")
# What a document's collection may be: a view runs its own pipeline (a `$lookup` into `_requests` included)
# with the daemon's rights, so it is never read or written on a document's behalf.
COLLECTION_TYPES = ("collection", "timeseries")


def reserved_collection(name: str) -> bool:
    """One of the listener's or the server's collections, which no operator pattern opens to documents."""
    return name in LISTENER_COLLECTIONS or name.startswith(RESERVED_PREFIXES)


def collection_allowed(name: str, limits: Limits) -> bool:
    """Whether a document may train on collection `name`: one the operator lists, else not `_*` or `system.*`;
    never ours or the server's."""
    if reserved_collection(name):
        return False
    if limits.collections:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in limits.collections)
    return not name.startswith("_")


def check_collection(name: str, limits: Limits) -> None:
    """Only collections the operator lets documents train on: never the listener's or the server's."""
    if "$" in name or "\0" in name or name.startswith("."):
        raise SpecError("data.collection", "not a valid collection name")
    if reserved_collection(name):
        raise SpecError("data.collection", "is one of the listener's or the server's own collections, which documents "
                        "never read or write")
    if not collection_allowed(name, limits):
        raise SpecError("data.collection", "documents may not train on this collection; the operator lists the ones "
                        f"they may with {Limits.setting('collections')}")


UNCHECKED = object()  # check_collection_type's `same_as` when any collection will do


def check_collection_type(listed: list[dict], field: str, same_as=UNCHECKED):
    """What `listCollections` says of the collection a document names (nothing: it does not exist yet) must be a
    collection: checked where the daemon reads or writes it, since a view may be created under any name. Returns
    its UUID (None while there is none), which must be `same_as` when given: checked before and after a read, it
    tells that the name named one collection throughout, never a view swapped in meanwhile."""
    for info in listed:
        if info.get("type") not in COLLECTION_TYPES:
            raise SpecError(field, f"is a {info.get('type') or 'namespace of unknown type'}; documents may name "
                            "collections only, never a view")
    found = (listed[0].get("info") or {}).get("uuid") if listed else None
    if same_as is not UNCHECKED and found != same_as:
        raise SpecError(field, "was dropped, renamed or replaced while the listener read it; submit it again")
    return found


HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?")


def is_hub_id(source: str) -> bool:
    return bool(HUB_ID.fullmatch(source)) and ".." not in source


def check_source(source: str, limits: Limits) -> None:
    """A hub id the operator allows, or a folder under one of the operator's model roots, outside the listener's own."""
    field = "model_name_or_path"
    if os.path.isabs(source):
        if not source.isprintable() or not in_model_root(source, limits):
            raise SpecError(field, "this is not a folder under a model root the operator allows; the operator adds "
                            f"roots with {Limits.setting('model_roots')} or --model-root")
        return
    if not is_hub_id(source):
        raise SpecError(field, "give a Hugging Face Hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct' or an "
                        "absolute folder path under a model root the operator allows")
    if not any(fnmatch.fnmatchcase(source, pattern) for pattern in limits.hub_models):
        raise SpecError(field, f"the operator does not allow this hub model; allowed: {', '.join(limits.hub_models)} "
                        f"({Limits.setting('hub_models')})")


def in_model_root(path, limits: Limits) -> bool:
    """Whether `path`, links followed, lies under a model root and under none of the listener's own folders."""
    resolved = os.path.realpath(path)
    return (any(_within(resolved, root) for root in limits.model_roots)
            and not any(_within(resolved, root) for root in limits.private_roots))


def _within(path: str, root) -> bool:
    root = os.path.realpath(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)
