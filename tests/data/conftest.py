"""Fixtures for the data tests (helpers live in data_helpers.py)."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore", message=".*Transformer Engine.*")  # megatron import noise

from harness.data_helpers import corpus_texts  # noqa: E402


@pytest.fixture(scope="session")
def trained_tokenizers(tmp_path_factory) -> tuple[Path, Path]:
    """A K2-style BPE trained here on real text, not the shipped files: (json, tiktoken)."""
    from k2mcore.data.tokenizers import train_k2_bpe

    out = tmp_path_factory.mktemp("tok")
    return train_k2_bpe(corpus_texts(400), 1024, out, "trained")
