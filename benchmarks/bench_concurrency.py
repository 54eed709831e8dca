"""Eight questions at once on the machine's cores: how the answer model's work can be arranged.

The issue's target is 8 concurrent questions answered within twice the single-question latency.
This benchmark answers the 8 questions of bench_generation (each with the passages the tutor gives
the model, prefix cache warm, up to 60 new tokens, greedy) in four arrangements, all in one run:

  * baseline: one question at a time (the mean over the 8 is the single-question latency);
  * one batch of 8 decoded on one thread;
  * one batch of 8 decoded on two threads;
  * two generators side by side, 4 questions each, one thread each (each core its own batch).

Reported: the time until all 8 are answered, and that as a multiple of the mean single latency.

    .venv/bin/python benchmarks/bench_concurrency.py [--no-write]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks._report import stamp, table, write_section  # noqa: E402
from benchmarks.bench_generation import NEW_TOKENS, QUESTIONS  # noqa: E402
from finetune.base_model import ensure_base_model  # noqa: E402
from finetune.generator import HFGenerator  # noqa: E402
from knowledge.course import load_course  # noqa: E402
from knowledge.embedder import shared_minilm  # noqa: E402
from knowledge.generation import GenerationRequest  # noqa: E402
from knowledge.index import KnowledgeIndex  # noqa: E402
from knowledge.retriever import Retriever  # noqa: E402
from knowledge.tutor import Tutor  # noqa: E402


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--rounds", type=int, default=3, help="each arrangement is timed this many times (median)")
    args = ap.parse_args()
    course = load_course(ROOT / "courses" / "pretraining-finetuning")
    emb = shared_minilm()
    tutor = Tutor(course, Retriever(KnowledgeIndex.build(course, emb), emb), None)
    reqs = [GenerationRequest(q, tutor.context_for(q), NEW_TOKENS) for q in QUESTIONS]
    model_dir = ensure_base_model(ROOT / "data")
    one_a, one_b, two = (HFGenerator(model_dir, threads=1), HFGenerator(model_dir, threads=1),
                         HFGenerator(model_dir, threads=2))
    for g in (one_a, one_b, two):  # warm: prefix caches filled, thread choices measured
        g.generate(reqs)
        for r in reqs:
            g.generate([r])

    def side_by_side() -> None:
        workers = [threading.Thread(target=g.generate, args=(part,)) for g, part in ((one_a, reqs[:4]), (one_b, reqs[4:]))]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    arrangements = {
        "one batch of 8, one thread": lambda: one_a.generate(reqs),
        "one batch of 8, two threads": lambda: two.generate(reqs),
        "two generators side by side, 4 questions each, one thread each": side_by_side,
    }
    singles = [statistics.median(timed(lambda r=r: one_a.generate([r])) for _ in range(args.rounds)) for r in reqs]
    single = statistics.mean(singles)
    rows = [["baseline: one question at a time (mean of the 8)", f"{single:.2f}", "1.0x"]]
    ratios = []
    for name, fn in arrangements.items():
        t = statistics.median(timed(fn) for _ in range(args.rounds))
        ratios.append(t / single)
        rows.append([f"8 at once: {name}", f"{t:.2f}", f"{t / single:.1f}x"])
    verdict = (f"the best arrangement is {min(ratios):.1f}x one answer: the target is "
               + ("met." if min(ratios) <= 2 else "not met. A batch decodes until its longest answer is done, and a "
                  "decoding step of several rows costs more than a one-row step."))
    body = "\n".join([
        "## Eight questions at once on two cores (`benchmarks/bench_concurrency.py`)",
        "",
        stamp(),
        "",
        f"Base SmolLM2-135M-Instruct through `HFGenerator` (bf16/int4 where the CPU has native bf16), the {len(reqs)} "
        "questions of bench_generation with the tutor's passages, prefix cache warm, up to "
        f"{NEW_TOKENS} new tokens; one at a time the answers took {min(singles):.2f}-{max(singles):.2f} s. "
        f"Each figure is the median of {args.rounds} timings; target: 8 at once within 2x of one alone.",
        "",
        table(["arrangement", "seconds until all are answered", "vs one question alone"], rows),
        "",
        f"On this machine ({os.cpu_count()} cores) {verdict}",
    ])
    print(body)
    if not args.no_write:
        write_section("concurrency", body)


if __name__ == "__main__":
    main()
