"""Evaluation: metric functions, the question set through a tutor, the model card (fast, with fakes),
and one real run of the base model on a two-example split (slow)."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest

from finetune.data import Dataset, Example, dataset_hash
from finetune.evaluate import (
    PRIMARY_METRIC,
    evaluate_model,
    metrics_table,
    model_card,
    question_set,
    token_f1,
)
from knowledge.generation import Passage

ROOT = Path(__file__).resolve().parents[2]


class BagOfWords:
    """Deterministic fake embedder: hashed word counts, L2-normalised."""

    name = "bow"
    dim = 64

    def encode(self, texts, **_kw):
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % self.dim] += 1
        n = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(n == 0, 1, n)


class EchoGenerator:
    """Answers with the first passage's text (a stand-in for a model that copies its context)."""

    name = "echo"

    def generate(self, requests):
        return [r.passages[0].text if r.passages else "" for r in requests]


def ds_with(answers: list[tuple[str, str, str]]) -> Dataset:
    exs = [Example(f"quiz:{i}", f"quiz:{i}", "quiz", q, a, (Passage("L", "S", p),)) for i, (q, a, p) in enumerate(answers)]
    ds = Dataset(exs[:1], exs[:1], exs)
    ds.manifest = {"sha256": dataset_hash(ds), "course_id": "c", "seed": 1,
                   "counts": {"train": {"quiz": 1, "total": 1}, "val": {"quiz": 1, "total": 1},
                              "test": {"quiz": len(exs), "total": len(exs)}}}
    return ds


def test_token_f1():
    assert token_f1("The model learns patterns", "model learns patterns") == 1.0  # articles dropped
    assert token_f1("cats", "dogs") == 0.0
    assert 0 < token_f1("a low learning rate keeps knowledge", "low learning rate") < 1
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0


def test_evaluate_with_a_fake_generator(tmp_path):
    ds = ds_with([("q1", "general patterns from data", "general patterns from data"),
                  ("q2", "a small focused dataset", "something unrelated entirely")])
    m = evaluate_model(tmp_path, ds, generator=EchoGenerator(), embedder=BagOfWords(), with_loss=False)
    assert m["n"] == 2 and m["primary_metric"] == PRIMARY_METRIC == "answer_cosine"
    assert m["primary"] == m["answer_cosine"]
    assert 0.4 < m["answer_cosine"] < 0.6  # one perfect, one unrelated
    assert m["token_f1"] == pytest.approx(0.5)
    assert m["examples"][0]["cosine"] == pytest.approx(1.0, abs=1e-4)


class FakeTutor:
    def __init__(self, facts_by_q):
        self.facts = facts_by_q

    def answer(self, question, history=()):
        from knowledge.tutor import Answer

        if question in self.facts:
            return Answer(question, " and ".join(f[0] for f in self.facts[question]), True, 0.8, mode="generative")
        return Answer(question, "Sorry, the course doesn't cover that.", False, 0.0, mode="declined")


def test_question_set_scores_facts_and_abstention(tmp_path):
    qfile = tmp_path / "qs.yaml"
    qfile.write_text(
        "questions:\n"
        "  - id: a\n    question: what is x\n    facts: [[general, broad], [data]]\n"
        "  - id: b\n    question: what is y\n    facts: [[slow]]\n"
        "offtopic:\n  - id: o\n    message: capital of france\n",
        encoding="utf-8",
    )
    tutor = FakeTutor({"what is x": [["general"], ["data"]], "what is y": [["fast"]]})
    r = question_set(tutor, qfile, workers=2)
    assert r["fact_coverage"] == 0.5 and r["facts_covered"] == pytest.approx(2 / 3)
    assert r["abstention_recall"] == 1.0 and r["abstention_precision"] == 1.0 and r["generated_share"] == 1.0


QUESTION_SETS = ("tutor_questions.yaml", "tutor_questions_dev.yaml", "tutor_questions_blind_a.yaml",
                 "tutor_questions_blind_b.yaml", "tutor_questions_blind_c.yaml")


