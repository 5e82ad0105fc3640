"""Declarative `data.template`: plain `{field}` substitution and nothing more.

`str.format` would allow `{x.__class__}` and `{x[0]}`, a path to data a document should not reach,
so a template is parsed once and only bare field names are accepted.
"""

import string

_FORMATTER = string.Formatter()


class TemplateError(ValueError):
    pass


def template_fields(template: str) -> list[str]:
    """The field names a template uses; raises TemplateError for anything but `{name}`."""
    fields = []
    try:
        parts = list(_FORMATTER.parse(template))
    except ValueError as exc:
        raise TemplateError(f"cannot parse template: {exc} (write literal braces as {{{{ and }}}})") from None
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise TemplateError(
                f"{shown} is not allowed: use plain {{field}} names, without attribute, index or format parts"
            )
        fields.append(name)
    if not fields:
        raise TemplateError("template names no {field}")
    return fields


def render(template: str, document: dict) -> str:
    """Fill a template from a document; a missing field raises KeyError with its name."""
    out = []
    for literal, name, _, _ in _FORMATTER.parse(template):
        out.append(literal)
        if name is not None:
            out.append(str(document[name]))
    return "".join(out)
