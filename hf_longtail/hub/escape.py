"""Escaping for the cards: every value that comes from data or options (class names, the output
directory's name, split and column names, options such as ``--base-model``) is shown as the
text it is, never as Markdown, HTML or a link, and never breaks a heading, table or code block.

The card templates are rendered by :func:`render_card`: every ``{{ value }}`` goes through
:func:`md_text` unless it is :class:`markupsafe.Markup` (markup built in ``card.py`` with each
data part escaped), and the templates use the ``code`` filter (:func:`md_code`) for inline code.
The YAML front matter is not escaped: it is written by ``yaml.dump`` and keeps the true values.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from markupsafe import Markup

__all__ = ["Markup", "md_code", "md_text", "py_str", "render_card"]

# Line breaks, tabs and other control characters: in a card they would end a heading, a table
# row or a paragraph, so they become spaces (the front matter keeps the true value).
_CONTROL = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")
# Markdown punctuation that opens a construct (emphasis, code, links and images, headings,
# tables, strikethrough, math on the Hub, autolinks `scheme:` / `user@host`, `\` itself), and
# runs of `_` (group 2), which only emphasise when not between two letters or digits.
_MARKDOWN = re.compile(r"([\\`*\[\]#|~$:@])|(_+)")
_WORD_CHAR = re.compile(r"[^\W_]")
# An entity reference would be decoded (`&lt;` shows as `<`): escape the `&` that starts one.
_ENTITY = re.compile(r"&(?=#?\w+;)")
# `www.example.com` is linked by GFM without a scheme.
_WWW = re.compile(r"(?i)\b(www)\.")


def _flat(value: Any) -> str:
    return _CONTROL.sub(" ", str(value))


def md_text(value: Any) -> Markup:
    """``value`` as literal Markdown text, safe anywhere in a line of a card (prose, headings,
    table cells, bold): control characters become spaces, ``<`` becomes ``&lt;`` (no HTML tag
    survives), an entity's ``&`` and the punctuation of Markdown constructs are
    backslash-escaped (no emphasis, code, link, image, table cell, math or autolink). It
    renders as the original text; ``Markup`` values are returned unchanged."""
    if isinstance(value, Markup):
        return value
    flat = _flat(value)

    def escape(match: re.Match) -> str:
        if match.group(1):
            return "\\" + match.group(1)
        # `snake_case` stays readable: an underscore run inside a word cannot emphasise.
        start, end = match.span()
        inside = 0 < start and end < len(flat)
        inside = inside and bool(_WORD_CHAR.match(flat[start - 1]) and _WORD_CHAR.match(flat[end]))
        return match.group(2) if inside else "\\_" * len(match.group(2))

    # In this order: the backslashes added for `&` and the `&` of `&lt;` must not be escaped.
    text = _MARKDOWN.sub(escape, flat)
    text = _ENTITY.sub(r"\\&", text).replace("<", "&lt;")
    return Markup(_WWW.sub(r"\1\\.", text))


def md_code(value: Any) -> Markup:
    """``value`` as inline code (a backtick code span, whose content Markdown and HTML leave
    alone), safe in prose and in table cells: control characters become spaces, the fence is
    longer than any backtick run inside. A value holding ``|`` (which would split a table cell,
    and cannot be escaped inside code outside a table) is shown as :func:`md_text` instead."""
    text = _flat(value)
    if "|" in text:
        return md_text(text)
    if not text.strip(" "):
        return Markup("` `")  # an empty code span would render its backticks
    runs = [len(run) for run in re.findall(r"`+", text)]
    fence = "`" * (max(runs, default=0) + 1)
    # One space each side when the content starts or ends with a backtick or a space: Markdown
    # strips exactly one such pair.
    if text[0] in "` " or text[-1] in "` ":
        text = f" {text} "
    return Markup(f"{fence}{text}{fence}")


def py_str(value: Any) -> Markup:
    """``value`` as a Python string literal (double-quoted, escapes for ``"``, ``\\`` and
    control characters), for the code snippets: it cannot end the literal or start a new line
    of the fenced block."""
    return Markup(json.dumps(str(value), ensure_ascii=False).replace("\u2028", "\\u2028"))


def _finalize(value: Any) -> Any:
    return value if isinstance(value, Markup) else md_text(value)


def render_card(card_cls: Any, card_data: Any, template_path: str | Path, **kwargs: Any) -> Any:
    """``card_cls.from_template(card_data, template_path, **kwargs)`` (huggingface_hub's
    ``RepoCard.from_template``: the template sees ``card_data`` as YAML and the card data's
    fields), with every ``{{ value }}`` escaped by :func:`md_text` unless it is ``Markup``, and
    the ``code`` (:func:`md_code`) and ``py_str`` filters."""
    import jinja2

    env = jinja2.Environment(finalize=_finalize)
    env.filters.update(code=md_code, py_str=py_str)
    template = env.from_string(Path(template_path).read_text(encoding="utf-8"))
    values = {**card_data.to_dict(), **kwargs}
    content = template.render(card_data=Markup(card_data.to_yaml()), **values)
    return card_cls(content)
