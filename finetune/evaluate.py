"""Before/after evaluation of an answer model on the same held-out split, and the model card.

``evaluate_model(model_dir, dataset)`` returns a dict of metrics:

- ``loss``: mean cross-entropy on the reference answers' tokens of the split (teacher forcing);
- ``answer_cosine`` (the PRIMARY metric): mean MiniLM cosine between the model's answer and the
  reference answer, the model prompted exactly as in service (same retrieved passages); it rewards
  saying the right thing in other words, which token overlap does not;
- ``token_f1``: SQuAD-style token F1 of answer vs reference (lower-cased, punctuation and articles
  removed), a stricter, wording-sensitive companion;
- when a question set is given (the sample course's ``benchmarks/data/tutor_questions.yaml``),
  answers through the real ``Tutor`` in generative mode: ``fact_coverage`` (share of questions
  whose answer contains all their facts), ``facts_covered`` (share of single facts),
  ``abstention_recall`` / ``abstention_precision`` on the off-topic messages, and
  ``generated_share`` (answers the tutor kept from the model rather than falling back to extraction).

``primary`` / ``primary_metric`` name the score used to decide promotion (higher is better).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import string
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from finetune.data import Dataset, Example

log = logging.getLogger(__name__)

PRIMARY_METRIC = "answer_cosine"
ROOT = Path(__file__).resolve().parent.parent
TUTOR_QUESTIONS = ROOT / "benchmarks" / "data" / "tutor_questions.yaml"
SAMPLE_COURSE_ID = "pretraining-finetuning"  # the course tutor_questions.yaml was written for

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_tokens(text: str) -> list[str]:
    text = text.lower()
    text = "".join(ch if ch not in string.punctuation else " " for ch in text)
    return _ARTICLES.sub(" ", text).split()


def token_f1(prediction: str, reference: str) -> float:
    p, r = normalize_tokens(prediction), normalize_tokens(reference)
    if not p or not r:
        return float(p == r)
    common = Counter(p) & Counter(r)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(r)
    return 2 * precision * recall / (precision + recall)


def covers(answer: str, fact: Sequence[str]) -> bool:
    low = answer.lower()
    return any(p.lower() in low for p in fact)


def cosine_pairs(embedder, a: Sequence[str], b: Sequence[str]) -> list[float]:
    if not a:
        return []
    va = embedder.encode([x or " " for x in a])
    vb = embedder.encode([x or " " for x in b])
    return [float(x) for x in (va * vb).sum(1)]


def split_loss(model_dir: Path | str, examples: Sequence[Example], *, batch_size: int = 4,
               max_length: int = 768, max_answer_tokens: int = 128) -> float:
    """Mean answer-token loss of the model in ``model_dir`` on ``examples`` (the training loss's definition)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from finetune.train import _Batcher, _Parts, encode_example, evaluate_loss

    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    enc = [encode_example(tok, e, max_length, max_answer_tokens) for e in examples]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return evaluate_loss(_Parts(model, 0), _Batcher(enc, pad, torch.device("cpu"), None), len(enc), batch_size)


def serving_quantize(model_dir: Path | str) -> str:
    """The quantization a model folder asks for in its manifest (fine-tuned: "none"), else "auto"."""
    try:
        q = json.loads((Path(model_dir) / "tutorbot_model.json").read_text(encoding="utf-8")).get("quantize")
    except (OSError, ValueError, AttributeError):
        q = None
    return q if q in ("none", "int8", "int4") else "auto"


def generate_answers(generator, examples: Sequence[Example], *, batch_size: int = 8, max_new_tokens: int = 96,
                     progress: Callable[[int, int], None] | None = None) -> list[str]:
    from knowledge.generation import GenerationRequest

    out: list[str] = []
    for s in range(0, len(examples), batch_size):
        chunk = examples[s:s + batch_size]
        out += generator.generate([GenerationRequest(e.question, e.passages, max_new_tokens) for e in chunk])
        if progress:
            progress(len(out), len(examples))
    return out


def question_set(tutor, path: Path | str = TUTOR_QUESTIONS, *, workers: int = 8) -> dict:
    """Fact coverage and abstention through the real Tutor (same scoring as benchmarks/bench_tutor.py)."""
    from concurrent.futures import ThreadPoolExecutor

    import yaml

    from knowledge.tutor import Turn

    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    qs, off = data.get("questions") or [], data.get("offtopic") or []

    def ask(q):
        hist = [Turn(t["role"], t["content"]) for t in q.get("history") or []]
        return tutor.answer(q["question"], history=hist)

    with ThreadPoolExecutor(max_workers=workers) as pool:  # concurrent questions batch in the generator
        answers = list(pool.map(ask, qs))
        off_answers = list(pool.map(lambda o: tutor.answer(o["message"]), off))
    full = sum(a.answered and all(covers(a.text, f) for f in q["facts"]) for q, a in zip(qs, answers, strict=True))
    facts_total = sum(len(q["facts"]) for q in qs)
    facts_hit = sum(covers(a.text, f) for q, a in zip(qs, answers, strict=True) for f in q["facts"] if a.answered)
    declined_off = sum(not a.answered for a in off_answers)
    declined = declined_off + sum(not a.answered for a in answers)
    return {
        "questions": len(qs),
        "fact_coverage": full / len(qs) if qs else None,
        "facts_covered": facts_hit / facts_total if facts_total else None,
        "abstention_recall": declined_off / len(off) if off else None,
        "abstention_precision": declined_off / declined if declined else 1.0,
        "generated_share": sum(a.mode == "generative" for a in answers) / len(answers) if answers else None,
        "samples": [{"question": q["question"], "answer": a.text, "mode": a.mode} for q, a in list(zip(qs, answers, strict=True))[:5]],
    }


def default_questions(course, questions: Path | str | None) -> Path | str | None:
    """The question set to use: the one given, else the sample course's own for the sample course."""
    if questions is None and getattr(course, "id", None) == SAMPLE_COURSE_ID and TUTOR_QUESTIONS.is_file():
        return TUTOR_QUESTIONS
    return questions


def evaluate_model(
    model_dir: Path | str,
    dataset: Dataset,
    *,
    split: str = "test",
    course=None,
    retriever=None,
    questions: Path | str | None = None,
    generator=None,
    embedder=None,
    batch_size: int = 8,
    max_new_tokens: int = 96,
    with_loss: bool = True,
    progress: Callable[[str], None] | None = None,
    cache_dir: Path | str | None = None,
) -> dict:
    """Metrics of the model in ``model_dir`` on ``dataset``'s ``split`` (see the module docstring).

    ``questions``: a question set (YAML) answered through the Tutor with this model; needs
    ``course`` and ``retriever``. By default the sample course's set is used for the sample course.
    ``cache_dir``: reuse a result computed before for the same model (manifest), data (sha256),
    split, question set and settings: the model in service is evaluated once per dataset, not per run.
    """
    from finetune.generator import HFGenerator, read_model_name
    from knowledge.embedder import shared_minilm

    say = progress or (lambda m: log.info("%s", m))
    t0 = time.monotonic()
    model_dir = Path(model_dir)
    examples = dataset.split(split)
    name = read_model_name(model_dir)
    questions = default_questions(course, questions)
    use_questions = questions is not None and course is not None and retriever is not None
    cache_file = None
    if cache_dir is not None:
        key = _cache_key(model_dir, dataset, split, questions if use_questions else None,
                         (batch_size, max_new_tokens, with_loss, getattr(embedder, "name", "minilm")))
        cache_file = Path(cache_dir) / f"{key}.json"
        try:
            cached = json.loads(cache_file.read_text(encoding="utf-8"))
            say(f"{name}: evaluation reused from {cache_file.name} (same model, data and settings)")
            return {**cached, "cached": True}
        except (OSError, ValueError):
            pass
    emb = embedder or shared_minilm()
    result: dict = {"model": name, "model_dir": str(model_dir), "split": split, "n": len(examples),
                    "primary_metric": PRIMARY_METRIC}
    if with_loss:
        say(f"{name}: loss on the {split} split ({len(examples)} examples)")
        result["loss"] = round(split_loss(model_dir, examples), 5)
    gen = generator or HFGenerator(model_dir, quantize=serving_quantize(model_dir))
    say(f"{name}: answering the {split} split")
    answers = generate_answers(gen, examples, batch_size=batch_size, max_new_tokens=max_new_tokens)
    refs = [e.answer for e in examples]
    cos = cosine_pairs(emb, answers, refs)
    result["answer_cosine"] = round(sum(cos) / len(cos), 5) if cos else None
    result["token_f1"] = round(sum(token_f1(a, r) for a, r in zip(answers, refs, strict=True)) / len(refs), 5) if refs else None
    result["answer_words"] = round(sum(len(a.split()) for a in answers) / max(len(answers), 1), 1)
    result["examples"] = [{"question": e.question, "reference": e.answer, "answer": a, "cosine": round(c, 4)}
                          for e, a, c in list(zip(examples, answers, cos, strict=True))[:8]]
    if use_questions:
        from knowledge.batching import BatchingGenerator
        from knowledge.tutor import Tutor

        say(f"{name}: the question set {Path(questions).name} through the tutor")
        batching = BatchingGenerator(gen, max_batch=batch_size)
        try:
            qs = question_set(Tutor(course, retriever, batching, mode="generative"), questions)
        finally:
            if hasattr(batching, "close"):
                batching.close()
        result.update({k: (round(v, 5) if isinstance(v, float) else v) for k, v in qs.items()})
    result["primary"] = result.get(PRIMARY_METRIC)
    result["seconds"] = round(time.monotonic() - t0, 1)
    if cache_file is not None:
        with contextlib.suppress(OSError):
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f".{cache_file.name}.tmp")
            tmp.write_text(json.dumps(result, default=str), encoding="utf-8")
            os.replace(tmp, cache_file)
    return result


