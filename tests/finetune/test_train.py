"""Training: masking, config and presets (fast); REAL tiny runs on the real base model (slow):
finite loss, checkpoints and exact resume, LoRA merged into a plain folder, bad-input errors."""

from __future__ import annotations

import errno
import json
import math
from pathlib import Path

import pytest

from finetune.data import Dataset, Example, dataset_hash
from finetune.train import (
    CheckpointError,
    DiskFullError,
    TrainConfig,
    TrainError,
    TrainInterrupted,
    encode_example,
    main,
)
from knowledge.generation import Passage

ROOT = Path(__file__).resolve().parents[2]

FACTS = [
    ("What is pre-training?", "Learning general patterns from a large dataset."),
    ("What is fine-tuning?", "Adapting a pre-trained model to one task with a small dataset."),
    ("Why use a low learning rate?", "Big steps would overwrite what the model already knows."),
    ("Why freeze layers?", "Frozen early layers keep general knowledge and reduce overfitting."),
    ("What is LoRA?", "Low-rank adaptation trains small extra matrices instead of all weights."),
    ("What does dropout do?", "It randomly switches off units so the model cannot memorise."),
    ("What is early stopping?", "Training stops when the validation loss stops improving."),
    ("What is overfitting?", "The model learns the training data by heart and fails on new data."),
    ("What is a validation set?", "Held-out examples used to check the model during training."),
    ("What is transfer learning?", "Reusing knowledge from one task for another."),
]


def tiny_dataset(folder: Path) -> Path:
    exs = []
    for i, (q, a) in enumerate(FACTS):
        p = Passage("Lesson", f"Part {i}", f"{a} This is covered in part {i} of the lesson.", "lessons/01.md")
        exs.append(Example(f"quiz:q{i}", f"quiz:q{i}", "quiz", q, a, (p,)))
    ds = Dataset(exs[:6], exs[6:8], exs[8:])
    ds.manifest = {"course_id": "tiny", "seed": 1, "counts": {}, "sha256": dataset_hash(ds)}
    ds.save(folder)
    return folder


@pytest.fixture(scope="module")
def base_dir():
    from finetune.base_model import ensure_base_model

    return ensure_base_model(ROOT / "data")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("data"))


def cfg(data_dir, out, base_dir, **kw) -> TrainConfig:
    values = dict(data_dir=str(data_dir), output_dir=str(out), base_model_dir=str(base_dir), method="freeze",
                  freeze_layers=26, batch_size=2, max_length=96, max_steps=3, eval_every=2, lr=1e-4,
                  show_progress=False, seed=5)
    values.update(kw)
    return TrainConfig(**values)


# --- fast -----------------------------------------------------------------------------------------


def test_every_config_field_explains_its_default():
    helps = TrainConfig.help()
    assert {"method", "epochs", "lr", "max_steps", "freeze_layers", "dropout", "lora_r", "lora_alpha", "batch_size",
            "grad_accum", "max_length", "patience", "seed", "output_dir", "eval_every"} <= set(helps)
    assert all(len(h) > 15 for h in helps.values())


def test_presets_load_and_override():
    c = TrainConfig.from_preset("sample-course", lr=3e-5, epochs=None)
    assert c.lr == 3e-5 and c.method in ("full", "freeze", "lora")
    assert TrainConfig.from_preset("faq-benchmark").data_dir == ""
    with pytest.raises(TrainError, match="known presets"):
        TrainConfig.from_preset("nope")


def test_bad_config_is_refused(tmp_path):
    with pytest.raises(TrainError, match="method"):
        TrainConfig(method="magic").validate()
    with pytest.raises(TrainError, match="data_dir"):
        main(TrainConfig(output_dir=str(tmp_path)))
    with pytest.raises(TrainError, match="no manifest"):
        main(TrainConfig(data_dir=str(tmp_path / "none"), output_dir=str(tmp_path)))


