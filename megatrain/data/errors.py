"""The one error type of the data pipeline."""

from __future__ import annotations

from megatrain.config import ConfigError


class DataError(ConfigError):
    """Bad input data, shards or tokenizer; the message names the file or key and what is wrong."""
