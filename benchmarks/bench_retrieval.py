"""Retrieval on a real course FAQ (../shared/eval/faq): ours against BM25-only, dense-only and
reciprocal-rank fusion, all measured in this run, beside the published figures for this data.

    .venv/bin/python benchmarks/bench_retrieval.py [--limit N]

Ranking quality is computed on every ground-truth question (filtered by course) with query vectors
encoded in one batch; latency is measured per query end to end (query embedding + search) on a
sample, one query at a time, as the bot serves them.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import SHARED, rss_mb, stamp, table, write_section
from knowledge.course import faq_course_from_json
from knowledge.embedder import shared_minilm
from knowledge.evaluation import load_ground_truth, rank_metrics
from knowledge.index import KnowledgeIndex
from knowledge.retriever import Retriever

PUBLISHED = [
    ("Elasticsearch (text)", 0.740, 0.603),
    ("minsearch", 0.772, 0.661),
    ("vector search, question+answer", 0.917, 0.824),
    ("hybrid", 0.925, 0.851),
    ("reciprocal-rank fusion", 0.952, 0.875),
]


def rrf_sources(r: Retriever, q, qv, k=20, rrf_k=60) -> list[str]:
    dense = r.search(q.question, 50, course=q.course, query_vector=qv, dense_weight=1, bm25_weight=0)
    bm = r.search(q.question, 50, course=q.course, query_vector=qv, dense_weight=0, bm25_weight=1)
    fused: dict[int, float] = {}
    by_id = {}
    for ranking in (dense, bm):
        for rank, h in enumerate(ranking):
            key = id(h.chunk)
            by_id[key] = h.source
            fused[key] = fused.get(key, 0.0) + 1.0 / (rrf_k + rank + 1)
    return [by_id[i] for i in sorted(fused, key=lambda i: -fused[i])[:k]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N questions (0: all)")
    ap.add_argument("--latency-sample", type=int, default=500)
    ap.add_argument("--no-write", action="store_true", help="print only; do not update docs/BENCHMARKS.md")
    args = ap.parse_args()
    docs = SHARED / "eval" / "faq" / "documents-with-ids.json"
    gt_path = SHARED / "eval" / "faq" / "ground-truth-data.csv"
    if not docs.exists():
        sys.exit(f"needs {docs} (the shared evaluation data beside the project)")

    course = faq_course_from_json(docs)
    queries = load_ground_truth(gt_path)
    if args.limit:
        queries = queries[: args.limit]
    emb = shared_minilm()
    rss0 = rss_mb()
    t0 = time.perf_counter()
    idx = KnowledgeIndex.build(course, emb, show_progress=sys.stderr.isatty())
    build_s = time.perf_counter() - t0
    rss1 = rss_mb()
    index_mb = (idx.vectors.nbytes + idx.dense.ntotal * idx.dense.d * 4) / 2**20
    print(f"index: {len(idx)} chunks from {len(course.faq)} records in {build_s:.1f}s ({len(idx) / build_s:.0f} chunks/s)")

    r = Retriever(idx, emb)
    t0 = time.perf_counter()
    qvecs = emb.encode([q.question for q in queries], batch_size=128, show_progress=sys.stderr.isatty())
    enc_s = time.perf_counter() - t0
    relevant = [q.source for q in queries]

    def run(wd, wb):
        ranked = [[h.source for h in r.search(q.question, 20, course=q.course, query_vector=qvecs[i],
                                               dense_weight=wd, bm25_weight=wb)] for i, q in enumerate(queries)]
        return rank_metrics(ranked, relevant)

    systems = {
        "BM25 only (baseline)": run(0.0, 1.0),
        "dense only (MiniLM, question+answer)": run(1.0, 0.0),
        "reciprocal-rank fusion (dense + BM25)": rank_metrics(
            [rrf_sources(r, q, qvecs[i]) for i, q in enumerate(queries)], relevant),
        f"tutorbot hybrid (score fusion {r.dense_weight}/{r.bm25_weight})": run(r.dense_weight, r.bm25_weight),
    }
    rng = random.Random(0)
    sample = rng.sample(queries, min(args.latency_sample, len(queries)))
    for q in sample[:20]:  # warm-up
        r.search(q.question, 5, course=q.course)
    lat = []
    for q in sample:
        t0 = time.perf_counter()
        r.search(q.question, 5, course=q.course)
        lat.append((time.perf_counter() - t0) * 1000)
    p50, p95 = np.percentile(lat, 50), np.percentile(lat, 95)

    texts = Counter(q.question for q in queries)
    ambiguous = sum(n for n in texts.values() if n > 1)
    base = systems["BM25 only (baseline)"]
    rows = []
    for name, m in systems.items():
        rows.append([name, m["hit@1"], m["hit@3"], m["hit@5"], m["mrr@5"],
                     f"{m['hit@5'] / base['hit@5']:.3f}x / {m['mrr@5'] / base['mrr@5']:.3f}x"])
    for name, h5, mrr in PUBLISHED:
        rows.append([f"published: {name}", "", "", h5, mrr, ""])
    body = "\n".join([
        "## Retrieval (FAQ of three real courses)",
        "",
        "`.venv/bin/python benchmarks/bench_retrieval.py`: " + f"{len(course.faq)} FAQ records, {len(queries)} questions, "
        "each searched within its own course; ranks count distinct records.",
        "",
        stamp(),
        "",
        table(["system", "hit@1", "hit@3", "hit@5", "MRR@5", "vs BM25 (hit@5 / MRR@5)"], rows),
        "",
        f"- Query latency, end to end (MiniLM query embedding + FAISS + BM25 + fusion), one at a time, "
        f"{len(sample)} queries: **p50 {p50:.1f} ms, p95 {p95:.1f} ms**.",
        f"- Index build: {len(idx)} chunks in {build_s:.1f} s = **{len(idx) / build_s:.0f} chunks/s** "
        f"(index type {idx.manifest.index_type}); batch query encoding {len(queries) / enc_s:.0f} queries/s.",
        f"- Memory: process RSS {rss0:.0f} MB before the build, {rss1:.0f} MB after; vectors + FAISS {index_mb:.1f} MB.",
        f"- {ambiguous} of the {len(queries)} questions are the same text asked of several records "
        "(placeholders such as \"question1\"), so no system can rank all of them first.",
        "- Target: hit@5 >= 0.97 and MRR@5 >= 0.90, p95 <= 30 ms.",
    ])
    print(body)
    if not args.no_write and not args.limit:
        write_section("retrieval", body)


if __name__ == "__main__":
    main()
