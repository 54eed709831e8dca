"""Registry file logic on small fake model folders: register, promote, refuse, roll back, atomicity."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from finetune.base_model import BASE_MODEL_NAME, MANIFEST_NAME
from finetune.registry import POINTER, PromotionRefused, Registry, RegistryError, check_model_dir


def fake_model(folder: Path, *, base: str = BASE_MODEL_NAME, manifest: bool = True, weights: bool = True) -> Path:
    """A model folder with the files the registry checks (tiny safetensors, config, tokenizer)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    (folder / "tokenizer.json").write_text("{}", encoding="utf-8")
    if weights:
        save_file({"w": torch.zeros(2, 2)}, str(folder / "model.safetensors"))
    if manifest:
        (folder / MANIFEST_NAME).write_text(json.dumps({"base_model": base, "name": "finetuned:x",
                                                        "data_sha256": "abc"}), encoding="utf-8")
    return folder


def run_dir(tmp_path: Path, name: str, **kw) -> Path:
    d = tmp_path / "runs" / name
    fake_model(d / "model", **kw)
    (d / "run.json").write_text(json.dumps({"config": {"method": "freeze"}, "seconds": 12.5}), encoding="utf-8")
    return d


def metrics(score: float, baseline: float | None = None, baseline_model: str | None = None) -> dict:
    m = {"primary_metric": "answer_cosine", "primary": score}
    if baseline is not None:
        m["baseline"] = {"model": baseline_model or f"base:{BASE_MODEL_NAME}", "primary": baseline}
    return m


@pytest.fixture
def reg(tmp_path) -> Registry:
    return Registry(tmp_path / "models")


def test_empty_registry_serves_the_base_model(reg):
    assert reg.list() == []
    assert reg.current() is None and reg.current_dir() is None and reg.current_version() is None
    with pytest.raises(RegistryError, match="base model is already in service"):
        reg.rollback()


def test_register_writes_versioned_folders_with_manifests(reg, tmp_path):
    v1 = reg.register(run_dir(tmp_path, "a"), metrics(0.6))
    v2 = reg.register(run_dir(tmp_path, "b"), metrics(0.7))
    assert (v1, v2) == ("v1", "v2")
    listed = reg.list()
    assert [v.version for v in listed] == ["v1", "v2"]
    m = listed[1].manifest
    assert m["name"] == "v2" and m["version"] == "v2" and m["base_model"] == BASE_MODEL_NAME
    assert m["data_sha256"] == "abc" and m["config"] == {"method": "freeze"} and m["training_seconds"] == 12.5
    assert m["metrics"]["primary"] == 0.7 and m["created_at"] and m["registered_at"]
    assert "code_revision" in m  # a git sha here, None outside a checkout
    assert all(v.valid for v in listed)
    assert not [p for p in reg.root.iterdir() if p.name.startswith(".tmp-")]  # no leftovers


def test_promote_and_rollback_switch_current(reg, tmp_path):
    reg.register(run_dir(tmp_path, "a"), metrics(0.6, baseline=0.5))
    reg.register(run_dir(tmp_path, "b"), metrics(0.7, baseline=0.6, baseline_model="v1"))
    reg.promote("v1")
    assert reg.current_version() == "v1" and reg.current_dir() == reg.root / "v1"
    reg.promote("2")  # a bare number is accepted
    assert reg.current_version() == "v2"
    assert [v.version for v in reg.list() if v.current] == ["v2"]
    back = reg.rollback()
    assert back is not None and back.version == "v1" and reg.current_version() == "v1"
    assert reg.rollback() is None and reg.current_dir() is None  # back to the base model


def test_promotion_refused_when_worse_unless_forced(reg, tmp_path):
    reg.register(run_dir(tmp_path, "a"), metrics(0.7))
    reg.promote("v1")
    # measured against v1 on the same split: below
    reg.register(run_dir(tmp_path, "b"), metrics(0.65, baseline=0.68, baseline_model="v1"))
    with pytest.raises(PromotionRefused, match=r"below v1's 0\.6800"):
        reg.promote("v2")
    assert reg.current_version() == "v1"
    # no same-split baseline: compared with v1's stored score
    reg.register(run_dir(tmp_path, "c"), metrics(0.69))
    with pytest.raises(PromotionRefused, match="v1's stored score"):
        reg.promote("v3")
    reg.promote("v3", force=True)
    assert reg.current_version() == "v3"
    assert json.loads((reg.root / POINTER).read_text())["action"] == "promote (forced)"


def test_candidate_below_the_base_model_is_refused(reg, tmp_path):
    reg.register(run_dir(tmp_path, "a"), metrics(0.4, baseline=0.5))
    with pytest.raises(PromotionRefused, match="base:"):
        reg.promote("v1")
    assert reg.current_version() is None


