"""Load, template and tokenise training data (labels masked to the response)."""
