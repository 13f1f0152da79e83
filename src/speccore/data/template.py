"""Turn data rows into (prompt, response) texts: a field, a ``{field}`` template or chat turns.

Errors name a row as the loader does, counted from 1 as in the file: the row at index ``i``
(the index the coreset and the scores use) is ``row i+1 (1-based)``
(:func:`~speccore.data.read.row_label`).
"""

from __future__ import annotations

import logging
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets

from ..utils.errors import ConfigError, DataError, ModelError
from ..utils.progress import progress
from .read import row_label

logger = logging.getLogger(__name__)

_NO_CHAT_TEMPLATE = "{flag}: tokenizer of this model has no chat template (a base model?); {fix}"
# Show a progress bar only where rendering chat templates takes noticeable time.
_PROGRESS_MIN_ROWS = 5000


@dataclass
class Formatting:
    """How a row becomes a prompt and a response.

    Either ``input_field`` (or a ``template`` with ``{field}`` placeholders) gives the prompt and
    ``output_field`` the response, or ``messages_field`` holds a list of ``{role, content}`` turns
    whose last (assistant) turn is the response. ``chat_template`` wraps a plain prompt in the
    tokenizer's chat template as one user turn.
    """

    input_field: str | None = None
    output_field: str | None = None
    template: str | None = None
    chat_template: bool = False
    messages_field: str | None = None

    @classmethod
    def from_config(cls, config: Any) -> Formatting:
        """The formatting part of a config with the same field names (e.g. ``SelectConfig``)."""
        return cls(
            input_field=getattr(config, "input_field", None),
            output_field=getattr(config, "output_field", None),
            template=getattr(config, "template", None),
            chat_template=bool(getattr(config, "chat_template", False)),
            messages_field=getattr(config, "messages_field", None),
        )

    def validate(self, need_output: bool = True) -> None:
        """Raise :class:`ConfigError` unless the fields say how to build a prompt (and response).

        ``need_output=False`` checks only what a prompt needs (generation on eval data).
        """
        if self.messages_field:
            if self.input_field or self.template or self.output_field:
                raise ConfigError(
                    "--messages-field builds prompt and response from the turns; "
                    "drop --input-field, --output-field and --template"
                )
            return
        if self.template and self.input_field:
            raise ConfigError(
                "--template and --input-field both given; the template names its own fields, "
                "drop --input-field"
            )
        if not (self.template or self.input_field):
            raise ConfigError(
                "no prompt: give --input-field or --template (or --messages-field for chat data)"
            )
        if need_output and not self.output_field:
            raise ConfigError(
                "no response: give --output-field (or --messages-field for chat data)"
            )
        if self.template:
            template_fields(self.template)


def template_fields(template: str) -> list[str]:
    """The field names a ``{field}`` template uses, in order; ConfigError if it is malformed.

    Only plain names are allowed: no ``{a.b}``, ``{a[0]}``, ``{}``/``{0}``, ``!r`` or ``:spec``,
    so filling a template can never reach attributes or run code. ``{{`` and ``}}`` are literal
    braces, as in ``str.format``.
    """
    return [name for _, name in _parse_template(template) if name is not None]