def test_prompt_tokens_are_masked_and_match_inference(base_dir, data_dir):
    """The prompt is exactly HFGenerator's prompt; labels cover only the answer and end-of-turn."""
    import torch
    from transformers import AutoTokenizer

    from finetune.train import _Batcher

    tok = AutoTokenizer.from_pretrained(base_dir)
    ds = Dataset.load(data_dir)
    ex = ds.train[0]
    enc = encode_example(tok, ex, max_length=768, max_answer_tokens=128)
    text = tok.apply_chat_template(ex.messages(), add_generation_prompt=True, tokenize=False)
    assert enc.ids[:enc.n_prompt] == tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(enc.ids[enc.n_prompt:]) == ex.answer + tok.eos_token
    enc2 = encode_example(tok, ds.train[1], max_length=768, max_answer_tokens=128)
    batch = _Batcher([enc, enc2], tok.pad_token_id, torch.device("cpu"), None)([0, 1])
    labels = batch["labels"]
    for r, e in enumerate((enc, enc2)):
        assert (labels[r, :e.n_prompt] == -100).all()
        assert labels[r, e.n_prompt:len(e.ids)].tolist() == e.ids[e.n_prompt:]
        assert (labels[r, len(e.ids):] == -100).all() and (batch["attention_mask"][r, len(e.ids):] == 0).all()


