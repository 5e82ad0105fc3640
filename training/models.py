"""Loading a base model and tokenizer as a document describes them, for training or for serving.

Every load asks for safetensors, checks the model's size from its configuration before any weight
is allocated, and reads only from where the operator allows (`training.limits.Limits`).
"""

import fnmatch
import functools
import importlib.util
import logging
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from training.config import ModelKwargs, ModelSpec, SpecError, TokenizerKwargs, check_source, in_model_root, is_hub_id
from training.limits import Limits
from training.offline import dequantize

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "auto": "auto"}


HUB_FILES = ("*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken")  # configuration and tokenizer files, any depth


def resolve_source(spec: ModelSpec, limits: Limits, section: ModelKwargs | TokenizerKwargs | None = None) -> str:
    """The absolute folder to load from: under a model root, or a hub id's snapshot in the hub cache.

    transformers loads a name that is a folder under the working directory before it asks the hub, so
    a hub id never reaches it as written; a hub id found in a model root (converted or downloaded
    once) is used offline.
    """
    source = spec.model_name_or_path
    check_source(source, limits)
    if not is_hub_id(source):
        return os.path.realpath(source)
    for root in limits.model_roots:
        for candidate in (Path(root) / source, Path(root) / source.rsplit("/", 1)[-1]):
            if (candidate / "config.json").is_file() and in_model_root(candidate, limits):
                return os.path.realpath(candidate)
    return _hub_snapshot(source, section or spec.model_kwargs, limits)


def _hub_snapshot(source: str, section: ModelKwargs | TokenizerKwargs, limits: Limits) -> str:
    """The snapshot folder of a hub id, sized before it is fetched; offline, what the hub cache holds."""
    return _snapshot(source, section.revision, tuple(hub_files(section)), limits)


@functools.lru_cache(maxsize=32)
def _snapshot(source: str, revision: str | None, wanted: tuple[str, ...], limits: Limits) -> str:
    """Once per process and hub model: a job resolves its source for the size check, the model, the tokenizer
    and its lineage, and each resolution would otherwise ask the hub twice (sizes, then the snapshot)."""
    from huggingface_hub import snapshot_download

    hub = _hub_kwargs(source, limits)
    sized = check_download(source, revision, limits, hub, list(wanted))
    try:
        return snapshot_download(source, revision=revision, allow_patterns=list(wanted), local_files_only=not sized,
                                 **hub)
    except Exception as exc:  # offline and not cached, unknown, unreachable: any of a dozen hub errors
        raise _cannot_load(source, exc) from None


def hub_files(section: ModelKwargs | TokenizerKwargs) -> list[str]:
    """The patterns of the files fetched for a hub model: configuration, tokenizer, safetensors weights, the one
    GGUF file named, and Python only where its code may run."""
    prefix = f"{section.subfolder}/" if section.subfolder else ""
    return [*HUB_FILES, f"{prefix}model.safetensors", f"{prefix}model-*-of-*.safetensors",
            *([f"{prefix}{section.gguf_file}"] if section.gguf_file else []),
            *(["*.py"] if section.trust_remote_code else [])]


def download_bytes(siblings, wanted: list[str]) -> int:
    """What fetching `wanted` of a repo's files costs: the same patterns `snapshot_download` matches."""
    from huggingface_hub.utils import filter_repo_objects

    return sum(f.size or 0 for f in filter_repo_objects(siblings or [], allow_patterns=wanted, key=lambda f: f.rfilename))


def _hub_kwargs(source: str, limits: Limits) -> dict:
    """The host's hub token goes only to hub ids the operator lists for it."""
    allowed = any(fnmatch.fnmatchcase(source, p) for p in limits.hub_token_models)
    return {} if allowed else {"token": False}


def _common_kwargs(section) -> dict:
    kwargs = section.model_dump(exclude_none=True, exclude={"dtype", "torch_dtype"})
    if not kwargs.get("trust_remote_code"):
        kwargs.pop("trust_remote_code", None)
    return kwargs


def _model_kwargs(spec: ModelSpec) -> dict:
    kwargs = _common_kwargs(spec.model_kwargs)
    dtype = spec.model_kwargs.dtype or spec.model_kwargs.torch_dtype
    kwargs["dtype"] = _DTYPES[dtype] if dtype else (torch.float32 if not torch.cuda.is_available() else "auto")
    if spec.trainer.bits:
        kwargs["quantization_config"] = _bits_config(spec.trainer.bits)
    return kwargs


