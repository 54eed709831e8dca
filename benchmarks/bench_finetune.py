"""Fine-tuning benchmark on ../shared/eval/faq, course machine-learning-zoomcamp (375 records).

1. Dataset: every record's own question -> its answer, with the passages the real retriever
   returns (index over ALL 375 records, as in service), split by record: train / validation (early
   stopping) / held-out test. Held-out records are never trained on.
2. Fine-tune the base model with a preset (default ``faq-benchmark``); the training time is reported.
3. Answer through the real Tutor (generative mode, never declining: ``min_cosine=-1`` as in
   benchmarks/bench_tutor.py) with (a) the ground-truth file's paraphrased questions about TRAINING
   records and (b) its questions about HELD-OUT records, a fixed seeded sample of each, for three
   systems: the base model, the fine-tuned model and extractive answers.
4. Score: mean MiniLM cosine between the answer and the record's full answer text (the metric of
   the published figures: GPT-4o 0.679). Written to docs/BENCHMARKS.md, section ``finetune``.

    .venv/bin/python benchmarks/bench_finetune.py [--sample 200] [--preset faq-benchmark]
        [--work data/bench/finetune-faq] [--resume] [--skip-train] [--no-write]

Long: on two shared CPU cores expect ~30-45 min of training and ~20-40 min of answering.
Progress goes to stderr; partial results are kept in the work folder (results.json).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._report import SHARED, stamp, table, write_section  # noqa: E402

COURSE = "machine-learning-zoomcamp"
PUBLISHED = [("GPT-4o", 0.679), ("GPT-4o-mini", 0.680), ("GPT-3.5", 0.658)]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_faq():
    from knowledge.course import faq_course_from_json

    docs = SHARED / "eval" / "faq" / "documents-with-ids.json"
    full = faq_course_from_json(docs)
    keep = [i for i, r in enumerate(full.faq) if r.course == COURSE]
    course = dataclasses.replace(
        full, meta=full.meta.model_copy(update={"id": COURSE, "title": COURSE}),
        faq=tuple(full.faq[i] for i in keep), faq_sources=tuple(full.faq_sources[i] for i in keep), warnings=(),
    )
    records = json.loads(docs.read_text(encoding="utf-8"))
    answer_of: dict[str, str] = {}
    for r in records:
        if r.get("course") == COURSE:
            answer_of.setdefault(r["id"], r["text"])
    with open(SHARED / "eval" / "faq" / "ground-truth-data.csv", encoding="utf-8") as f:
        gt = [row for row in csv.DictReader(f) if row["course"] == COURSE]
    return course, answer_of, gt


class Recording:
    """Wraps a generator and keeps its raw output per question: the model's own words, scored
    apart from the Tutor's answers (where unsupported sentences fall back to extraction)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.raw: dict[str, str] = {}

    @property
    def name(self) -> str:
        return self.inner.name

    def generate(self, requests):
        out = self.inner.generate(requests)
        for r, text in zip(requests, out, strict=True):
            self.raw[r.question] = text
        return out