def test_register_refuses_another_base_model_and_incomplete_folders(reg, tmp_path):
    with pytest.raises(RegistryError, match="built on gpt2"):
        reg.register(run_dir(tmp_path, "x", base="gpt2"), metrics(0.9))
    with pytest.raises(RegistryError, match=r"no tutorbot_model\.json"):
        reg.register(run_dir(tmp_path, "y", manifest=False), metrics(0.9))
    with pytest.raises(RegistryError, match="safetensors"):
        reg.register(run_dir(tmp_path, "z", weights=False), metrics(0.9))
    assert reg.list() == []


def test_corrupt_version_is_never_promoted_even_forced(reg, tmp_path):
    reg.register(run_dir(tmp_path, "a"), metrics(0.6))
    reg.promote("v1")
    reg.register(run_dir(tmp_path, "b"), metrics(0.9))
    w = reg.root / "v2" / "model.safetensors"
    data = w.read_bytes()
    w.unlink()  # the registry hard-links: write a new file rather than truncating the shared inode
    w.write_bytes(data[:10])
    assert not reg.get("v2").valid and "damaged" in reg.get("v2").problem
    with pytest.raises(RegistryError, match="cannot be promoted"):
        reg.promote("v2", force=True)
    assert reg.current_version() == "v1"
    assert (tmp_path / "runs" / "b" / "model" / "model.safetensors").stat().st_size == len(data)  # run intact


def test_damaged_current_version_falls_back_to_base(reg, tmp_path, caplog):
    reg.register(run_dir(tmp_path, "a"), metrics(0.6))
    reg.promote("v1")
    (reg.root / "v1" / MANIFEST_NAME).unlink()
    assert reg.current_dir() is None
    assert "damaged" in caplog.text


def test_interrupted_promotion_leaves_the_pointer_unchanged(reg, tmp_path, monkeypatch):
    reg.register(run_dir(tmp_path, "a"), metrics(0.6))
    reg.register(run_dir(tmp_path, "b"), metrics(0.7))
    reg.promote("v1")
    before = (reg.root / POINTER).read_text()

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(RegistryError, match="previous one stays in service"):
        reg.promote("v2")
    monkeypatch.undo()
    assert (reg.root / POINTER).read_text() == before
    assert reg.current_version() == "v1"
    assert not [p for p in reg.root.iterdir() if p.name.startswith(f".{POINTER}.tmp")]


def test_interrupted_register_leaves_no_version(reg, tmp_path, monkeypatch):
    import finetune.registry as registry_mod

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(registry_mod, "_link_or_copy", full_disk)
    with pytest.raises(RegistryError, match="No space left"):
        reg.register(run_dir(tmp_path, "a"), metrics(0.6))
    assert reg.list() == [] and not [p for p in reg.root.iterdir() if p.name.startswith(".tmp-")]


def test_polling_token_changes_on_promote_and_rollback(reg, tmp_path):
    reg.register(run_dir(tmp_path, "a"), metrics(0.6))
    t0 = reg.state_token()
    assert not reg.changed_since(t0)
    reg.promote("v1")
    assert reg.changed_since(t0)
    t1 = reg.state_token()
    assert t1.startswith("v1@")
    reg.rollback()
    assert reg.changed_since(t1) and reg.state_token().startswith("base@")


def test_unknown_version_and_bad_names(reg, tmp_path):
    reg.register(run_dir(tmp_path, "a"), metrics(0.6))
    with pytest.raises(RegistryError, match="no model version v7"):
        reg.promote("v7")
    with pytest.raises(RegistryError, match="not a version name"):
        reg.promote("latest")


def test_check_model_dir_accepts_the_real_layout(tmp_path):
    assert check_model_dir(fake_model(tmp_path / "m")) == ""
    assert "not a folder" in check_model_dir(tmp_path / "missing")


def test_runtime_uses_the_promoted_model(tmp_path):
    from bot.config import Settings
    from bot.runtime import current_model_dir

    s = Settings(data_dir=tmp_path)
    reg = Registry(s.resolved_models_dir)
    reg.register(run_dir(tmp_path, "a"), metrics(0.6))
    reg.promote("v1")
    assert current_model_dir(s) == s.resolved_models_dir / "v1"


async def test_watch_current_reloads_on_promotion(reg, tmp_path):
    import asyncio

    from finetune.registry import watch_current

    reg.register(run_dir(tmp_path, "a"), metrics(0.6))
    reloads: list[str | None] = []
    stop = asyncio.Event()
    task = asyncio.create_task(watch_current(reg, lambda: reloads.append(reg.current_version()),
                                             interval_s=0.02, stop=stop))
    await asyncio.sleep(0.1)
    assert reloads == []
    reg.promote("v1")
    for _ in range(100):
        if reloads:
            break
        await asyncio.sleep(0.02)
    assert reloads == ["v1"]
    stop.set()
    await asyncio.wait_for(task, 1)