def _cache_key(model_dir: Path, dataset: Dataset, split: str, questions, settings: tuple) -> str:
    """Identity of an evaluation: the model's manifest (or its weights' size and time), the data,
    the question set's content and the settings."""
    try:
        ident = (model_dir / "tutorbot_model.json").read_text(encoding="utf-8")
    except OSError:
        ident = str(model_dir.resolve())
    for w in sorted(model_dir.glob("*.safetensors")):
        st = w.stat()
        ident += f"|{w.name}:{st.st_size}:{st.st_mtime_ns}"
    qtext = Path(questions).read_text(encoding="utf-8") if questions else ""
    raw = json.dumps([ident, dataset.sha256, split, qtext, list(settings)], sort_keys=True)
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()[:24]


# Guard rails for an automatic promotion: besides a higher primary metric, the tutor must not get
# worse for students. Fact coverage may dip by at most 3 of the 60 sample questions (its run-to-run
# noise between two equally good models), abstention may not drop at all.
GUARDS = {"fact_coverage": 0.05, "abstention_recall": 0.0}


def with_extractive_floor(before: dict, extractive: dict | None) -> dict:
    """The guard metrics students get now. With no promoted model, the tutor's ``auto`` mode
    answers by extraction, not with the base model: a candidate must then hold its guard metrics
    against the better of the two, or promoting it would make the tutor worse."""
    if not extractive:
        return before
    out = dict(before)
    for key in GUARDS:
        ext, cur = extractive.get(key), before.get(key)
        if isinstance(ext, (int, float)) and (not isinstance(cur, (int, float)) or ext > cur):
            out[key] = ext
            out.setdefault("guard_source", {})[key] = "extractive"
    return out