def answer_all(tutor, questions: list[str], workers: int = 8) -> list:
    done = [0]
    t0 = time.monotonic()

    def one(q):
        a = tutor.answer(q)
        done[0] += 1
        if done[0] % 25 == 0:
            rate = done[0] / (time.monotonic() - t0)
            log(f"  {done[0]}/{len(questions)} answered ({rate:.2f}/s, ~{(len(questions) - done[0]) / rate / 60:.0f} min left)")
        return a

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, questions))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sample", type=int, default=200, help="questions answered for each of (a) and (b)")
    ap.add_argument("--preset", default="faq-benchmark")
    ap.add_argument("--work", type=Path, default=ROOT / "data" / "bench" / "finetune-faq")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted training run in --work")
    ap.add_argument("--skip-train", action="store_true", help="reuse the model already trained in --work")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--systems", default="extractive,base,finetuned")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    from finetune.base_model import ensure_base_model
    from finetune.data import Dataset, build_dataset
    from finetune.evaluate import serving_quantize
    from finetune.generator import HFGenerator
    from finetune.train import TrainConfig
    from finetune.train import main as train_main
    from knowledge.batching import BatchingGenerator
    from knowledge.embedder import shared_minilm
    from knowledge.index import KnowledgeIndex
    from knowledge.retriever import Retriever
    from knowledge.tutor import Tutor, clean_question

    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() and (args.skip_train or args.resume) else {}

    def save():
        results_path.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")

    course, answer_of, gt = load_faq()
    log(f"{COURSE}: {len(course.faq)} records, {len(gt)} ground-truth questions")
    emb = shared_minilm()
    t0 = time.monotonic()
    retriever = Retriever(KnowledgeIndex.build(course, emb), emb)
    log(f"index over all {len(course.faq)} records built in {time.monotonic() - t0:.0f} s")

    cfg = TrainConfig.from_preset(args.preset, max_steps=args.max_steps)
    data_dir, run_dir = work / "data", work / "run"
    if (args.skip_train or args.resume) and (data_dir / "manifest.json").exists():
        ds = Dataset.load(data_dir)
    else:
        t0 = time.monotonic()
        ds = build_dataset(course, retriever, seed=cfg.seed, val_fraction=0.1, test_fraction=0.15, out_dir=data_dir,
                           progress=log)
        log(f"dataset built in {time.monotonic() - t0:.0f} s: {ds.manifest['counts']}")
    results["dataset"] = {k: ds.manifest.get(k) for k in ("counts", "sha256", "seed", "retrieval")}
    base_dir = ensure_base_model(ROOT / "data", progress=log)

    if not args.skip_train:
        cfg.data_dir, cfg.output_dir, cfg.base_model_dir, cfg.resume = str(data_dir), str(run_dir), str(base_dir), args.resume
        cfg.show_progress = sys.stderr.isatty()
        log(f"training: {json.dumps({k: getattr(cfg, k) for k in ('method', 'freeze_layers', 'epochs', 'lr', 'batch_size', 'max_steps', 'patience')})}")
        run = train_main(cfg, progress=log)
        results["training"] = {k: v for k, v in run.to_json().items() if k not in ("train_curve", "config")}
        results["training"]["config"] = {k: run.config[k] for k in ("method", "freeze_layers", "epochs", "lr", "batch_size",
                                                                    "dropout", "patience", "max_length", "max_answer_tokens")}
        save()
    model_dir = run_dir / "model"

    def record_of(ex_id: str) -> str:
        return ex_id.split(":", 1)[1].split("#", 1)[0]

    train_ids = {record_of(e.id) for e in ds.train}
    test_ids = {record_of(e.id) for e in ds.test}
    rng = random.Random(42)
    qa = [g for g in gt if g["document"] in train_ids]
    qb = [g for g in gt if g["document"] in test_ids]
    sets = {"a": rng.sample(qa, min(args.sample, len(qa))), "b": rng.sample(qb, min(args.sample, len(qb)))}
    results["questions"] = {"a_pool": len(qa), "b_pool": len(qb), "a": len(sets["a"]), "b": len(sets["b"])}
    refs = {k: emb.encode([answer_of[g["document"]] for g in v]) for k, v in sets.items()}
    results.setdefault("systems", {})

    for system in [s for s in args.systems.split(",") if s]:
        gen = rec = None
        if system == "base":
            rec = Recording(HFGenerator(base_dir))
        elif system == "finetuned":
            rec = Recording(HFGenerator(model_dir, quantize=serving_quantize(model_dir)))
        if rec is not None:
            gen = BatchingGenerator(rec, max_batch=8)
        tutor = Tutor(course, retriever, gen, mode="extractive" if gen is None else "generative", min_cosine=-1.0)
        out = {}
        for key, qs in sets.items():
            log(f"{system}: answering ({key}) {len(qs)} questions")
            t0 = time.monotonic()
            answers = answer_all(tutor, [g["question"] for g in qs], workers=8 if gen else 2)
            cos = (emb.encode([a.text or " " for a in answers]) * refs[key]).sum(1)
            out[key] = {"cosine": round(float(cos.mean()), 4), "seconds": round(time.monotonic() - t0, 1),
                        "generated_share": round(sum(a.mode == "generative" for a in answers) / len(answers), 3),
                        "samples": [{"q": g["question"], "answer": a.text[:300], "cos": round(float(c), 3)}
                                    for g, a, c in list(zip(qs, answers, cos, strict=True))[:5]]}
            if rec is not None:  # the model's raw output for every question, before the Tutor's check
                raw = [rec.raw.get(clean_question(g["question"], tutor.max_question_chars)[0], "") for g in qs]
                rcos = (emb.encode([t or " " for t in raw]) * refs[key]).sum(1)
                out[key]["raw_cosine"] = round(float(rcos.mean()), 4)
                out[key]["raw_missing"] = sum(not t for t in raw)
            log(f"{system} ({key}): mean cosine {out[key]['cosine']:.3f} in {out[key]['seconds']:.0f} s")
        if gen is not None:
            gen.close()
        results["systems"][system] = out
        save()

    body = report(results, args)
    print(body)
    if not args.no_write:
        write_section("finetune", body)
    log(f"results in {results_path}")


