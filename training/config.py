"""The documents users write, parsed once into validated, typed objects.

`ModelSpec` is a `_models` document and `RequestSpec` a `_requests` document. Parsing either
raises `SpecError` naming the field and saying what to change; nothing downstream re-checks.
Trainer argument names are checked against trl's `SFTConfig` in `training.arguments`, where trl
is imported anyway.
"""

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from listener import defaults
from training import transforms
from training.template import TemplateError, template_fields

# Written by the listener; present on documents it has touched, never part of the user's definition.
LISTENER_FIELDS = frozenset({
    "status", "run", "attempts", "progress", "metrics", "checkpoints", "best_checkpoint", "error",
    "lease", "created_at", "started_at", "finished_at", "output", "usage", "latency_ms",
    "completed_at", "history", "checkpoint_used", "batch_size",
})
# Server-side JavaScript: a real MongoDB would run it, so a user-supplied filter may not hold it.
FORBIDDEN_OPERATORS = frozenset({"$where", "$function", "$accumulator"})
ENV_TRUST_REMOTE_CODE = "MONGOTUNE_TRUST_REMOTE_CODE"  # operator's opt-in, never a document's


class SpecError(Exception):
    """A document that cannot be used as written: `field` is the dotted path to fix."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message

    def as_error(self) -> dict:
        return {"type": "invalid_document", "field": self.field, "message": str(self)}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


def _check_filter(value: Any, path: str = "data.filter") -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            if key in FORBIDDEN_OPERATORS:
                raise ValueError(f"{key} runs JavaScript on the server and is not allowed in a filter")
            _check_filter(inner, path)
    elif isinstance(value, list):
        for inner in value:
            _check_filter(inner, path)


class DataSpec(_Strict):
    collection: str = Field(min_length=1, max_length=255)
    filter: dict = Field(default_factory=dict)
    key: str | list[str] = "text"
    template: str | None = Field(default=None, max_length=10_000)
    transform: str | None = Field(default=None, min_length=1, max_length=200)
    fold_field: str = Field(default="_fold", min_length=1)
    valid_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    seed: int = 42
    limit: int | None = Field(default=None, gt=0)

    @field_validator("filter")
    @classmethod
    def _no_javascript(cls, value: dict) -> dict:
        _check_filter(value)
        return value

    @field_validator("key")
    @classmethod
    def _key_shape(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and (len(value) != 2 or not all(value)):
            raise ValueError('a list key names two fields, the prompt and the response: ["prompt", "response"]')
        if isinstance(value, str) and not value:
            raise ValueError('name the field holding the text, e.g. "text" or "messages"')
        return value

    @field_validator("transform")
    @classmethod
    def _registered(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                transforms.check(value)
            except KeyError as exc:
                raise ValueError(exc.args[0]) from None
        return value

    @model_validator(mode="after")
    def _one_way_to_shape(self) -> "DataSpec":
        if self.transform and self.template:
            raise SpecError("data.template", "give either a template or a transform, not both")
        return self

    @field_validator("template")
    @classmethod
    def _plain_template(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                template_fields(value)
            except TemplateError as exc:
                raise ValueError(str(exc)) from None
        return value


class TrainerSpec(BaseModel):
    """mongotune's own trainer fields; every other name is a TrainingArguments/SFTConfig name."""

    model_config = ConfigDict(extra="allow", strict=True)

    use_lora: bool = True
    lora_r: int = Field(default=8, gt=0, le=1024)
    lora_alpha: int = Field(default=16, gt=0)
    lora_dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    lora_target_modules: str | list[str] = "all-linear"
    bits: Literal[4, 8] | None = None
    deepspeed: dict | None = None
    num_gpus: int = Field(default=1, ge=0, le=64)
    training_kwargs: dict = Field(default_factory=dict)

    def training_arguments(self) -> dict:
        """TrainingArguments names as the user wrote them, `training_kwargs` merged in."""
        return {**(self.model_extra or {}), **self.training_kwargs}


class ModelSpec(_Strict):
    id: Any = Field(alias="_id")
    model_name_or_path: str = Field(min_length=1, max_length=1000)
    model_kwargs: dict = Field(default_factory=dict)
    tokenizer_kwargs: dict = Field(default_factory=dict)
    data: DataSpec
    trainer: TrainerSpec = Field(default_factory=TrainerSpec)
    description: str | None = None
    cancel: bool = False

    @model_validator(mode="after")
    def _no_remote_code(self) -> "ModelSpec":
        if os.environ.get(ENV_TRUST_REMOTE_CODE) != "1":
            for name in ("model_kwargs", "tokenizer_kwargs"):
                if getattr(self, name).get("trust_remote_code"):
                    raise SpecError(
                        f"{name}.trust_remote_code",
                        f"running a model's own code is off; the operator enables it with {ENV_TRUST_REMOTE_CODE}=1",
                    )
        return self


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=defaults.MAX_INPUT_CHARS)


class GenerationParams(_Strict):
    max_new_tokens: int = Field(default=128, gt=0, le=defaults.MAX_NEW_TOKENS)
    temperature: float | None = Field(default=None, gt=0.0, le=10.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, gt=0)
    do_sample: bool | None = None
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)


class CheckpointRef(_Strict):
    run: int = Field(ge=1)
    step: int = Field(ge=0)


class RequestSpec(_Strict):
    id: Any = Field(alias="_id")
    model: Any
    input: str | list[Message] = Field(max_length=defaults.MAX_MESSAGES)
    params: GenerationParams = Field(default_factory=GenerationParams)
    checkpoint: Literal["best", "latest", "base"] | CheckpointRef = "best"
    cancel: bool = False

    @field_validator("input")
    @classmethod
    def _bounded(cls, value: str | list[Message]) -> str | list[Message]:
        if isinstance(value, str) and not 0 < len(value) <= defaults.MAX_INPUT_CHARS:
            raise ValueError(f"give between 1 and {defaults.MAX_INPUT_CHARS} characters")
        if isinstance(value, list) and not value:
            raise ValueError("give at least one {role, content} message")
        if isinstance(value, list) and sum(len(m.content) for m in value) > defaults.MAX_INPUT_CHARS:
            raise ValueError(f"the messages hold more than {defaults.MAX_INPUT_CHARS} characters in all; shorten them")
        return value


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
        message = "unknown field; remove it or check its spelling"
    elif err["type"] == "missing":
        message = "required field is missing"
    return SpecError(".".join(str(part) for part in paths[index]), message)


def _parse(cls: type[BaseModel], document: dict):
    if not isinstance(document, dict):
        raise SpecError("", "a document must be an object")
    user_part = {k: v for k, v in document.items() if k not in LISTENER_FIELDS}
    try:
        return cls.model_validate(user_part)
    except SpecError:
        raise
    except ValidationError as exc:
        raise _first_error(exc, user_part) from None


def parse_model(document: dict) -> ModelSpec:
    return _parse(ModelSpec, document)


def parse_request(document: dict) -> RequestSpec:
    return _parse(RequestSpec, document)
