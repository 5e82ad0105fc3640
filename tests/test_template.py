"""`training.template`: plain `{field}` substitution and nothing more."""

import pytest

from training.template import TemplateError, render, template_fields


def test_fields_in_order_of_use():
    assert template_fields("{prompt}\n### Answer: {response}</s>") == ["prompt", "response"]


def test_fields_keep_repeats():
    assert template_fields("{a}-{b}-{a}") == ["a", "b", "a"]


def test_render_fills_fields_and_keeps_literal_text():
    doc = {"prompt": "What is 2+2?", "response": 4, "other": "unused"}
    assert render("Q: {prompt}\nA: {response}</s>", doc) == "Q: What is 2+2?\nA: 4</s>"


def test_render_keeps_escaped_braces():
    assert template_fields("{{literal}} {x}") == ["x"]
    assert render("{{literal}} {x}", {"x": "y"}) == "{literal} y"


def test_render_missing_field_raises_keyerror_naming_it():
    with pytest.raises(KeyError, match="response"):
        render("{prompt}{response}", {"prompt": "p"})


def test_render_does_not_reach_attributes():
    # render trusts a checked template, but even so it only looks up names.
    assert render("{x}", {"x": "a.__class__"}) == "a.__class__"


@pytest.mark.parametrize("template", [
    "{x.__class__}",
    "{x.__class__.__init__.__globals__}",
    "{x[0]}",
    "{x!r}",
    "{x!s}",
    "{x:>9}",
    "{0}",
    "{}",
    "{x-y}",
])
def test_refuses_everything_but_bare_names(template):
    with pytest.raises(TemplateError, match="not allowed|no \\{field\\}"):
        template_fields(template)


@pytest.mark.parametrize("template", ["{prompt", "prompt}", "{prompt}}", "{{prompt}", "{a{b}}"])
def test_refuses_unbalanced_braces(template):
    with pytest.raises(TemplateError):
        template_fields(template)


@pytest.mark.parametrize("template", ["", "just text", "{{escaped}} only"])
def test_refuses_template_without_field(template):
    with pytest.raises(TemplateError, match="names no"):
        template_fields(template)


def test_error_message_shows_the_offending_part():
    with pytest.raises(TemplateError) as info:
        template_fields("ok {fine} then {x:>9}")
    assert "{x:>9}" in str(info.value)
    with pytest.raises(TemplateError) as info:
        template_fields("{x!r}")
    assert "{x!r}" in str(info.value)


def test_template_error_is_a_value_error():
    assert issubclass(TemplateError, ValueError)
