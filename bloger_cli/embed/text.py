"""Item text for the encoder: templates over the items artifact's text fields.

A template such as ``"{title}. Brand: {brand}. {categories}"`` is split into segments, each a literal
prefix attached to the placeholder after it. A segment whose field is empty disappears together with its
prefix, so an item without a brand reads "Two. Beauty" rather than "Two. Brand: . Beauty". When the
first segment with text is not the template's first, its prefix loses its leading separator (". Brand: "
becomes "Brand: "). Literal text after the last placeholder is kept only when some field had text.
Values are HTML-unescaped ("&amp;" -> "&") and their whitespace collapsed.

Without a template, ``fields`` (or a default chosen from the fields that exist) are joined as
"Title: X. Brand: Y. Categories: Z".
"""

from __future__ import annotations

import html
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bloger_cli.errors import ConfigError

# Fields the default text is built from, in this order (short ones first: the encoder truncates long
# text, so a description goes last). When none of them exists, every text field is used.
PREFERRED_FIELDS = ("title", "name", "brand", "author", "artist", "categories", "category", "genres", "genre",
                    "tags", "description")
_SEPARATORS = " .,;:-|/"
_FIX = "fix --template (or `template` in the [embed] config section)"


@dataclass(frozen=True)
class Template:
    """A parsed template: (literal prefix, field) segments plus the literal after the last field."""

    text: str
    segments: tuple[tuple[str, str], ...]
    suffix: str = ""

    @property
    def fields(self) -> list[str]:
        return list(dict.fromkeys(field for _, field in self.segments))

    @classmethod
    def from_fields(cls, fields: Sequence[str]) -> Template:
        """'Title: {title}. Brand: {brand}' for ['title', 'brand'] (built directly: names need no escaping)."""
        segments = tuple((("" if i == 0 else ". ") + f"{label(f)}: ", f) for i, f in enumerate(fields))
        return cls("".join(f"{prefix}{{{f}}}" for prefix, f in segments), segments)


def label(field: str) -> str:
    """'movie_title' -> 'Movie title'."""
    return field.replace("_", " ").strip().capitalize()


def parse_template(text: str, available: Sequence[str]) -> Template:
    """Parse a template; every placeholder must name one of the `available` text fields."""
    fields = ", ".join(available) or "none"
    try:
        parts = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise ConfigError(f"template {text!r} is not valid ({exc})",
                          hint="write fields as {name} and a literal brace as {{ or }}") from None
    segments: list[tuple[str, str]] = []
    pending = ""
    for literal, field, spec, conversion in parts:
        pending += literal
        if field is None:  # an escaped brace or the text after the last placeholder
            continue
        if not field:
            raise ConfigError(f"template {text!r} has an empty placeholder {{}}; item text fields: {fields}",
                              hint=_FIX)
        if spec or conversion:
            raise ConfigError(f"template {text!r}: placeholder {{{field}}} has a format ({conversion or ''}"
                              f"{spec or ''}); only plain {{field}} is supported", hint=_FIX)
        if field not in available:
            raise ConfigError(f"template field {{{field}}} is not an item text field; available: {fields}",
                              hint=_FIX)
        segments.append((pending, field))
        pending = ""
    if not segments:
        raise ConfigError(f"template {text!r} has no {{field}} placeholder; item text fields: {fields}", hint=_FIX)
    return Template(text, tuple(segments), pending)


def default_fields(available: Sequence[str]) -> list[str]:
    """The preferred fields that exist (title, brand, categories, description, ...), else all of them."""
    return [f for f in PREFERRED_FIELDS if f in available] or list(available)


def resolve_template(template: str | None, fields: list[str] | None, available: Sequence[str]) -> Template:
    """The template the config asks for: `template`, else `fields`, else the default fields."""
    if template is not None:
        return parse_template(template, available)
    if fields is None:
        return Template.from_fields(default_fields(available))
    if not fields:
        raise ConfigError("fields is empty; list item text fields, e.g. --set 'fields=[\"title\", \"brand\"]'",
                          hint=f"item text fields: {', '.join(available) or 'none'}")
    unknown = [f for f in fields if f not in available]
    if unknown:
        raise ConfigError(f"fields: {', '.join(map(repr, unknown))} not an item text field; "
                          f"available: {', '.join(available) or 'none'}", hint="fix `fields` in the config")
    return Template.from_fields(fields)


def clean(value: str | None) -> str:
    """HTML entities unescaped, whitespace collapsed; None -> ''."""
    if not value:
        return ""
    return " ".join(html.unescape(value).split())


def render(template: Template, values: Mapping[str, str | None]) -> str:
    """One item's text; '' when every field of the template is empty."""
    out: list[str] = []
    for i, (prefix, field) in enumerate(template.segments):
        value = clean(values.get(field))
        if not value:
            continue
        if not out and i > 0:  # the first text of the item: drop the separator that joined it to the previous
            prefix = prefix.lstrip(_SEPARATORS)
        out.append(prefix + value)
    if out:
        out.append(template.suffix)
    return "".join(out).strip()


def render_texts(template: Template, columns: Mapping[str, Sequence[str | None]], n: int) -> list[str]:
    """Every item's text from column-wise values (one list per field, `n` rows each)."""
    fields = template.fields
    if not fields:
        return [""] * n
    return [render(template, dict(zip(fields, row))) for row in zip(*(columns[f] for f in fields))]
