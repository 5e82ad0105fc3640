"""Model templates: a model definition with chosen values turned into named variables, to reuse it.

Not to be confused with `data.template`, which formats one training example. A model template is a
folder of two YAML files:

- `template.yaml`: the definition's user-settable fields (what `training.config.ModelSpec` accepts,
  without `_id` and `cancel`), where a variable's value is the string `${name}`. Every other `$` in a
  string is written `$$`, so filters and texts holding a dollar sign survive (`string.Template` rules).
- `variables.yaml`: `{name: {default: value, path: dotted.field}}`; a variable with no `default` must
  be given when the template is applied.

A value that is exactly `${name}` takes the variable's value with its type (a number stays a number);
`${name}` inside a longer string is replaced by the value's text.
"""

import re
import string
from pathlib import Path

import yaml

from training.config import LISTENER_FIELDS, ModelSpec

TEMPLATE_FILE, VARIABLES_FILE = "template.yaml", "variables.yaml"
DEFAULT_VARIABLES = {"collection": "data.collection", "model": "model_name_or_path"}
NOT_COPIED = {"_id", "cancel"}  # a copy gets its own id and starts uncancelled


class TemplateProblem(ValueError):
    """A template that cannot be written or filled in: the message names the variable or field."""


def definition(document: dict) -> dict:
    """The fields of a model document a user may set, and nothing the listener writes."""
    settable = {field.alias or name for name, field in ModelSpec.model_fields.items()}
    return {k: v for k, v in document.items() if k in settable and k not in NOT_COPIED | LISTENER_FIELDS}


def _escape(value):
    if isinstance(value, str):
        return value.replace("$", "$$")
    if isinstance(value, dict):
        return {k: _escape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape(v) for v in value]
    return value


def _locate(tree: dict, path: str) -> tuple[dict, str]:
    *parents, last = path.split(".")
    node = tree
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or last not in node:
        raise TemplateProblem(f"--var {path}: the definition has no field {path!r}")
    return node, last


def export(document: dict, variables: dict[str, str]) -> tuple[dict, dict]:
    """(template, variables file) for `document`, each `variables` name replacing the field at its dotted path."""
    template = _escape(definition(document))
    described = {}
    for name, path in variables.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise TemplateProblem(f"--var {name}={path}: a variable name is letters, digits and _")
        node, last = _locate(template, path)
        original, _ = _locate(definition(document), path)
        described[name] = {"default": original[last], "path": path}
        node[last] = f"${{{name}}}"
    return template, described


def write(folder: Path, template: dict, variables: dict) -> None:
    header = "# mongotune model template: `listener apply DIR --set NAME=VALUE`; ${name} is a variable, $$ a dollar\n"
    try:
        texts = {TEMPLATE_FILE: header + yaml.safe_dump(template, sort_keys=False, allow_unicode=True),
                 VARIABLES_FILE: yaml.safe_dump(variables, sort_keys=False, allow_unicode=True)}
    except yaml.YAMLError as exc:
        raise TemplateProblem(f"the definition holds a value YAML cannot write ({str(exc).splitlines()[0]})") from None
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (folder / name).write_text(text, encoding="utf-8")


def _read_yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TemplateProblem(f"{path.parent} is not a model template: it has no {path.name}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise TemplateProblem(f"{path.name} is not readable YAML: {str(exc).splitlines()[0]}") from None


def read(folder: Path) -> tuple[dict, dict]:
    template, variables = _read_yaml(folder / TEMPLATE_FILE), _read_yaml(folder / VARIABLES_FILE) or {}
    if not isinstance(template, dict):
        raise TemplateProblem(f"{TEMPLATE_FILE} must hold a mapping: the model definition")
    if not isinstance(variables, dict) or not all(isinstance(v, dict) for v in variables.values()):
        raise TemplateProblem(f"{VARIABLES_FILE} must map each variable name to {{default: VALUE}}")
    return template, variables


def _fill(value, values: dict):
    if isinstance(value, dict):
        return {k: _fill(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, values) for v in value]
    if not isinstance(value, str):
        return value
    text = string.Template(value)
    if not text.is_valid():
        raise TemplateProblem(f"{value!r}: write a literal dollar sign as $$ and a variable as ${{name}}")
    names = text.get_identifiers()
    missing = [n for n in names if n not in values]
    if missing:
        raise TemplateProblem(f"variable {missing[0]!r} has no value: pass --set {missing[0]}=VALUE "
                              f"(or give it a default in {VARIABLES_FILE})")
    if len(names) == 1 and value == f"${{{names[0]}}}":
        return values[names[0]]
    return text.substitute({n: values[n] for n in names})


def apply(template: dict, variables: dict, given: dict[str, str]) -> dict:
    """The filled-in definition: `given` (text, as typed) over the variables' defaults; unknown names are refused."""
    unknown = sorted(set(given) - set(variables))
    if unknown:
        raise TemplateProblem(f"--set {unknown[0]}: this template has no such variable; it has "
                              f"{', '.join(variables) or 'none'}")
    values = {name: spec["default"] for name, spec in variables.items() if "default" in spec}
    values.update({name: _typed(text, values.get(name)) for name, text in given.items()})
    return _fill(template, values)


def parse_assignment(text: str) -> tuple[str, str]:
    name, eq, value = text.partition("=")
    if not eq or not name.strip():
        raise TemplateProblem(f"{text!r}: use NAME=VALUE, e.g. collection=pirate_chat")
    return name.strip(), value


def _typed(text: str, default):
    """A --set value: text where the default is text, else as YAML reads it (so `max_steps=10` is a number)."""
    if isinstance(default, str):
        return text
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return parsed if isinstance(parsed, (int, float, bool, list, dict)) else text
