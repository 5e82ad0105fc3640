"""`listener export` and `listener checkpoints`: a folder plain transformers loads and that answers as served.

The module's tests share one daemon and database, each with its own model id.
"""

import os
import stat
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from listener.cli.main import cli
from tests.conftest import finished, wait_for
from tests.test_lineage import model, trained
from training import defaults

PROMPT = "ahoy matey the capital"
NEW_TOKENS = 8


def greedy(model_, tokenizer) -> str:
    """Decoded as serving decodes (`training.inference.generate`): special tokens dropped, stripped."""
    inputs = tokenizer(PROMPT, return_tensors="pt")
    out = model_.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = [t for t in out[0, inputs["input_ids"].shape[1]:].tolist() if t not in set(tokenizer.all_special_ids)]
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def served(db, model_id) -> dict:
    request = db[defaults.REQUESTS].insert_one({"model": model_id, "input": PROMPT,
                                                "params": {"max_new_tokens": NEW_TOKENS}})
    answer = wait_for(db[defaults.REQUESTS], request.inserted_id, finished)
    assert answer["status"] == "done", answer.get("error")
    return answer


def assert_hub_folder(folder, library: str) -> None:
    """Every file with the mode the umask gives a new file (the weights too), and a card the Hub reads."""
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in folder.iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes
    header = yaml.safe_load((folder / "README.md").read_text().split("---\n")[1])
    assert header["library_name"] == library and "mongotune" in header["tags"], header
    assert "base_model" not in header, "a folder on the daemon's host is no Hub id"


def test_export_loads_with_plain_transformers_and_answers_as_served(module_samples, server_uri, module_daemon,
                                                                   tiny_model_path, model_root, tmp_path):
    db = module_samples
    db[defaults.MODELS].insert_one(model("m", tiny_model_path, trainer={"learning_rate": 1e-2}))
    document = trained(db, "m")
    answer = served(db, "m")
    runner = CliRunner(env={"MONGOTUNE_MODEL_ROOTS": str(model_root), "MONGOTUNE_HOME": str(tmp_path / "home")})
    where = ["--uri", server_uri, "--db", db.name]

    listing = runner.invoke(cli, ["checkpoints", "m", *where])
    assert listing.exit_code == 0, listing.output
    assert "best" in listing.output and "eval_loss" in listing.output

    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    environ = {**os.environ, "MONGOTUNE_MODEL_ROOTS": str(model_root), "MONGOTUNE_HOME": str(tmp_path / "home")}
    exported = subprocess.run([sys.executable, "-m", "listener", "export", "m", str(merged), *where],
                              capture_output=True, text=True, env=environ, timeout=300)
    assert exported.returncode == 0, exported
    assert exported.stdout.splitlines() == [f"wrote the merged model of 'm' run 1 step {document['best_checkpoint']['step']} "
                                            f"to {merged}"], exported
    assert "accelerator" not in exported.stderr + exported.stdout, "no DeepSpeed guess on a machine without a GPU"
    assert "it/s" not in exported.stderr, "no tqdm bar drawn over the command's own spinner"
    assert answer["checkpoint_used"] == document["best_checkpoint"]
    plain = AutoModelForCausalLM.from_pretrained(merged)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert not hasattr(plain, "peft_config") and (merged / "model.safetensors").exists()
    assert greedy(plain, tokenizer) == answer["output"] != ""
    card = (merged / "README.md").read_text()
    assert "## Runs" in card and "| 1 | insert |" in card
    assert_hub_folder(merged, "transformers")

    best = document["best_checkpoint"]
    result = runner.invoke(cli, ["export", "m", str(adapter), "--adapter-only",
                                 "--checkpoint", f"{best['run']}:{best['step']}", *where])
    assert result.exit_code == 0, result.output
    from peft import PeftModel

    with_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path), adapter)
    assert (adapter / "adapter_model.safetensors").exists() and not (adapter / "model.safetensors").exists()
    assert greedy(with_peft, tokenizer) == answer["output"]
    assert_hub_folder(adapter, "peft")

    again = runner.invoke(cli, ["export", "m", str(merged), *where])
    assert again.exit_code != 0 and "not an empty folder" in again.output and "Traceback" not in again.output
    missing = runner.invoke(cli, ["export", "m", str(tmp_path / "x"), "--checkpoint", "9:9", *where])
    assert missing.exit_code != 0 and "no checkpoint" in missing.output


def test_a_4_bit_model_serves_in_4_bits_and_exports_dequantized_or_as_its_adapter(module_samples, server_uri,
                                                                                 module_daemon, tiny_model_path,
                                                                                 model_root, limits, tmp_path):
    bnb = pytest.importorskip("bitsandbytes", reason="QLoRA needs the qlora extra: pip install 'mongotune[qlora]'")
    from peft import PeftModel
    from transformers import BitsAndBytesConfig

    from training import checkpoints
    from training.config import parse_model
    from training.inference import load

    db = module_samples
    db[defaults.MODELS].insert_one(model("m4", tiny_model_path, trainer={"bits": 4, "learning_rate": 1e-2}))
    document = trained(db, "m4")
    answer = served(db, "m4")
    folder = checkpoints.download(db, checkpoints.select(document, "best")["files_id"], tmp_path / "best")
    serving = load(parse_model(document, limits), limits, folder).model
    assert any(isinstance(module, bnb.nn.Linear4bit) for module in serving.modules()), "served in 4 bits"

    runner = CliRunner(env={"MONGOTUNE_MODEL_ROOTS": str(model_root), "MONGOTUNE_HOME": str(tmp_path / "home")})
    where = ["--uri", server_uri, "--db", db.name]
    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    result = runner.invoke(cli, ["export", "m4", str(merged), *where])
    assert result.exit_code == 0, result.output
    assert "note: trained and served on a 4-bit base: merged into the full-precision base" in result.output
    plain = AutoModelForCausalLM.from_pretrained(merged)
    assert getattr(plain.config, "quantization_config", None) is None
    assert not any(isinstance(module, bnb.nn.Linear4bit) for module in plain.modules())
    assert greedy(plain, AutoTokenizer.from_pretrained(merged)) != ""
    assert "4-bit base: merged into the full-precision base" in (merged / "README.md").read_text()

    result = runner.invoke(cli, ["export", "m4", str(adapter), "--adapter-only", *where])
    assert result.exit_code == 0, result.output
    assert "BitsAndBytesConfig(load_in_4bit=True" in result.output
    quantized = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, quantization_config=quantized)
    with_peft = PeftModel.from_pretrained(base, adapter)
    assert greedy(with_peft, AutoTokenizer.from_pretrained(adapter)) == answer["output"]