def _parse_template(template: str) -> list[tuple[str, str | None]]:
    """Split a template into ``(literal text, field name or None)`` pieces."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ConfigError(f"--template: {e}; write literal braces as {{{{ and }}}}") from None
    pieces: list[tuple[str, str | None]] = []
    for literal, name, spec, conversion in parsed:
        if name is not None:
            _check_placeholder(name, spec, conversion)
        pieces.append((literal, name))
    return pieces


def _check_placeholder(name: str, spec: str | None, conversion: str | None) -> None:
    if not name.isidentifier():
        raise ConfigError(
            f"--template: placeholder {{{name}}} is not a plain field name; use {{field}} "
            "with a column name (no dots, indexes or positions)"
        )
    if spec or conversion:
        raise ConfigError(
            f"--template: placeholder {{{name}}} has a format spec or conversion; "
            f"use plain {{{name}}}"
        )


def format_rows(
    dataset: datasets.Dataset, fmt: Formatting, tokenizer: Any = None
) -> tuple[list[str], list[str]]:
    """The prompt and response texts of every row, in row order.

    ``tokenizer`` is needed only with ``fmt.chat_template`` or ``fmt.messages_field``. Raises
    :class:`DataError` naming the row and field for a missing or non-text value, and
    :class:`ModelError` when a chat template is asked of a tokenizer that has none.
    """
    fmt.validate(need_output=True)
    prompts, responses = _build(dataset, fmt, tokenizer, need_output=True)
    assert responses is not None  # need_output=True always builds responses
    return prompts, responses


def prompt_texts(dataset: datasets.Dataset, fmt: Formatting, tokenizer: Any = None) -> list[str]:
    """The prompt text of every row, for generation; responses need not exist.

    With ``messages_field``, a final assistant turn (a reference answer) is left out of the
    prompt; without one, all turns form the prompt.
    """
    fmt.validate(need_output=False)
    prompts, _ = _build(dataset, fmt, tokenizer, need_output=False)
    return prompts


def _build(
    dataset: datasets.Dataset, fmt: Formatting, tokenizer: Any, need_output: bool
) -> tuple[list[str], list[str] | None]:
    if fmt.messages_field:
        return _from_messages(dataset, fmt.messages_field, tokenizer, need_output)
    if fmt.template:
        prompts = _fill_template(dataset, fmt.template)
    else:
        assert fmt.input_field is not None  # validate() checked it
        prompts = _text_column(dataset, fmt.input_field, "--input-field")
    if fmt.chat_template:
        _require_chat_template(
            tokenizer, "--chat-template", "drop --chat-template or use --template"
        )
        prompts = [
            _render_chat(tokenizer, [{"role": "user", "content": p}], i)
            for i, p in enumerate(_progress(prompts, "chat template"))
        ]
    responses = None
    if need_output:
        assert fmt.output_field is not None
        responses = _text_column(dataset, fmt.output_field, "--output-field")
        for i, response in enumerate(responses):
            _check_response(i, response, f"field '{fmt.output_field}'")
    return prompts, responses


def _check_response(row: int, response: str, where: str) -> None:
    """An empty or whitespace-only response teaches nothing and is refused, like one that
    tokenises to nothing (the whitespace would be the whole training target)."""
    if not response.strip():
        what = "empty" if not response else "only whitespace"
        raise DataError(
            f"{row_label(row)}: response is empty ({where} is {what}); give it some text "
            "or drop the row"
        )


# ---------------------------------------------------------------------------------------------
# Fields and templates
# ---------------------------------------------------------------------------------------------


def _column(dataset: datasets.Dataset, name: str, flag: str) -> list[Any]:
    """All values of column ``name``; DataError (naming row 1, 1-based) if no row has it."""
    if name not in dataset.column_names:
        columns = ", ".join(dataset.column_names)
        raise DataError(f"{row_label(0)}: no field '{name}' (fields: {columns}); check {flag}")
    return list(dataset[name])


def _text_column(dataset: datasets.Dataset, name: str, flag: str) -> list[str]:
    values = _column(dataset, name, flag)
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise DataError(_bad_value(i, name, value, "a string"))
    return values


def _bad_value(row: int, name: str, value: Any, expected: str) -> str:
    if value is None:
        return f"{row_label(row)}: field '{name}' is missing (null); every row needs it"
    return f"{row_label(row)}: field '{name}' is {type(value).__name__}, expected {expected}"


def _fill_template(dataset: datasets.Dataset, template: str) -> list[str]:
    """Fill ``{field}`` placeholders from each row (text and numbers; nothing else)."""
    pieces = _parse_template(template)
    names = dict.fromkeys(name for _, name in pieces if name is not None)
    columns = {name: _column(dataset, name, "--template") for name in names}
    for name, values in columns.items():
        for i, value in enumerate(values):
            # bool is an int subclass, but "True" in a prompt is almost surely a data mistake
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise DataError(_bad_value(i, name, value, "a string or number"))
    out = []
    for i in range(dataset.num_rows):
        parts = []
        for literal, field in pieces:
            parts.append(literal)
            if field is not None:
                parts.append(str(columns[field][i]))
        out.append("".join(parts))
    return out


# ---------------------------------------------------------------------------------------------
# Chat templates and messages
# ---------------------------------------------------------------------------------------------


def _require_chat_template(tokenizer: Any, flag: str, fix: str) -> None:
    if tokenizer is None:
        raise ModelError(f"{flag}: needs the model's tokenizer to apply its chat template")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ModelError(_NO_CHAT_TEMPLATE.format(flag=flag, fix=fix))


def _render_chat(tokenizer: Any, turns: list[dict[str, str]], row: int) -> str:
    """The chat template applied to ``turns``, ending with the assistant's generation prompt."""
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # a template may reject e.g. a system turn or non-alternating roles
        raise DataError(f"{row_label(row)}: the chat template rejected the turns ({e})") from None
    if not isinstance(text, str):
        raise ModelError(f"the chat template returned {type(text).__name__}, expected text")
    return text