def test_long_examples_drop_passages_before_cutting(base_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    long = Passage("L", "S", "word " * 200)
    ex = Example("quiz:x", "quiz:x", "quiz", "What is it?", "An answer.", (long, long, long))
    enc = encode_example(tok, ex, max_length=300, max_answer_tokens=128)
    assert len(enc.ids) <= 300 and enc.passages_dropped >= 2
    assert tok.decode(enc.ids[enc.n_prompt:]) == "An answer." + tok.eos_token


# --- real training (slow) ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def freeze_run(base_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "freeze"
    return main(cfg(data_dir, out, base_dir, dropout=0.1, checkpoint_every=1))


@pytest.mark.slow
def test_real_run_trains_and_writes_a_loadable_model(freeze_run, base_dir):
    import torch
    from transformers import AutoModelForCausalLM

    r = freeze_run
    assert r.steps == 3 and len(r.train_curve) == 3
    assert all(math.isfinite(loss) for _, loss in r.train_curve)
    assert [s for s, _ in r.val_curve] == [0, 2, 3] and math.isfinite(r.best_val_loss)
    assert r.trainable_params < r.total_params
    run = json.loads((r.run_dir / "run.json").read_text())
    assert run["steps"] == 3 and run["config"]["method"] == "freeze" and run["data_sha256"] == r.data_sha256
    assert (r.run_dir / "curves.png").stat().st_size > 1000
    manifest = json.loads((r.model_dir / "tutorbot_model.json").read_text())
    assert manifest["base_model"] == "SmolLM2-135M-Instruct" and manifest["kind"] == "finetuned"
    model = AutoModelForCausalLM.from_pretrained(r.model_dir, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    top = "model.layers.29.mlp.down_proj.weight"
    bottom = "model.layers.0.mlp.down_proj.weight"
    sd, bsd = model.state_dict(), base.state_dict()
    assert not torch.equal(sd[top], bsd[top])  # trained
    assert torch.equal(sd[bottom], bsd[bottom])  # frozen


@pytest.mark.slow
def test_output_loads_in_the_generator(freeze_run):
    from finetune.generator import HFGenerator
    from knowledge.generation import GenerationRequest

    gen = HFGenerator(freeze_run.model_dir)
    out = gen.generate([GenerationRequest("What is fine-tuning?", (Passage("L", "S", FACTS[1][1]),), 12)])
    assert isinstance(out[0], str)


@pytest.mark.slow
def test_interrupted_run_resumes_exactly(freeze_run, base_dir, data_dir, tmp_path, monkeypatch):
    """Ctrl-C at step 2 saves a checkpoint; --resume continues from step 2 and ends where an
    uninterrupted run with the same seed ends (same losses)."""
    import finetune.train as train_mod

    real = train_mod._lr_at

    def interrupt_at_2(step, *a):
        if step == 2:
            raise KeyboardInterrupt
        return real(step, *a)

    out = tmp_path / "r"
    monkeypatch.setattr(train_mod, "_lr_at", interrupt_at_2)
    with pytest.raises(TrainInterrupted, match="--resume"):
        main(cfg(data_dir, out, base_dir, dropout=0.1, checkpoint_every=1))
    monkeypatch.setattr(train_mod, "_lr_at", real)
    assert (out / "checkpoints" / "LATEST").read_text().strip() == "step-000002"
    assert not (out / "model").exists()
    r = main(cfg(data_dir, out, base_dir, dropout=0.1, checkpoint_every=1, resume=True))
    assert r.resumed_from == 2 and r.steps == 3
    assert r.train_curve == freeze_run.train_curve
    assert r.val_curve == freeze_run.val_curve


@pytest.mark.slow
def test_resume_refuses_corrupt_or_mismatched_checkpoints(freeze_run, base_dir, data_dir, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(freeze_run.run_dir, out)
    with pytest.raises(CheckpointError, match="different configuration"):
        main(cfg(data_dir, out, base_dir, dropout=0.1, checkpoint_every=1, resume=True, lr=5e-4))
    latest = out / "checkpoints" / (out / "checkpoints" / "LATEST").read_text().strip()
    (latest / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"unreadable.*without --resume"):
        main(cfg(data_dir, out, base_dir, dropout=0.1, checkpoint_every=1, resume=True))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        main(cfg(data_dir, tmp_path / "fresh", base_dir, resume=True))


@pytest.mark.slow
def test_disk_full_while_checkpointing_is_a_clear_error(base_dir, data_dir, tmp_path, monkeypatch):
    import torch

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(DiskFullError, match=r"no space left.*--resume.*not touched"):
        main(cfg(data_dir, tmp_path / "full", base_dir, max_steps=1, eval_every=1))
    assert not any((tmp_path / "full" / "checkpoints").glob("step-*"))
    assert not (tmp_path / "full" / "model").exists()


@pytest.mark.slow
def test_lora_run_is_merged_into_a_plain_model(base_dir, data_dir, tmp_path):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    r = main(cfg(data_dir, tmp_path / "lora", base_dir, method="lora", freeze_layers=28, max_steps=2, lr=1e-3,
                 lora_r=4, lora_alpha=8))
    assert math.isfinite(r.train_curve[-1][1])
    with safe_open(str(r.model_dir / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if "lora" in k] and "model.layers.29.self_attn.q_proj.weight" in keys
    assert not (r.model_dir / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(r.model_dir, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    k = "model.layers.29.self_attn.q_proj.weight"
    assert not torch.equal(model.state_dict()[k], base.state_dict()[k])  # adapters merged in
    k0 = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(model.state_dict()[k0], base.state_dict()[k0])  # no adapters below freeze_layers


@pytest.mark.slow
def test_full_method_one_step(base_dir, data_dir, tmp_path):
    r = main(cfg(data_dir, tmp_path / "full", base_dir, method="full", max_steps=1, eval_every=1, batch_size=2))
    assert r.trainable_params == r.total_params and math.isfinite(r.final_train_loss)


def test_progress_without_a_terminal_is_a_plain_line_with_time_left():
    from finetune.train import _bar

    lines: list[str] = []
    bar = _bar(4, "fine-tuning", False, say=lines.append)
    bar.every_s = 0.0  # a line per update here; 30 s between lines in a real run
    bar.update(1)
    bar.set_postfix(loss="1.234", val="1.190", refresh=False)
    bar.update(3)
    assert lines[0].startswith("fine-tuning: 1/4 steps (25%), ") and "left" in lines[0]
    assert lines[1].startswith("fine-tuning: 4/4 steps (100%), loss=1.234 val=1.190, ")
    assert "left" not in lines[1]
    quiet = _bar(4, "fine-tuning", False)  # no callback: nothing to say it with
    quiet.update(4)
    assert quiet.n == 4
