"""Load, template and tokenise training data (labels masked to the response)."""

from .load import FORMATS, data_format, load_rows, write_coreset
from .template import Formatting, format_rows, prompt_texts, template_fields
from .tokenize import tokenize_dataset, tokenize_pairs
from .tokenized import IGNORE_INDEX, TokenizedData, collate, length_grouped_batches

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "Formatting",
    "TokenizedData",
    "collate",
    "data_format",
    "format_rows",
    "length_grouped_batches",
    "load_rows",
    "prompt_texts",
    "template_fields",
    "tokenize_dataset",
    "tokenize_pairs",
    "write_coreset",
]
