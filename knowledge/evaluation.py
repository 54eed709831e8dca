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
            reader = csv.DictReader(f, strict=True)
            if not reader.fieldnames:
                raise GroundTruthError(f"{path}: the file is empty; it needs a header line such as 'question,document'")
            cols = {c.strip().lower(): c for c in reader.fieldnames}
            if "question" not in cols:
                raise GroundTruthError(f"{path}: needs a 'question' column (found {sorted(cols)})")
            src_col = cols.get("document") or cols.get("filename") or cols.get("source")
            if not src_col:
                raise GroundTruthError(f"{path}: needs a 'document' (record id) or 'filename' column")
            course_col = cols.get("course")
            out = []
            for row in reader:
                line = reader.line_num  # the line the record ends on (a quoted field may span lines)
                if None in row:
                    raise GroundTruthError(f"{path}: line {line}: more fields than the header's {len(reader.fieldnames)}")
                q, s = (row.get(cols["question"]) or "").strip(), (row.get(src_col) or "").strip()
                if not q or not s:
                    raise GroundTruthError(f"{path}: line {line}: empty question or source")
                out.append(LabeledQuery(q, s, (row.get(course_col) or "").strip() or None if course_col else None))
    except UnicodeDecodeError as exc:
        raise GroundTruthError(f"{path}: not valid UTF-8") from exc
    except csv.Error as exc:
        raise GroundTruthError(f"{path}: malformed CSV near line {reader.line_num}: {exc}") from exc
    except OSError as exc:
        raise GroundTruthError(f"{path}: cannot read ({exc.strerror})") from exc
    if not out:
        raise GroundTruthError(f"{path}: no rows")
    return out


def check_ground_truth(queries: Sequence[LabeledQuery], sources: set[str], courses: set[str]) -> list[str]:
    """Warnings for labels the corpus cannot match: they would count as misses (an unknown source)
    or search every course (an unknown course) without anyone noticing."""
    warnings = []
    unknown = sorted({q.source for q in queries if q.source not in sources})
    if unknown:
        n = sum(q.source not in sources for q in queries)
        hint = ""
        for u in unknown:
            near = [s for s in sources if s.endswith("/" + u.lstrip("./")) or s == u.lstrip("./")]
            if near:
                hint = f" (did you mean {sorted(near)[0]!r} for {u!r}? paths are relative to the course folder)"
                break
        warnings.append(f"{n} question(s) name a source the corpus does not have, counted as misses: "
                        f"{', '.join(repr(u) for u in unknown[:5])}{' …' if len(unknown) > 5 else ''}{hint}")
    bad_courses = sorted({q.course for q in queries if q.course and q.course not in courses})
    if bad_courses:
        n = sum(bool(q.course) and q.course not in courses for q in queries)
        warnings.append(f"{n} question(s) name a course the corpus does not have, so they search all courses: "
                        f"{', '.join(repr(c) for c in bad_courses[:5])} (the corpus has {', '.join(sorted(courses))})")
    return warnings


def rank_metrics(ranked_sources: Sequence[Sequence[str]], relevant: Sequence[str], k: int = 5) -> dict[str, float]:
    """hit@1, hit@3, hit@5 (each at its own cut-off), hit@k when k is another, and MRR@k; ranks
    count distinct sources. ``ranked_sources`` must reach at least max(k, 5) distinct sources."""
    cuts = sorted({1, 3, 5, k})
    hits = dict.fromkeys(cuts, 0)
    rr = 0.0
    for ranked, rel in zip(ranked_sources, relevant, strict=True):
        dedup = list(dict.fromkeys(ranked))
        if rel not in dedup:
            continue
        pos = dedup.index(rel) + 1
        if pos <= k:
            rr += 1.0 / pos
        for cut in cuts:
            if pos <= cut:
                hits[cut] += 1
    n = max(len(relevant), 1)
    out = {f"hit@{c}": round(v / n, 4) for c, v in hits.items()}
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