def _question_set(name):
    import yaml

    return yaml.safe_load((ROOT / "benchmarks" / "data" / name).read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", QUESTION_SETS)
def test_shipped_question_set_is_readable_and_its_facts_are_in_the_lessons(name):
    data = _question_set(name)
    assert len(data["questions"]) >= 40 and len(data["offtopic"]) >= 10
    ids = [q["id"] for q in data["questions"]] + [o.get("id", o["message"]) for o in data["offtopic"]]
    assert len(ids) == len(set(ids))
    lessons = " ".join(p.read_text(encoding="utf-8") for p in (ROOT / "courses" / "pretraining-finetuning" / "lessons").glob("*.md"))
    lessons = " ".join(lessons.lower().replace("*", "").replace("`", "").split())
    for q in data["questions"]:
        assert q["facts"] and all(q["facts"]), q["id"]
        for fact in q["facts"]:  # a course edit that drops a fact's every wording breaks the set
            assert any(p.lower() in lessons for p in fact), (q["id"], fact)


def test_no_question_set_repeats_another():
    def words(name):
        return [set(q["question"].lower().split()) for q in _question_set(name)["questions"]]

    sets = [words(n) for n in QUESTION_SETS]
    for i, later in enumerate(sets):
        for earlier in sets[:i]:
            closest = max(len(a & b) / len(a | b) for a in later for b in earlier)
            assert closest < 0.6  # no question is a near copy of one in an earlier set (word-set Jaccard)


def test_model_card_has_data_config_metrics_and_curves():
    run = {"config": {"method": "freeze", "lr": 1e-4, "epochs": 4, "freeze_layers": 22}, "base_model": "SmolLM2-135M-Instruct",
           "seconds": 321.0, "steps": 20, "epochs_done": 3.3, "stopped_early": True, "initial_val_loss": 2.2,
           "best_val_loss": 1.4, "best_step": 12, "final_train_loss": 1.1, "train_curve": [[1, 2.5], [2, 2.0]],
           "val_curve": [[0, 2.2], [12, 1.4]]}
    manifest = {"course_id": "pretraining-finetuning", "seed": 13, "sha256": "f" * 64,
                "counts": {"train": {"quiz": 30, "flashcard": 11, "total": 41}, "val": {"quiz": 7, "total": 7},
                           "test": {"quiz": 9, "flashcard": 4, "total": 13}}}
    before = {"model": "base:SmolLM2-135M-Instruct", "loss": 2.3, "answer_cosine": 0.55, "token_f1": 0.2,
              "fact_coverage": 0.4, "primary_metric": "answer_cosine"}
    after = {"model": "finetuned:x", "loss": 1.5, "answer_cosine": 0.71, "token_f1": 0.35, "fact_coverage": 0.5,
             "primary_metric": "answer_cosine", "examples": [{"question": "q?", "reference": "r", "answer": "a"}]}
    card = model_card(run, manifest, before, after, version="v3", decision="better; promoted v3")
    for needle in ("# Model card: v3", "freeze", "| train | 30 | 11 | 0 | 0 | 41 |", "| before (step 0) |",
                   "2.200", "1.400", "![train and validation loss](curves.png)", "| 0.550 | 0.710 |", "40%",
                   "early-stopped", "**Decision:** better; promoted v3", "| lr | 0.0001 |"):
        assert needle in card, needle
    assert "fact" in metrics_table(before, after)


@pytest.mark.slow
def test_real_base_model_on_a_tiny_split():
    from finetune.base_model import ensure_base_model

    ds = ds_with([("What is fine-tuning?", "Adapting a pre-trained model to one task.",
                   "Fine-tuning adapts a pre-trained model to one task with a small dataset.")])
    m = evaluate_model(ensure_base_model(ROOT / "data"), ds, max_new_tokens=24)
    assert m["model"] == "base:SmolLM2-135M-Instruct" and math.isfinite(m["loss"]) and m["loss"] > 0
    assert -1 <= m["answer_cosine"] <= 1 and m["examples"][0]["answer"]


def test_evaluation_of_the_same_model_and_data_is_cached(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "tutorbot_model.json").write_text('{"name": "v1"}')

    class Counting(EchoGenerator):
        calls = 0

        def generate(self, requests):
            Counting.calls += 1
            return super().generate(requests)

    ds = ds_with([("q1", "general patterns", "general patterns")])
    kw = dict(generator=Counting(), embedder=BagOfWords(), with_loss=False, cache_dir=tmp_path / "cache")
    first = evaluate_model(tmp_path / "m", ds, **kw)
    again = evaluate_model(tmp_path / "m", ds, **kw)
    assert Counting.calls == 1 and again["cached"] and again["answer_cosine"] == first["answer_cosine"]
    other = ds_with([("q1", "general patterns", "general patterns"), ("q2", "x", "y")])
    evaluate_model(tmp_path / "m", other, **kw)  # different data: evaluated again
    (tmp_path / "m" / "tutorbot_model.json").write_text('{"name": "v2"}')
    evaluate_model(tmp_path / "m", ds, **kw)  # a different model in the same folder: again
    assert Counting.calls == 3


def test_is_better_needs_a_higher_primary_and_no_guard_regression():
    from finetune.evaluate import is_better

    base = {"model": "base", "primary": 0.50, "primary_metric": "answer_cosine", "fact_coverage": 0.45,
            "abstention_recall": 1.0}
    assert is_better(base, {**base, "primary": 0.55, "fact_coverage": 0.42})[0]  # within 0.05
    ok, why = is_better(base, {**base, "primary": 0.55, "fact_coverage": 0.35})
    assert not ok and "fact_coverage fell from 0.45 to 0.35" in why
    assert not is_better(base, {**base, "primary": 0.55, "abstention_recall": 0.95})[0]
    assert not is_better(base, {**base, "primary": 0.50})[0]  # a tie is not better
    assert is_better({"model": "x", "primary": 0.5}, {"primary": 0.6})[0]  # no question set: primary only


def test_guards_hold_against_extraction_while_no_model_is_promoted():
    from finetune.evaluate import is_better, with_extractive_floor

    base = {"model": "base", "primary": 0.5, "fact_coverage": 0.43, "abstention_recall": 1.0}
    extractive = {"fact_coverage": 0.72, "abstention_recall": 1.0}
    cand = {**base, "primary": 0.6, "fact_coverage": 0.60}
    assert is_better(base, cand)[0]  # better than the base model ...
    floor = with_extractive_floor(base, extractive)
    ok, why = is_better(floor, cand)  # ... but worse than what students get now
    assert not ok and "extractive" in why and "0.72" in why
    assert is_better(floor, {**cand, "fact_coverage": 0.70})[0]  # within the tolerance of extraction
    assert with_extractive_floor(base, None) is base
