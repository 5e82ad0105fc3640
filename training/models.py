"""Loading a base model and tokenizer as a document describes them, for training or for serving."""

import importlib.util

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from training.config import ModelSpec, SpecError
from training.offline import dequantize

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "auto": "auto"}


def _model_kwargs(spec: ModelSpec) -> dict:
    kwargs = dict(spec.model_kwargs)
    for name in ("dtype", "torch_dtype"):
        if name in kwargs:
            value = kwargs.pop(name)
            if value not in _DTYPES:
                raise SpecError(f"model_kwargs.{name}", f"use one of {sorted(_DTYPES)}, not {value!r}")
            kwargs["dtype"] = _DTYPES[value]
    kwargs.setdefault("dtype", torch.float32 if not torch.cuda.is_available() else "auto")
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


def _cannot_load(spec: ModelSpec, exc: Exception) -> SpecError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return SpecError(
        "model_name_or_path",
        f"cannot load {spec.model_name_or_path!r}: it is neither a model folder on the listener's host "
        f"nor a Hugging Face Hub id the host can reach ({reason[:300]})",
    )


def load_tokenizer(spec: ModelSpec, path: str | None = None):
    try:
        tokenizer = AutoTokenizer.from_pretrained(path or spec.model_name_or_path, **spec.tokenizer_kwargs)
    except (OSError, ValueError) as exc:
        raise _cannot_load(spec, exc) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: ModelSpec):
    kwargs = _model_kwargs(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(spec.model_name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        raise _cannot_load(spec, exc) from None
    except TypeError as exc:
        raise SpecError("model_kwargs", f"not accepted by from_pretrained: {exc}") from None
    if "gguf_file" in kwargs:
        dequantize(model)
    return model
