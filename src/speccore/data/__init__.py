"""Load, template and tokenise training data (labels masked to the response)."""

from .batches import (
    IGNORE_INDEX,
    BatchLoop,
    TokenizedData,
    collate,
    length_grouped_batches,
)
from .encode import encode_prompts, tokenize_dataset, tokenize_pairs, truncate_prompt
from .read import FORMATS, data_format, load_rows, row_label, write_coreset
from .template import Formatting, format_rows, prompt_texts, template_fields

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "BatchLoop",
    "Formatting",
    "TokenizedData",
    "collate",
    "data_format",
    "encode_prompts",
    "format_rows",
    "length_grouped_batches",
    "load_rows",
    "prompt_texts",
    "row_label",
    "template_fields",
    "tokenize_dataset",
    "tokenize_pairs",
    "truncate_prompt",
    "write_coreset",
]
