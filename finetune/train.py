"""Fine-tune the answer model on a dataset from ``finetune.data``: ``main(TrainConfig(...)) -> RunResult``.

A lean torch loop (on two CPU cores it is simpler and faster than the HF Trainer):

- the loss is on the answer tokens only (the prompt's labels are -100) and the vocabulary
  projection runs only at those positions (the prompt is ~90% of the tokens);
- three methods: ``full`` (every weight), ``freeze`` (the embeddings and the first
  ``freeze_layers`` decoder layers frozen, the rest trained) and ``lora`` (low-rank adapters via
  peft on the layers from ``freeze_layers`` up, merged into the weights before saving);
- with frozen bottom layers and no dropout in them, their output for an example never changes,
  so it is computed ONCE and cached (``cache_frozen``): each step then runs only the trained top
  layers, forward and backward. This is what makes CPU fine-tuning fit in minutes;
- validation loss every ``eval_every`` steps (and before the first step), early stopping after
  ``patience`` evaluations without improvement, the best weights restored at the end;
- resumable checkpoints (trained weights, optimizer, scheduler, step, data position, RNG states)
  written to a new folder and switched to with an atomic pointer file, so a crash mid-save leaves
  the previous checkpoint intact; deterministic for a given seed (data order is a function of the
  seed and the epoch);
- the output is a plain model folder (safetensors + tokenizer + ``tutorbot_model.json``) that
  ``HFGenerator`` loads like the base model, plus ``run.json`` and ``curves.png``.

Failures raise ``TrainError`` subclasses with a message saying what to do; nothing outside the
run's own folder is touched, so the model in service is never affected.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from finetune.data import Dataset, DatasetError, Example

log = logging.getLogger(__name__)

RUN_FORMAT = "tutorbot-run/1"
CHECKPOINT_FORMAT = "tutorbot-checkpoint/1"
MODEL_MANIFEST = "tutorbot_model.json"
PRESETS_DIR = Path(__file__).resolve().parent / "presets"
DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent / "data"  # the project's data folder
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


class TrainError(RuntimeError):
    """Training could not run or finish; the message says why and what to do."""


class CheckpointError(TrainError):
    """A checkpoint is missing, unreadable or from a different configuration."""


class TrainInterrupted(TrainError):
    """The run was interrupted (Ctrl-C); a checkpoint was saved when possible."""


class DiskFullError(TrainError):
    """No space left while writing a checkpoint or the model."""


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Every default is explained in one line; presets (finetune/presets/*.yaml) override them."""

    data_dir: str = _f("", "Dataset folder written by finetune.data (train/val/test JSONL + manifest). Required.")
    output_dir: str = _f("data/runs/latest", "Run folder: model/, checkpoints/, run.json, curves.png.")
    base_model_dir: str = _f("", "Model folder to start from; empty = the converted base model in data/models/base.")
    data_lessons: bool = _f(
        False, "Dataset option: also one example per lesson section (heading as question, first sentences as answer)."
    )
    method: Literal["full", "freeze", "lora"] = _f(
        "freeze", "freeze: train only the top layers; measured as good as full on our data at a fraction of the time."
    )
    freeze_layers: int = _f(
        22, "Bottom decoder layers kept frozen (of 30 in SmolLM2-135M); their output is cached once (freeze/lora)."
    )
    epochs: float = _f(4.0, "Passes over the training split; early stopping usually ends sooner.")
    max_steps: int = _f(0, "Stop after this many optimizer steps (0 = epochs decide). Tests use 2-3.")
    lr: float = _f(1e-4, "Peak learning rate: low, so the pre-trained knowledge is adjusted, not overwritten.")
    weight_decay: float = _f(0.0, "AdamW weight decay; with a few hundred steps it made no measurable difference.")
    warmup_ratio: float = _f(0.1, "Share of the steps with a linear warm-up, then linear decay to zero.")
    dropout: float = _f(
        0.1, "Residual dropout on the attention and MLP outputs of the trained layers: a brake on overfitting."
    )
    lora_r: int = _f(16, "LoRA rank: 16 adapts enough for short answers; 8 learned visibly slower.")
    lora_alpha: int = _f(32, "LoRA scale (alpha / r = 2, the common choice).")
    lora_targets: str = _f(LORA_TARGETS, "Comma-separated linear layers that get adapters.")
    batch_size: int = _f(8, "Examples per micro-batch: 8 keeps two cores busy without swapping.")
    grad_accum: int = _f(1, "Micro-batches per optimizer step (effective batch = batch_size x grad_accum).")
    max_length: int = _f(768, "Longest example in tokens: 3 passages + question (~600) + answer; longer drop a passage.")
    max_answer_tokens: int = _f(128, "Answer tokens kept for the loss (the tutor generates at most 96).")
    eval_every: int = _f(0, "Validate every N steps (0 = once per epoch).")
    patience: int = _f(2, "Stop after this many validations without a better validation loss (0 = never).")
    min_delta: float = _f(0.002, "A validation loss must improve by this much to count as better.")
    grad_clip: float = _f(1.0, "Gradient norm clip: guards the first steps against spikes.")
    seed: int = _f(13, "Seed for data order, dropout and LoRA initialisation: same seed, same model.")
    resume: bool = _f(False, "Continue from the latest checkpoint in output_dir instead of starting over.")
    checkpoint_every: int = _f(0, "Save a checkpoint every N steps (0 = at each validation).")
    cache_frozen: bool = _f(True, "Cache the frozen layers' output once instead of recomputing it every step.")
    threads: int = _f(0, "torch threads (0 = one per core; on a box shared with other jobs 1 can be faster).")
    device: str = _f("auto", "auto = cuda when available, else cpu.")
    show_progress: bool = _f(True, "Progress bar with time left on stderr.")

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}

    @classmethod
    def from_preset(cls, name_or_path: str | Path, **overrides) -> TrainConfig:
        """A preset file (finetune/presets/NAME.yaml or a path) with ``overrides`` (None values ignored)."""
        import yaml

        path = Path(name_or_path)
        if not path.suffix:
            path = PRESETS_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
            raise TrainError(f"no preset {name_or_path!r} (known presets: {known})")
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(raw, dict):
            raise TrainError(f"preset {path} must be a mapping of TrainConfig fields")
        values = {k: v for k, v in raw.items() if not k.startswith("_")}
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise TrainError(f"preset {path}: unknown field(s) {sorted(unknown)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def validate(self) -> None:
        if self.method not in ("full", "freeze", "lora"):
            raise TrainError(f"method must be full, freeze or lora, not {self.method!r}")
        for name in ("batch_size", "grad_accum", "max_length", "max_answer_tokens"):
            if getattr(self, name) < 1:
                raise TrainError(f"{name} must be at least 1")
        if self.lr <= 0 or (self.epochs <= 0 and self.max_steps <= 0):
            raise TrainError("lr must be > 0 and either epochs or max_steps > 0")
        if not 0 <= self.dropout < 1:
            raise TrainError("dropout must be in [0, 1)")
        if self.freeze_layers < 0:
            raise TrainError("freeze_layers must be >= 0")

    def fingerprint(self) -> dict:
        """What a checkpoint must share with the config resuming it."""
        keys = ("method", "freeze_layers", "lora_r", "lora_alpha", "lora_targets", "batch_size", "grad_accum",
                "max_length", "max_answer_tokens", "seed", "lr", "epochs", "max_steps", "warmup_ratio")
        return {k: getattr(self, k) for k in keys}


@dataclass
class RunResult:
    run_dir: Path
    model_dir: Path
    steps: int
    epochs_done: float
    best_step: int
    best_val_loss: float
    initial_val_loss: float
    final_train_loss: float
    train_curve: list[tuple[int, float]]
    val_curve: list[tuple[int, float]]
    seconds: float
    stopped_early: bool
    resumed_from: int | None
    trainable_params: int
    total_params: int
    data_sha256: str
    base_model: str
    config: dict
    curves_png: Path | None = None
    timings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("run_dir", "model_dir", "curves_png"):
            d[k] = str(d[k]) if d[k] is not None else None
        return d


# --- tokenisation --------------------------------------------------------------------------------


@dataclass
class Encoded:
    ids: list[int]
    n_prompt: int  # the first n_prompt ids are the prompt (no loss)
    example_id: str
    passages_dropped: int = 0

    @property
    def n_answer(self) -> int:
        return len(self.ids) - self.n_prompt


def encode_example(tokenizer, ex: Example, max_length: int, max_answer_tokens: int) -> Encoded:
    """prompt ids (exactly as HFGenerator builds them) + answer ids + end-of-turn.

    Too long: passages are dropped from the end (as a shorter retrieval would), then the answer cut.
    """
    from knowledge.generation import build_messages

    end = tokenizer.eos_token or "<|im_end|>"
    answer = tokenizer(ex.answer.strip() + end, add_special_tokens=False)["input_ids"][:max_answer_tokens]
    passages = list(ex.passages)
    dropped = 0
    while True:
        text = tokenizer.apply_chat_template(build_messages(ex.question, passages), add_generation_prompt=True,
                                             tokenize=False)
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(prompt) + len(answer) <= max_length or not passages:
            break
        passages.pop()
        dropped += 1
    if len(prompt) + len(answer) > max_length:  # no passages left and still too long: keep the prompt's end
        keep = max(8, max_length - len(answer))
        prompt = prompt[-keep:]
        answer = answer[: max_length - len(prompt)]
    return Encoded(list(prompt) + list(answer), len(prompt), ex.id, dropped)


# --- the model -------------------------------------------------------------------------------------


class _Parts:
    """The causal LM split for our loop: decoder (embeddings + layers + norm) and lm_head."""

    def __init__(self, model, frozen_bottom: int):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.model = model
        self.decoder = base.model
        self.lm_head = base.lm_head
        self.all_layers = self.decoder.layers
        self.frozen_bottom = frozen_bottom

    @contextlib.contextmanager
    def only_layers(self, start: int, stop: int | None = None, *, norm: bool = True) -> Iterator[None]:
        """Temporarily run the decoder with layers[start:stop] only (and without the final norm)."""
        import torch

        saved_layers, saved_norm = self.decoder.layers, self.decoder.norm
        self.decoder.layers = torch.nn.ModuleList(list(self.all_layers)[start:stop])
        if not norm:
            self.decoder.norm = torch.nn.Identity()
        try:
            yield
        finally:
            self.decoder.layers, self.decoder.norm = saved_layers, saved_norm


def _load_model(cfg: TrainConfig, model_dir: Path, device):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    except Exception as exc:
        raise TrainError(f"cannot load the model to fine-tune from {model_dir}: {exc}") from exc
    n_layers = len(model.model.layers)
    if cfg.method in ("freeze", "lora") and cfg.freeze_layers >= n_layers:
        raise TrainError(f"freeze_layers={cfg.freeze_layers} leaves nothing to train (the model has {n_layers} layers)")
    frozen = cfg.freeze_layers if cfg.method in ("freeze", "lora") else 0
    for layer in model.model.layers:
        if hasattr(layer, "self_attn"):
            # Attention dropout forces the slow math attention and a serial random mask of
            # batch x heads x T x T per layer on CPU (measured: 0.7 s per layer per step at T=600).
            layer.self_attn.attention_dropout = 0.0
    if cfg.dropout > 0:
        _add_residual_dropout(model.model.layers[frozen:], cfg.dropout)
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif cfg.method == "freeze":
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in model.model.layers[frozen:]:
            for p in layer.parameters():
                p.requires_grad_(True)
        for p in model.model.norm.parameters():
            p.requires_grad_(True)
    else:
        from peft import LoraConfig, get_peft_model

        for p in model.parameters():
            p.requires_grad_(False)
        lcfg = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,  # residual dropout instead (cheaper)
            target_modules=[t.strip() for t in cfg.lora_targets.split(",") if t.strip()],
            layers_to_transform=list(range(frozen, n_layers)) if frozen else None,
            bias="none", task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lcfg)
    model.to(device)
    return tokenizer, model, _Parts(model, frozen)


