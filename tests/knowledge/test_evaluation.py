"""Retrieval evaluation: metrics at their own cut-offs, a strict ground-truth reader, and warnings for
labels the corpus cannot match. Pure functions: no model needed."""

from __future__ import annotations

import pytest

from knowledge.evaluation import (
    GroundTruthError,
    LabeledQuery,
    check_ground_truth,
    load_ground_truth,
    rank_metrics,
)


def test_metrics_count_distinct_sources_at_each_cut_off():
    ranked = [["a", "a", "b"], ["x", "y", "z", "b", "q"], ["c"], ["p", "q", "r", "s", "t", "b"]]
    m = rank_metrics(ranked, ["b", "b", "b", "b"], k=5)
    # ranks of b: 2 (a's second chunk does not count), 4, missing, 6
    assert m == {"hit@1": 0.0, "hit@3": 0.25, "hit@5": 0.5, "mrr@5": round((1 / 2 + 1 / 4) / 4, 4), "n": 4}


def test_a_small_k_cuts_mrr_but_not_hit_at_3_and_5():
    m = rank_metrics([["x", "b"], ["b"]], ["b", "b"], k=1)
    assert m["hit@1"] == 0.5 and m["hit@3"] == 1.0 and m["hit@5"] == 1.0 and m["mrr@1"] == 0.5


def test_a_large_k_adds_its_own_hit_rate():
    m = rank_metrics([list("acdefghb")], ["b"], k=10)
    assert m["hit@5"] == 0.0 and m["hit@10"] == 1.0 and m["mrr@10"] == round(1 / 8, 4)


@pytest.mark.parametrize(("text", "message"), [
    ("", "the file is empty"),
    ('question,document\nq,"x\n', "malformed CSV"),
    ("question,document\nq,a,extra\n", "line 2: more fields than the header's 2"),
    ('question,document\n"two\nlines",a\n\nq,\n', "line 5: empty question or source"),
    ("question,document\n", "no rows"),
])
def test_a_malformed_ground_truth_names_the_problem_and_line(tmp_path, text, message):
    path = tmp_path / "gt.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(GroundTruthError, match=message):
        load_ground_truth(path)


def test_labels_the_corpus_cannot_match_are_warned_about():
    queries = [LabeledQuery("q1", "01-intro.md", "ml"), LabeledQuery("q2", "lessons/02.md", "ml-zoomcamp"),
               LabeledQuery("q3", "lessons/02.md", None)]
    warnings = check_ground_truth(queries, {"lessons/01-intro.md", "lessons/02.md"}, {"ml"})
    assert len(warnings) == 2
    assert "1 question(s) name a source the corpus does not have, counted as misses: '01-intro.md'" in warnings[0]
    assert "did you mean 'lessons/01-intro.md'" in warnings[0]
    assert "'ml-zoomcamp' (the corpus has ml)" in warnings[1]
    assert check_ground_truth(queries[2:], {"lessons/02.md"}, {"ml"}) == []
