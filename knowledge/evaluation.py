"""Retrieval evaluation: hit@k and MRR@k over distinct sources, with query latency."""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class GroundTruthError(ValueError):
    pass


@dataclass(frozen=True)
class LabeledQuery:
    question: str
    source: str  # FAQ record id, or lesson path relative to the course folder
    course: str | None = None


def load_ground_truth(path: Path | str) -> list[LabeledQuery]:
    """CSV with ``question`` and ``document`` (record id) or ``filename`` (course-relative path); ``course`` optional."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            cols = {c.strip().lower(): c for c in (reader.fieldnames or [])}
            if "question" not in cols:
                raise GroundTruthError(f"{path}: needs a 'question' column (found {sorted(cols)})")
            src_col = cols.get("document") or cols.get("filename") or cols.get("source")
            if not src_col:
                raise GroundTruthError(f"{path}: needs a 'document' (record id) or 'filename' column")
            course_col = cols.get("course")
            out = []
            for n, row in enumerate(reader, 2):
                q, s = (row.get(cols["question"]) or "").strip(), (row.get(src_col) or "").strip()
                if not q or not s:
                    raise GroundTruthError(f"{path}: line {n}: empty question or source")
                out.append(LabeledQuery(q, s, (row.get(course_col) or "").strip() or None if course_col else None))
    except UnicodeDecodeError as exc:
        raise GroundTruthError(f"{path}: not valid UTF-8") from exc
    except csv.Error as exc:
        raise GroundTruthError(f"{path}: malformed CSV: {exc}") from exc
    except OSError as exc:
        raise GroundTruthError(f"{path}: cannot read ({exc.strerror})") from exc
    if not out:
        raise GroundTruthError(f"{path}: no rows")
    return out


def rank_metrics(ranked_sources: Sequence[Sequence[str]], relevant: Sequence[str], k: int = 5) -> dict[str, float]:
    hits = {1: 0, 3: 0, 5: 0, k: 0}
    rr = 0.0
    for ranked, rel in zip(ranked_sources, relevant, strict=True):
        dedup: list[str] = []
        for s in ranked:
            if s not in dedup:
                dedup.append(s)
        if rel in dedup[:k]:
            pos = dedup.index(rel) + 1
            rr += 1.0 / pos
            for cut in hits:
                if pos <= cut:
                    hits[cut] += 1
    n = max(len(relevant), 1)
    out = {f"hit@{c}": round(v / n, 4) for c, v in sorted(hits.items())}
    out[f"mrr@{k}"] = round(rr / n, 4)
    out["n"] = len(relevant)
    return out


def evaluate(
    search: Callable[[LabeledQuery], list[str]], queries: Sequence[LabeledQuery], k: int = 5
) -> dict[str, float]:
    """Run ``search`` (query -> ranked sources) on every query; metrics plus latency p50/p95 in ms."""
    ranked, lat = [], []
    for q in queries:
        t0 = time.perf_counter()
        ranked.append(search(q))
        lat.append((time.perf_counter() - t0) * 1000)
    out = rank_metrics(ranked, [q.source for q in queries], k)
    out["p50_ms"] = round(float(np.percentile(lat, 50)), 2)
    out["p95_ms"] = round(float(np.percentile(lat, 95)), 2)
    return out