def _add_residual_dropout(layers, p: float) -> None:
    """GPT-2-style residual dropout: each trained layer's attention and MLP outputs are dropped (in
    training mode only) before they join the residual stream. Same regularising role as attention
    dropout at a twelfth of its cost on CPU."""
    import torch.nn.functional as F

    def on_output(module, _inputs, output):
        if not module.training:
            return output
        if isinstance(output, tuple):
            return (F.dropout(output[0], p, True), *output[1:])
        return F.dropout(output, p, True)

    for layer in layers:
        for sub in (getattr(layer, "self_attn", None), getattr(layer, "mlp", None)):
            if sub is not None:
                sub.register_forward_hook(on_output)


def _trainable(model) -> dict[str, Any]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# --- batches ---------------------------------------------------------------------------------------


def _epoch_order(encoded: Sequence[Encoded], batch: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches of indices for one epoch: shuffled (seed, epoch), then grouped by length in windows of
    8 batches so little padding is computed, then the batches shuffled again."""
    rng = random.Random(seed * 1_000_003 + epoch)
    idx = list(range(len(encoded)))
    rng.shuffle(idx)
    window = batch * 8
    batches: list[list[int]] = []
    for w in range(0, len(idx), window):
        chunk = sorted(idx[w:w + window], key=lambda i: len(encoded[i].ids))
        batches += [chunk[i:i + batch] for i in range(0, len(chunk), batch)]
    rng.shuffle(batches)
    return batches


class _Batcher:
    """Builds padded tensors for a list of example indices, from token ids or cached hidden states."""

    def __init__(self, encoded: Sequence[Encoded], pad_id: int, device, cache: list | None):
        self.encoded = encoded
        self.pad_id = pad_id
        self.device = device
        self.cache = cache

    def __call__(self, indices: Sequence[int]) -> dict:
        import torch

        exs = [self.encoded[i] for i in indices]
        T = max(len(e.ids) for e in exs)
        B = len(exs)
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        labels = torch.full((B, T), -100, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        for r, e in enumerate(exs):
            n = len(e.ids)
            ids[r, :n] = torch.tensor(e.ids)
            mask[r, :n] = 1
            labels[r, e.n_prompt:n] = ids[r, e.n_prompt:n]
        out = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device),
               "labels": labels.to(self.device)}
        if self.cache is not None:
            first = self.cache[indices[0]]
            h = torch.zeros((B, T, first.shape[-1]), dtype=torch.float32)
            for r, i in enumerate(indices):
                c = self.cache[i]
                h[r, : c.shape[0]] = c.float()
            out["hidden"] = h.to(self.device)
        return out


def _loss_sum(parts: _Parts, batch: dict) -> tuple[Any, int]:
    """Sum of the cross-entropy over answer tokens, and their count."""
    import torch
    import torch.nn.functional as F

    if "hidden" in batch:
        with parts.only_layers(parts.frozen_bottom):
            h = parts.decoder(inputs_embeds=batch["hidden"], attention_mask=batch["attention_mask"]).last_hidden_state
    else:
        h = parts.decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    labels = batch["labels"][:, 1:]
    sel = labels != -100
    n = int(sel.sum())
    if n == 0:
        return torch.zeros((), device=h.device, requires_grad=h.requires_grad), 0
    logits = parts.lm_head(h[:, :-1][sel])
    return F.cross_entropy(logits.float(), labels[sel], reduction="sum"), n


def _precompute_frozen(parts: _Parts, batcher: _Batcher, n: int, batch: int, progress) -> list:
    """Hidden states entering the first trained layer, per example (unpadded, bf16 to halve memory
    when the values are far from bf16's limits, else fp32)."""
    import torch

    out: list = [None] * n
    order = sorted(range(n), key=lambda i: len(batcher.encoded[i].ids))
    parts.model.eval()
    with torch.no_grad(), parts.only_layers(0, parts.frozen_bottom, norm=False):
        for s in range(0, n, batch):
            idx = order[s:s + batch]
            b = batcher(idx)
            h = parts.decoder(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
            for r, i in enumerate(idx):
                out[i] = h[r, : len(batcher.encoded[i].ids)].detach().to("cpu", torch.float32).clone()
            if progress:
                progress(min(s + batch, n))
    return out


def evaluate_loss(parts: _Parts, batcher: _Batcher, n: int, batch: int) -> float:
    """Mean answer-token loss over a split (no dropout, no gradients)."""
    import torch

    if n == 0:
        return float("nan")
    was_training = parts.model.training
    parts.model.eval()
    total, count = 0.0, 0
    order = sorted(range(n), key=lambda i: len(batcher.encoded[i].ids))
    with torch.no_grad():
        for s in range(0, n, batch):
            loss, k = _loss_sum(parts, batcher(order[s:s + batch]))
            total += float(loss)
            count += k
    if was_training:
        parts.model.train()
    return total / max(count, 1)


# --- checkpoints -----------------------------------------------------------------------------------


def _ckpt_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = _ckpt_root(run_dir)
    try:
        name = (root / "LATEST").read_text(encoding="utf-8").strip()
    except OSError:
        return None
    path = root / name
    return path if name and path.is_dir() else None


def _raise_disk(exc: OSError, what: str, run_dir: Path) -> None:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise DiskFullError(
            f"no space left on the disk while writing {what} in {run_dir}. Free some space and run again with "
            "--resume (the last complete checkpoint is intact); the model in service was not touched."
        ) from exc
    raise TrainError(f"could not write {what} in {run_dir}: {exc}") from exc


def save_checkpoint(run_dir: Path, step: int, state: dict, meta: dict) -> Path:
    """Write checkpoints/step-N/ (via a temp folder), then repoint LATEST atomically; drop older ones."""
    import torch

    root = _ckpt_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    final = root / name
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        torch.save(state, tmp / "state.pt")
        (tmp / "checkpoint.json").write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        ptr = root / f".LATEST.tmp-{os.getpid()}"
        ptr.write_text(name + "\n", encoding="utf-8")
        os.replace(ptr, root / "LATEST")
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_disk(exc, f"checkpoint {name}", run_dir)
    for old in root.iterdir():
        if old.is_dir() and old.name.startswith("step-") and old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, cfg: TrainConfig, data_sha: str) -> dict:
    import torch

    try:
        meta = json.loads((path / "checkpoint.json").read_text(encoding="utf-8"))
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(
            f"the checkpoint {path} is unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            "Delete that folder to fall back to the one before it (if any), or run without --resume to start over."
        ) from exc
    if meta.get("format") != CHECKPOINT_FORMAT or not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path} is not a tutorbot checkpoint (or is from another version); run without --resume")
    if meta.get("data_sha256") != data_sha:
        raise CheckpointError(
            f"the checkpoint {path} was trained on different data (sha256 {str(meta.get('data_sha256'))[:12]}, "
            f"now {data_sha[:12]}); run without --resume to start over"
        )
    theirs, ours = meta.get("fingerprint", {}), cfg.fingerprint()
    diff = {k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v}
    if diff:
        shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(f"the checkpoint {path} used a different configuration ({shown}); "
                              "resume with the same settings or start over without --resume")
    return state


# --- saving the model ------------------------------------------------------------------------------


def _base_manifest(model_dir: Path) -> dict:
    try:
        m = json.loads((model_dir / MODEL_MANIFEST).read_text(encoding="utf-8"))
        return m if isinstance(m, dict) else {}
    except (OSError, ValueError):
        return {}


def save_model(model, tokenizer, out: Path, manifest: dict) -> None:
    """Write a plain model folder atomically (temp sibling, renamed into place; manifest written last)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        model.eval()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / MODEL_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_disk(exc, "the fine-tuned model", out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def plot_curves(train: Sequence[tuple[int, float]], val: Sequence[tuple[int, float]], path: Path,
                title: str = "") -> Path | None:
    """Train and validation loss against the step, as a PNG (matplotlib, Agg)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - a declared dependency
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    if train:
        xs, ys = zip(*train, strict=True)
        ax.plot(xs, ys, label="train (per step)", alpha=0.6)
        if len(ys) >= 5:  # a running mean makes the trend readable
            k = max(2, len(ys) // 10)
            sm = [sum(ys[max(0, i - k + 1):i + 1]) / len(ys[max(0, i - k + 1):i + 1]) for i in range(len(ys))]
            ax.plot(xs, sm, label=f"train (mean of {k})")
    if val:
        xs, ys = zip(*val, strict=True)
        ax.plot(xs, ys, "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss on answer tokens")
    ax.set_title(title or "fine-tuning loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


# --- the run ---------------------------------------------------------------------------------------


def _set_seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    rest = max(1, total - warmup)
    return peak * max(0.0, 1.0 - (step - warmup) / rest)


def main(config: TrainConfig, *, progress: Callable[[str], None] | None = None) -> RunResult:
    """Train, validate, checkpoint, save the best model. See the module docstring."""
    import torch

    from finetune.base_model import BASE_MODEL_NAME, ensure_base_model

    cfg = config
    cfg.validate()
    say = progress or (lambda m: log.info("%s", m))
    t_start = time.monotonic()
    timings: dict[str, float] = {}
    if not cfg.data_dir:
        raise TrainError("TrainConfig.data_dir is required (a dataset folder from finetune.data)")
    try:
        ds = Dataset.load(cfg.data_dir)
    except DatasetError as exc:
        raise TrainError(str(exc)) from exc
    if not ds.train or not ds.val:
        raise TrainError(f"the dataset at {cfg.data_dir} has an empty train or validation split; rebuild it with more examples")
    run_dir = Path(cfg.output_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _raise_disk(exc, "the run folder", run_dir)
    ckpt = latest_checkpoint(run_dir) if cfg.resume else None
    if cfg.resume and ckpt is None:
        raise CheckpointError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}; run without --resume to start")
    ckpt_state = load_checkpoint(ckpt, cfg, ds.sha256) if ckpt is not None else None  # refuse before any work

    base_dir = Path(cfg.base_model_dir) if cfg.base_model_dir else ensure_base_model(DEFAULT_DATA_DIR, progress=say)
    base_manifest = _base_manifest(base_dir)
    base_name = base_manifest.get("base_model", BASE_MODEL_NAME)
    # Explicit: torch's thread count is per calling thread, and the embedder drops it to 1 for
    # short queries (knowledge.embedder), which would silently leave training on one core.
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    device = _device(cfg.device)
    _set_seed(cfg.seed)
    tokenizer, model, parts = _load_model(cfg, base_dir, device)
    params = _trainable(model)
    n_trainable = sum(p.numel() for p in params.values())
    n_total = sum(p.numel() for p in model.parameters())
    say(f"{cfg.method}: training {n_trainable / 1e6:.1f}M of {n_total / 1e6:.1f}M parameters on {device} "
        f"({len(ds.train)} train / {len(ds.val)} validation examples)")

    t0 = time.monotonic()
    enc_train = [encode_example(tokenizer, e, cfg.max_length, cfg.max_answer_tokens) for e in ds.train]
    enc_val = [encode_example(tokenizer, e, cfg.max_length, cfg.max_answer_tokens) for e in ds.val]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    timings["tokenize_s"] = round(time.monotonic() - t0, 2)
    use_cache = cfg.cache_frozen and parts.frozen_bottom > 0
    cache_train = cache_val = None
    if use_cache:
        t0 = time.monotonic()
        n_all = len(enc_train) + len(enc_val)
        bar = _bar(n_all, "caching frozen layers", cfg.show_progress, say=progress)
        cache_train = _precompute_frozen(parts, _Batcher(enc_train, pad_id, device, None), len(enc_train),
                                         cfg.batch_size, lambda k: bar.update(k - bar.n))
        done = len(enc_train)
        cache_val = _precompute_frozen(parts, _Batcher(enc_val, pad_id, device, None), len(enc_val),
                                       cfg.batch_size, lambda k: bar.update(done + k - bar.n))
        bar.close()
        timings["cache_frozen_s"] = round(time.monotonic() - t0, 2)
    train_b = _Batcher(enc_train, pad_id, device, cache_train)
    val_b = _Batcher(enc_val, pad_id, device, cache_val)

    per_epoch = math.ceil(len(enc_train) / cfg.batch_size)
    steps_per_epoch = max(1, math.ceil(per_epoch / cfg.grad_accum))
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = round(cfg.warmup_ratio * total)
    eval_every = cfg.eval_every or steps_per_epoch
    ckpt_every = cfg.checkpoint_every or eval_every
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)

    step, micro = 0, 0  # micro: micro-batches consumed in total (epoch = micro // per_epoch)
    train_curve: list[tuple[int, float]] = []
    val_curve: list[tuple[int, float]] = []
    best_val, best_step, bad = float("inf"), 0, 0
    best_state: dict | None = None
    resumed_from = None
    stopped_early = False
    if ckpt is not None:
        state = ckpt_state
        try:
            missing = set(params) - set(state["trainable"])
            if missing:
                raise KeyError(f"weights missing: {sorted(missing)[:3]}")
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(state["trainable"][n].to(p.device))
            opt.load_state_dict(state["optimizer"])
            step, micro = int(state["step"]), int(state["micro"])
            train_curve = [tuple(x) for x in state["train_curve"]]
            val_curve = [tuple(x) for x in state["val_curve"]]
            best_val, best_step, bad = float(state["best_val"]), int(state["best_step"]), int(state["bad"])
            best_state = state.get("best")
            torch.set_rng_state(state["torch_rng"])
            random.setstate(state["py_rng"])
            stopped_early = bool(state.get("stopped_early"))
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise CheckpointError(f"the checkpoint {ckpt} does not fit this model ({exc}); run without --resume") from exc
        resumed_from = step
        say(f"resumed from {ckpt.name} (step {step} of {total})")

    def snapshot() -> dict:
        return {n: p.detach().to("cpu").clone() for n, p in params.items()}

    def checkpoint() -> None:
        state = {
            "step": step, "micro": micro, "trainable": snapshot(), "optimizer": opt.state_dict(),
            "train_curve": train_curve, "val_curve": val_curve, "best_val": best_val, "best_step": best_step,
            "bad": bad, "best": best_state, "torch_rng": torch.get_rng_state(), "py_rng": random.getstate(),
            "stopped_early": stopped_early,
        }
        meta = {"format": CHECKPOINT_FORMAT, "step": step, "total_steps": total, "data_sha256": ds.sha256,
                "fingerprint": cfg.fingerprint(), "config": asdict(cfg), "base_model": str(base_dir),
                "best_val_loss": best_val, "created_at": datetime.now(UTC).isoformat(timespec="seconds")}
        save_checkpoint(run_dir, step, state, meta)

    def validate() -> float:
        nonlocal best_val, best_step, bad, best_state
        v = evaluate_loss(parts, val_b, len(enc_val), cfg.batch_size)
        val_curve.append((step, round(v, 5)))
        if v < best_val - cfg.min_delta:
            best_val, best_step, bad = v, step, 0
            best_state = snapshot()
        elif step > 0:
            bad += 1
        return v

    if not val_curve:
        t0 = time.monotonic()
        v0 = validate()
        timings["first_validation_s"] = round(time.monotonic() - t0, 2)
        say(f"validation loss before training: {v0:.4f}")
    initial_val = val_curve[0][1]

    model.train()
    bar = _bar(total, "fine-tuning", cfg.show_progress, initial=step, say=progress)
    t_loop = time.monotonic()
    try:
        while step < total and not stopped_early:
            lr = _lr_at(step, total, warmup, cfg.lr)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            micro_batches = []
            for _ in range(cfg.grad_accum):
                epoch, pos = divmod(micro, per_epoch)
                order = _epoch_order(enc_train, cfg.batch_size, cfg.seed, epoch)
                micro_batches.append(order[pos])
                micro += 1
            n_tokens = sum(train_b.encoded[i].n_answer for mb in micro_batches for i in mb) or 1
            loss_total = 0.0
            for mb in micro_batches:
                loss, _k = _loss_sum(parts, train_b(mb))
                (loss / n_tokens).backward()
                loss_total += float(loss.detach())
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
            opt.step()
            step += 1
            train_loss = loss_total / n_tokens
            if not math.isfinite(train_loss):
                raise TrainError(f"the training loss became {train_loss} at step {step}; lower the learning rate (--lr)")
            train_curve.append((step, round(train_loss, 5)))
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{val_curve[-1][1]:.3f}", refresh=False)
            if step % eval_every == 0 or step == total:
                v = validate()
                bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{v:.3f}")
                model.train()
                if cfg.patience and bad >= cfg.patience:
                    stopped_early = True
                    say(f"early stop at step {step}: no better validation loss for {bad} evaluations "
                        f"(best {best_val:.4f} at step {best_step})")
            if step % ckpt_every == 0 or stopped_early or step == total:
                checkpoint()
            if stopped_early:
                break
    except KeyboardInterrupt:
        bar.close()
        try:
            checkpoint()
            where = f"a checkpoint at step {step} was saved in {_ckpt_root(run_dir)}"
        except TrainError as exc:
            where = f"the checkpoint could not be saved ({exc})"
        raise TrainInterrupted(f"training interrupted at step {step} of {total}; {where}. "
                               "Run again with --resume to continue. The model in service was not touched.") from None
    bar.close()
    timings["train_loop_s"] = round(time.monotonic() - t_loop, 2)

    if best_state is not None and best_step != step:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(best_state[n].to(p.device))
        say(f"restored the best weights (step {best_step}, validation loss {best_val:.4f})")

    model_dir = run_dir / "model"
    manifest = {
        "format": "tutorbot-model/1",
        "kind": "finetuned",
        "name": f"finetuned:{run_dir.name}",
        "base_model": base_name,
        "base_model_hf_id": base_manifest.get("base_model_hf_id"),
        "parent": base_manifest.get("name", str(base_dir)),
        "method": cfg.method,
        "data_sha256": ds.sha256,
        "dtype": "float32",
        # Fine-tuned weights are off the packaged model's 4-bit grid: re-quantizing them to int4
        # undoes most of the fine-tuning (sample course, validation loss: base 2.187, fine-tuned
        # 2.036 in fp32, 2.037 in bf16, 2.169 re-quantized to int4 group-32). Serve them unquantized.
        "quantize": "none",
        "trained_layers": list(range(parts.frozen_bottom, len(parts.all_layers))) if cfg.method != "full" else "all",
        "parameters": n_total if cfg.method != "lora" else sum(
            p.numel() for n, p in model.named_parameters() if "lora_" not in n),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    t0 = time.monotonic()
    save_model(model, tokenizer, model_dir, manifest)
    timings["save_s"] = round(time.monotonic() - t0, 2)
    seconds = round(time.monotonic() - t_start, 1)
    result = RunResult(
        run_dir=run_dir, model_dir=model_dir, steps=step,
        epochs_done=round(micro / per_epoch, 2), best_step=best_step, best_val_loss=round(best_val, 5),
        initial_val_loss=initial_val, final_train_loss=train_curve[-1][1] if train_curve else float("nan"),
        train_curve=train_curve, val_curve=val_curve, seconds=seconds, stopped_early=stopped_early,
        resumed_from=resumed_from, trainable_params=n_trainable, total_params=n_total, data_sha256=ds.sha256,
        base_model=base_name, config=asdict(cfg), timings=timings,
    )
    result.curves_png = plot_curves(train_curve, val_curve, run_dir / "curves.png",
                                    title=f"{cfg.method} fine-tuning ({len(ds.train)} train examples)")
    run_json = result.to_json()
    run_json.update({
        "format": RUN_FORMAT,
        "dataset": {"path": str(ds.path), **{k: ds.manifest.get(k) for k in ("course_id", "counts", "seed", "sha256")}},
        "passages_dropped": sum(e.passages_dropped for e in enc_train + enc_val),
        "threads": torch.get_num_threads(),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    })
    try:
        _write_json(run_dir / "run.json", run_json)
    except OSError as exc:
        _raise_disk(exc, "run.json", run_dir)
    say(f"done in {seconds:.0f} s: {step} steps, validation loss {initial_val:.4f} -> {best_val:.4f} "
        f"(best at step {best_step}); model in {model_dir}")
    return result


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class _NoBar:
    n = 0

    def update(self, k: int = 1) -> None:
        self.n += k

    def set_postfix(self, **_kw) -> None:
        pass

    def close(self) -> None:
        pass


class _LineBar(_NoBar):
    """Progress as a plain line every ``every_s`` seconds and at the end, for logs and pipes (no
    terminal to draw a bar on): "fine-tuning: 12/40 steps (30%), loss=1.234 val=1.190, 2m10s, ~5m left"."""

    def __init__(self, total: int, desc: str, unit: str, say, initial: int = 0, every_s: float = 30.0) -> None:
        self.total, self.desc, self.unit, self.say, self.every_s = total, desc, unit, say, every_s
        self.n = self._start = initial
        self._t0 = self._last = time.monotonic()
        self._post: dict[str, str] = {}

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.monotonic()
        if now - self._last >= self.every_s or self.n >= self.total:
            self._last = now
            self.say(self.line(now))

    def line(self, now: float) -> str:
        elapsed = now - self._t0
        done = self.n - self._start
        parts = [f"{self.desc}: {self.n}/{self.total} {self.unit} ({self.n / max(self.total, 1):.0%})"]
        if self._post:
            parts.append(" ".join(f"{k}={v}" for k, v in self._post.items()))
        parts.append(_duration(elapsed))
        if done > 0 and self.n < self.total:
            parts.append(f"~{_duration(elapsed / done * (self.total - self.n))} left")
        return ", ".join(parts)

    def set_postfix(self, **kw) -> None:
        self._post = {k: str(v) for k, v in kw.items() if k != "refresh"}


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def _bar(total: int, desc: str, show: bool, initial: int = 0, say=None):
    unit = "step" if desc == "fine-tuning" else "ex"
    if not show:
        if say is not None:
            return _LineBar(total, desc, unit + "s", say, initial=initial)
        bar = _NoBar()
        bar.n = initial
        return bar
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit,
                dynamic_ncols=True, leave=False)