def _from_messages(
    dataset: datasets.Dataset, field: str, tokenizer: Any, need_output: bool
) -> tuple[list[str], list[str] | None]:
    _require_chat_template(
        tokenizer, "--messages-field", "use --input-field/--output-field or --template instead"
    )
    prompts: list[str] = []
    responses: list[str] = []
    values = _column(dataset, field, "--messages-field")
    for i, value in enumerate(_progress(values, "chat template")):
        turns = _turns(i, field, value)
        prompt_turns, response = _split_turns(i, field, turns, need_output)
        prompts.append(_render_chat(tokenizer, prompt_turns, i))
        if response is not None:
            responses.append(response)
    return prompts, responses if need_output else None


def _turns(row: int, field: str, value: Any) -> list[dict[str, str]]:
    """Check a messages value is a list of ``{role, content}`` text turns; keep only those keys."""
    if not isinstance(value, list):
        got = "missing (null)" if value is None else type(value).__name__
        raise DataError(
            f"{row_label(row)}: field '{field}' is {got}, expected a list of {{role, content}} "
            "turns"
        )
    if not value:
        raise DataError(
            f"{row_label(row)}: field '{field}' is an empty list; it needs at least one turn"
        )
    turns = []
    for t, turn in enumerate(value):
        ok = isinstance(turn, dict) and all(
            isinstance(turn.get(k), str) for k in ("role", "content")
        )
        if not ok:
            raise DataError(
                f"{row_label(row)}: turn {t + 1} (1-based) of '{field}' is not a "
                "{role, content} pair of strings"
            )
        turns.append({"role": turn["role"], "content": turn["content"]})
    return turns


def _split_turns(
    row: int, field: str, turns: list[dict[str, str]], need_output: bool
) -> tuple[list[dict[str, str]], str | None]:
    """(prompt turns, response text): the response is the last turn, an assistant turn."""
    last_is_answer = turns[-1]["role"] == "assistant"
    if need_output and not last_is_answer:
        has_answer = any(t["role"] == "assistant" for t in turns)
        where = f"ends with a '{turns[-1]['role']}' turn" if has_answer else "has no assistant turn"
        raise DataError(
            f"{row_label(row)}: '{field}' {where}; the last turn must be the assistant's response"
        )
    if not last_is_answer:  # eval data without a reference answer: every turn is prompt
        return turns, None
    if len(turns) < 2:
        raise DataError(
            f"{row_label(row)}: '{field}' has only the assistant turn; it needs a prompt turn"
        )
    if not need_output:
        return turns[:-1], None
    response = turns[-1]["content"]
    _check_response(row, response, f"the last turn of '{field}'")
    return turns[:-1], response


def _progress(items: Sequence[Any], desc: str) -> Any:
    return progress(items, desc=desc, disable=len(items) < _PROGRESS_MIN_ROWS, leave=False)