def extractive_question_set(course, retriever, questions: Path | str | None = None) -> dict | None:
    """The question set answered by extraction (no model), for the sample course; None otherwise."""
    from knowledge.tutor import Tutor

    questions = default_questions(course, questions)
    if questions is None:
        return None
    res = question_set(Tutor(course, retriever, None, mode="extractive"), questions)
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in res.items() if k != "samples"}


def is_better(before: dict, after: dict, guards: dict[str, float] = GUARDS) -> tuple[bool, str]:
    """(better, reason): the primary metric improves and no guard metric regresses past its tolerance."""
    name = after.get("primary_metric", PRIMARY_METRIC)
    a, b = after.get("primary"), before.get("primary")
    if a is None:
        return False, f"{name}: the new model has no score"
    reason = f"{name} {a:.4f} vs {b:.4f} for {before.get('model')}" if b is not None else f"{name} {a:.4f}"
    if b is not None and not a > b:
        return False, reason
    for key, tol in guards.items():
        ga, gb = after.get(key), before.get(key)
        if isinstance(ga, (int, float)) and isinstance(gb, (int, float)) and ga < gb - tol - 1e-9:
            src = " (extractive answers, what students get now)" if (before.get("guard_source") or {}).get(key) else ""
            return False, f"{reason}, but {key} fell from {gb:.2f}{src} to {ga:.2f} (tolerance {tol:.2f})"
    return True, reason


# --- the model card --------------------------------------------------------------------------------

_ROWS = [
    ("loss", "loss on reference answers (test split, lower is better)", "{:.3f}"),
    ("answer_cosine", "answer cosine to reference (MiniLM, test split) - primary", "{:.3f}"),
    ("token_f1", "token F1 to reference (test split)", "{:.3f}"),
    ("answer_words", "mean answer length (words)", "{:.0f}"),
    ("fact_coverage", "questions answered with all their facts (tutor, question set)", "{:.0%}"),
    ("facts_covered", "facts covered (tutor, question set)", "{:.0%}"),
    ("generated_share", "answers kept from the model (rest: extractive fallback)", "{:.0%}"),
    ("abstention_recall", "off-topic messages declined", "{:.0%}"),
    ("abstention_precision", "declines that were off-topic", "{:.0%}"),
]


