"""Shared fixtures for the answer-model tests: the base model, converted once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def base_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir holding the converted base model (the one-time GGUF conversion, ~30 s)."""
    from finetune.base_model import ensure_base_model

    data_dir = tmp_path_factory.mktemp("tutorbot-data")
    ensure_base_model(data_dir)
    return data_dir


@pytest.fixture(scope="session")
def base_model_dir(base_data_dir: Path) -> Path:
    from finetune.base_model import base_model_dir

    return base_model_dir(base_data_dir)


@pytest.fixture(scope="session")
def generator(base_model_dir: Path):
    """The real answer model with the default (fast) settings, shared by the session."""
    from finetune.generator import HFGenerator

    return HFGenerator(base_model_dir)
