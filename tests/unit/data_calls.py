"""The data layer's entry points called with a whole Config, as the launchers and the trainer call them."""

from __future__ import annotations

from pathlib import Path

from megatrain.config import Config
from megatrain.data.dataset import DataInfo, TokenLoader, build_loader, check_data
from megatrain.data.preprocess import prepare


def run_prepare(cfg: Config) -> Path:
    return prepare(cfg.prepare, cfg.tokenizer, progress=cfg.logging.progress)


def run_check_data(cfg: Config) -> DataInfo:
    return check_data(cfg.data, cfg.tokenizer, seq_len=cfg.train.seq_len, model_vocab_size=cfg.model.vocab_size)


def run_build_loader(cfg: Config, **kwargs) -> TokenLoader:
    return build_loader(cfg.data, **kwargs)