def _fmt(v, fmt: str) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    try:
        return fmt.format(v)
    except (ValueError, TypeError):
        return str(v)


def metrics_table(before: dict, after: dict) -> str:
    lines = [f"| metric | before ({before.get('model', 'current')}) | after (fine-tuned) |", "|---|---:|---:|"]
    for key, label, fmt in _ROWS:
        if before.get(key) is None and after.get(key) is None:
            continue
        lines.append(f"| {label} | {_fmt(before.get(key), fmt)} | {_fmt(after.get(key), fmt)} |")
    return "\n".join(lines)


def model_card(run: dict, dataset_manifest: dict, before: dict, after: dict, *, version: str | None = None,
               curves: str = "curves.png", promoted: bool | None = None, decision: str = "") -> str:
    """Markdown: data, configuration, metrics before/after, train/validation loss, the curves PNG."""
    cfg = run.get("config") or {}
    counts = dataset_manifest.get("counts") or {}
    val = run.get("val_curve") or []
    train = run.get("train_curve") or []
    first_train = train[0][1] if train else None
    title = f"Model card: {version}" if version else "Model card: fine-tuned answer model"
    out = [f"# {title}", ""]
    out += [f"Base model **{run.get('base_model')}**, fine-tuned with **{cfg.get('method')}** "
            f"on course **{dataset_manifest.get('course_id')}** in {run.get('seconds', 0):.0f} s "
            f"({run.get('steps')} steps, {run.get('epochs_done')} epochs"
            + (", early-stopped" if run.get("stopped_early") else "") + ").", ""]
    out += ["## Data", "",
            "| split | " + " | ".join(k for k in ("quiz", "flashcard", "faq", "feedback")) + " | total |",
            "|---|---:|---:|---:|---:|---:|"]
    for split in ("train", "val", "test"):
        c = counts.get(split) or {}
        out.append(f"| {split} | " + " | ".join(str(c.get(k, 0)) for k in ("quiz", "flashcard", "faq", "feedback"))
                   + f" | {c.get('total', 0)} |")
    out += ["", f"Split by source (a quiz question, flashcard, FAQ record or reviewed answer never straddles splits), "
            f"seed {dataset_manifest.get('seed')}; dataset sha256 `{str(dataset_manifest.get('sha256'))[:16]}`. "
            "Every prompt holds the passages the tutor's retriever returns for the question.", ""]
    out += ["## Training: before and after, train and validation", "",
            "| | train loss | validation loss |", "|---|---:|---:|",
            f"| before (step 0) | {_fmt(first_train, '{:.3f}')} (first step) | {_fmt(run.get('initial_val_loss'), '{:.3f}')} |",
            f"| after (best, step {run.get('best_step')}) | {_fmt(run.get('final_train_loss'), '{:.3f}')} (last step) "
            f"| {_fmt(run.get('best_val_loss'), '{:.3f}')} |", ""]
    if val:
        out += ["Validation loss by step: " + ", ".join(f"{s}: {v:.3f}" for s, v in val) + ".", ""]
    out += [f"![train and validation loss]({curves})", ""]
    out += ["## Metrics on the held-out test split and the question set", "", metrics_table(before, after), ""]
    out += [f"Primary metric: `{after.get('primary_metric', PRIMARY_METRIC)}` (higher is better)."]
    if decision:
        out += ["", f"**Decision:** {decision}"]
    elif promoted is not None:
        out += ["", f"**Promoted:** {'yes' if promoted else 'no'}"]
    out += ["", "## Configuration", "", "| setting | value |", "|---|---|"]
    keys = ("method", "freeze_layers", "epochs", "max_steps", "lr", "dropout", "lora_r", "lora_alpha", "batch_size",
            "grad_accum", "max_length", "patience", "seed", "warmup_ratio", "weight_decay")
    out += [f"| {k} | {cfg.get(k)} |" for k in keys if k in cfg]
    ex = after.get("examples") or []
    if ex:
        b_ex = {e["question"]: e["answer"] for e in before.get("examples") or []}
        out += ["", "## Sample answers (test split)", ""]
        for e in ex[:4]:
            out += [f"- **Q:** {e['question']}", f"  - reference: {e['reference']}",
                    f"  - before: {b_ex.get(e['question'], '-')}", f"  - after: {e['answer']}"]
    return "\n".join(out) + "\n"