def report(results: dict, args) -> str:
    tr = results.get("training") or {}
    ds = results.get("dataset") or {}
    counts = ds.get("counts") or {}
    q = results.get("questions") or {}
    sysres = results.get("systems") or {}
    names = {"base": "base SmolLM2-135M-Instruct (generative)", "finetuned": "fine-tuned SmolLM2-135M (generative)",
             "extractive": "extractive (best sentences of the top passage)"}
    rows = []
    for key in ("base", "finetuned", "extractive"):
        if key in sysres:
            r = sysres[key]
            gen = key != "extractive"
            rows.append([names[key], f"{r['a']['cosine']:.3f}", f"{r['b']['cosine']:.3f}",
                         f"{r['a']['generated_share']:.0%} / {r['b']['generated_share']:.0%}" if gen else "-",
                         f"{r['a'].get('raw_cosine', float('nan')):.3f} / {r['b'].get('raw_cosine', float('nan')):.3f}"
                         if gen else "-"])
    rows += [[f"published: {n}", f"{c:.3f}", "", "", ""] for n, c in PUBLISHED]
    cfg = tr.get("config") or {}
    lines = [
        "## Fine-tuning the answer model (FAQ benchmark)",
        "",
        "`.venv/bin/python benchmarks/bench_finetune.py`: course machine-learning-zoomcamp of ../shared/eval/faq "
        f"(375 records). Each record's own question -> its answer, with the passages the retriever returns from all "
        f"375 records, split by record: {counts.get('train', {}).get('total', '?')} train / "
        f"{counts.get('val', {}).get('total', '?')} validation (early stopping) / "
        f"{counts.get('test', {}).get('total', '?')} held out. Answers go through the real Tutor "
        "(generative, never declining); score: mean MiniLM cosine to the record's answer, the metric of the "
        "published figures.",
        "",
        stamp(),
        "",
        table(["system", f"(a) paraphrases about training records (n={q.get('a', '?')})",
               f"(b) questions about held-out records (n={q.get('b', '?')})", "generated (rest: extractive fallback)",
               "model's raw output, before the Tutor's check: (a) / (b)"], rows),
        "",
    ]
    if tr:
        lines += [
            f"Training: {cfg.get('method')} (bottom {cfg.get('freeze_layers')} of 30 layers frozen), lr {cfg.get('lr')}, "
            f"batch {cfg.get('batch_size')}, up to {cfg.get('epochs')} epochs with patience {cfg.get('patience')}: "
            f"{tr.get('steps')} steps ({tr.get('epochs_done')} epochs{', early-stopped' if tr.get('stopped_early') else ''}) "
            f"in **{tr.get('seconds', 0) / 60:.1f} min** on this machine (cache of the frozen layers "
            f"{(tr.get('timings') or {}).get('cache_frozen_s', 0) / 60:.1f} min, loop "
            f"{(tr.get('timings') or {}).get('train_loop_s', 0) / 60:.1f} min); validation loss "
            f"{tr.get('initial_val_loss', float('nan')):.3f} -> {tr.get('best_val_loss', float('nan')):.3f} "
            f"(best at step {tr.get('best_step')}).",
            "",
        ]
    lines += [f"Questions: a fixed sample (seed 42) of {q.get('a', '?')} of the {q.get('a_pool', '?')} ground-truth "
              f"questions about training records and {q.get('b', '?')} of the {q.get('b_pool', '?')} about held-out records."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