def _bits_config(bits: int):
    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is None:  # transformers imports it itself when it loads
        raise SpecError("trainer.bits", "QLoRA needs bitsandbytes: pip install 'mongotune[qlora]'")
    if bits == 4:
        compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def _cannot_load(source: str, exc: Exception) -> SpecError:
    """What went wrong, for the document: the reason goes to the log, where host paths may appear."""
    log.warning("cannot load %r: %s", source, exc)
    return SpecError(
        "model_name_or_path",
        f"cannot load {source!r}: it is neither a model folder with safetensors weights on the "
        "listener's host nor a Hugging Face Hub id the host can reach (the listener's log says more)",
    )


def parameter_count(source: str, spec: ModelSpec) -> int:
    """Parameters the configuration describes, counted on the meta device: nothing is allocated."""
    config_kwargs = {k: v for k, v in _common_kwargs(spec.model_kwargs).items()
                     if k in {"revision", "subfolder", "gguf_file", "trust_remote_code"}}
    config = AutoConfig.from_pretrained(source, **config_kwargs)
    rough = _rough_count(config)
    if rough is not None:
        return rough
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=config_kwargs.get("trust_remote_code", False))
    return sum(p.numel() for p in model.parameters())


MAX_LAYERS = 1024  # more layers than any released causal LM: refused before a module is built


def _rough_count(config) -> int | None:
    """A lower bound from the usual configuration fields, when it already decides (or the layers are absurd).

    Building even on the meta device costs a Python object per module, so a configuration claiming a
    million layers must be refused from its numbers alone.
    """
    size = {name: getattr(config, name, 0) for name in ("vocab_size", "hidden_size", "intermediate_size",
                                                          "num_hidden_layers")}
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in size.values()):
        raise ValueError("its configuration's sizes are not non-negative integers")
    if size["num_hidden_layers"] > MAX_LAYERS:
        return 2**62
    hidden = size["hidden_size"]
    per_layer = 4 * hidden * hidden + 3 * hidden * size["intermediate_size"]
    rough = size["vocab_size"] * hidden + size["num_hidden_layers"] * per_layer
    return rough if rough > 2**40 else None


def check_size(source: str, spec: ModelSpec, limits: Limits) -> int:
    try:
        count = parameter_count(source, spec)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _cannot_load(spec.model_name_or_path, exc) from None
    except (RuntimeError, OverflowError, MemoryError) as exc:
        raise SpecError("model_name_or_path", f"its configuration does not describe a model that can be built ({exc.__class__.__name__})") from None
    if count > limits.max_model_params:
        raise SpecError("model_name_or_path", limits.refusal("max_model_params", f"{count:,} parameters"))
    return count


def load_tokenizer(spec: ModelSpec, limits: Limits):
    source = resolve_source(spec, limits, spec.tokenizer_kwargs)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **_common_kwargs(spec.tokenizer_kwargs))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _cannot_load(spec.model_name_or_path, exc) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_download(source: str, revision: str | None, limits: Limits, hub: dict, wanted: list[str]) -> bool:
    """Whether the hub sized the files `wanted` before anything is fetched (a SpecError when they are too
    large); False offline or unreachable, when only the local cache may be used."""
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(source, revision=revision, files_metadata=True, **hub)
    except Exception as exc:  # offline, unreachable, unknown: any of a dozen transport errors
        log.info("cannot size %r on the hub (%s); loading from the local cache if it is there", source, exc)
        return False
    total = download_bytes(info.siblings, wanted)
    if total > limits.max_download_bytes:
        raise SpecError("model_name_or_path", limits.refusal("max_download_bytes", f"{total:,} bytes"))
    return True


def check_model(spec: ModelSpec, limits: Limits) -> None:
    """Where it comes from, how much it downloads and how large it is, before any weight exists.

    Training calls this before its arguments switch on DeepSpeed ZeRO-3 (which changes how models
    are built), then `load_checked_model`; serving calls `load_model`, which does both.
    """
    check_size(resolve_source(spec, limits), spec, limits)


def load_checked_model(spec: ModelSpec, limits: Limits):
    """The base model, safetensors only (a GGUF file is read by its own parser); `check_model` came first."""
    source = resolve_source(spec, limits)
    kwargs = _model_kwargs(spec)
    if "gguf_file" not in kwargs:
        kwargs["use_safetensors"] = True
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise _cannot_load(spec.model_name_or_path, exc) from None
    except TypeError as exc:
        raise SpecError("model_kwargs", f"not accepted by from_pretrained: {exc}") from None
    if "gguf_file" in kwargs:
        dequantize(model)
    return model


def load_model(spec: ModelSpec, limits: Limits):
    check_model(spec, limits)
    return load_checked_model(spec, limits)
