"""Answer generation speed: plain fp32 ``model.generate`` (baseline) vs our HFGenerator, same run.

    .venv/bin/python benchmarks/bench_generation.py            # measure and update docs/BENCHMARKS.md
    .venv/bin/python benchmarks/bench_generation.py --quality  # also the passage cache's effect on answers
    .venv/bin/python benchmarks/bench_generation.py --variants # also the other options (fp32, int8, hf...)

What is measured (8 course questions, each with 3 course passages: ~500-600 prompt tokens), for the
baseline and for our engine twice: prefilling every prompt in full ("exact") and from the passage
cache (the default):
  * single stream: prefill time (time to the first token) and decode tokens/s, forcing 60 new tokens;
  * answer latency p50/p95: real answers (stopping at end of turn; up to 60 new tokens), one at a time;
  * 8 concurrent questions: 8 threads ask at once. Ours goes through BatchingGenerator (one batched
    call); the baseline has one model behind a lock, so the questions queue up. Reported as the
    time until all 8 are answered, and as a multiple of the mean single-question latency; for the
    passage cache once warm (the 8 prompts' passages computed ahead) and once cold (cache emptied).
  * with --quality: on what the Tutor asks for its question set, the passage cache's answers against
    the exact prefill's (identical answers, teacher-forced agreement), and the tutor's fact coverage
    with each (bench_tutor's scoring).
Baseline and ours alternate round by round, so load from other processes hits both alike.
Results go to docs/BENCHMARKS.md between the bench:generation markers (other sections are kept).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks._report import BENCH_DOC, stamp, table, write_section  # noqa: E402
from finetune.base_model import ensure_base_model  # noqa: E402
from finetune.generator import FirstTokenClock, HFGenerator  # noqa: E402
from knowledge.batching import BatchingGenerator  # noqa: E402
from knowledge.generation import GenerationRequest, Passage, build_messages  # noqa: E402

LESSONS = ROOT / "courses" / "pretraining-finetuning" / "lessons"
NEW_TOKENS = 60

QUESTIONS = [
    "What is pre-training?",
    "Why is fine-tuning cheaper than training a model from scratch?",
    "What is LoRA and why is it useful?",
    "How do adapters work?",
    "How can I tell if my fine-tuned model is overfitting?",
    "What learning rate should I use when fine-tuning?",
    "What is catastrophic forgetting?",
    "What happened in the movie review experiment?",
]

# Used when the course folder is absent: realistic passages about the same topics.
FALLBACK_PASSAGES = [
    Passage(
        "Overview",
        "Pre-training",
        "During pre-training a model learns from a huge amount of general data, such as large "
        "collections of text or images. It picks up broad, reusable knowledge: grammar, facts, "
        "common patterns. Pre-training is expensive: it needs a lot of data, compute and time, "
        "so it is usually done once by a large lab and the resulting model is shared.",
    ),
    Passage(
        "Overview",
        "Fine-tuning",
        "Fine-tuning takes a pre-trained model and continues training it on a small dataset for one "
        "task, for example classifying movie reviews. Because the model already knows a lot, a few "
        "thousand examples and a low learning rate such as 2e-5 are often enough. Training only "
        "some layers, or small adapters, makes it cheaper still.",
    ),
    Passage(
        "Deep dive",
        "LoRA and adapters",
        "Adapters are small extra modules inserted into a frozen network; only they are trained. "
        "LoRA (low-rank adaptation) adds two small matrices whose product is added to a frozen "
        "weight matrix, so a tiny fraction of the parameters is trained and the adapter can be "
        "merged into the weights afterwards.",
    ),
    Passage(
        "Deep dive",
        "Overfitting and forgetting",
        "A fine-tuned model overfits when its training loss keeps falling while the validation loss "
        "rises: it memorises the small dataset. Early stopping, fewer epochs, freezing layers and "
        "a lower learning rate help. Catastrophic forgetting is when fine-tuning overwrites general "
        "knowledge learned during pre-training.",
    ),
]

_STOP = frozenset(
    "what is are the a an of to and in how why when do does can i my if it should use for with".split()  # noqa: SIM905
)


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if w not in _STOP}


def course_passages() -> list[Passage]:
    """Sections of the sample course's lessons as passages (or the fallback set)."""
    out = []
    for path in sorted(LESSONS.glob("*.md")):
        text = path.read_text(encoding="utf-8")
        title_match = re.search(r'^title:\s*"?([^"\n]+)', text, flags=re.MULTILINE)
        title = title_match.group(1).strip() if title_match else path.stem
        body = text.split("---", 2)[2] if text.startswith("---") else text
        for chunk in re.split(r"\n## ", body):
            head, _, rest = chunk.strip().partition("\n")
            if rest.strip():
                out.append(Passage(title, head.strip("# "), " ".join(rest.split()), path.name))
    return out or FALLBACK_PASSAGES


def build_requests(max_new_tokens: int = NEW_TOKENS) -> list[GenerationRequest]:
    """The 8 questions, each with its 3 best passages by word overlap (a stand-in for the retriever)."""
    passages = course_passages()
    reqs = []
    for q in QUESTIONS:
        qw = _words(q)
        ranked = sorted(passages, key=lambda p: -len(qw & _words(p.section + " " + p.text[:700])))
        reqs.append(GenerationRequest(q, tuple(ranked[:3]), max_new_tokens))
    return reqs


# --- the baseline ----------------------------------------------------------------------------------


class Baseline:
    """Plain transformers: fp32 weights, ``model.generate`` greedy, one question at a time (locked)."""

    def __init__(self, folder: Path, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.threads = threads  # torch's thread count is per calling thread: set on every call
        self.tok = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.lock = threading.Lock()

    def ids(self, r: GenerationRequest):
        text = self.tok.apply_chat_template(
            build_messages(r.question, r.passages), add_generation_prompt=True, tokenize=False
        )
        return self.tok(text, return_tensors="pt", add_special_tokens=False)

    def run(
        self,
        r: GenerationRequest,
        *,
        force: bool = False,
        threads: int | None = None,
        streamer: object = None,
    ) -> list[int]:
        x = self.ids(r)
        extra: dict[str, object] = {"min_new_tokens": r.max_new_tokens} if force else {}
        if streamer is not None:
            extra["streamer"] = streamer
        with self.lock, self.torch.inference_mode():
            self.torch.set_num_threads(threads or self.threads)
            out = self.model.generate(
                **x,
                max_new_tokens=r.max_new_tokens,
                do_sample=False,
                pad_token_id=self.tok.eos_token_id,
                **extra,
            )
        return out[0, x["input_ids"].shape[1] :].tolist()

    def answer(self, r: GenerationRequest) -> str:
        return self.tok.decode(self.run(r), skip_special_tokens=True).strip()


# --- measuring -------------------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t = time.perf_counter()
    result = fn()
    return time.perf_counter() - t, result


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    if len(values) == 1:
        return values[0]
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


class Stats:
    def __init__(self) -> None:
        self.prefill: list[float] = []
        self.decode_tps: list[float] = []
        self.stream_tps: list[float] = []
        self.latency: list[float] = []
        self.tokens: list[int] = []
        self.concurrent: list[float] = []

    def summary(self) -> dict[str, float]:
        mean_latency = statistics.mean(self.latency)
        return {
            "prefill_s": statistics.median(self.prefill),
            "decode_tps": statistics.median(self.decode_tps),
            "stream_tps": statistics.median(self.stream_tps),
            "p50": pct(self.latency, 50),
            "p95": pct(self.latency, 95),
            "mean_latency": mean_latency,
            "mean_tokens": statistics.mean(self.tokens),
            "concurrent8": statistics.median(self.concurrent),
            "concurrent_ratio": statistics.median(self.concurrent) / mean_latency,
        }


def measure_stream(
    run: Callable[[GenerationRequest], tuple[int, float, float]], r: GenerationRequest, stats: Stats
) -> None:
    """A forced 60-token generation; ``run`` returns (tokens, seconds to the first token, total seconds)."""
    n, first, total = run(r)
    stats.prefill.append(first)
    stats.decode_tps.append((n - 1) / max(total - first, 1e-6))
    stats.stream_tps.append(n / total)


def baseline_stream(
    base: Baseline, r: GenerationRequest, threads: int | None = None
) -> tuple[int, float, float]:
    streamer = FirstTokenClock()
    t0 = time.perf_counter()
    n = len(base.run(r, force=True, threads=threads, streamer=streamer))
    total = time.perf_counter() - t0
    return n, (streamer.at or t0 + total) - t0, total


def ours_stream(gen: HFGenerator, r: GenerationRequest) -> tuple[int, float, float]:
    t0 = time.perf_counter()
    n = len(gen.generate_tokens([r], ignore_stops=True)[0])
    total = time.perf_counter() - t0
    timing = gen.last_timing or {}
    return n, timing.get("prefill_s", total), total


def concurrent(ask: Callable[[GenerationRequest], object], reqs: list[GenerationRequest]) -> float:
    barrier = threading.Barrier(len(reqs))

    def one(r: GenerationRequest) -> object:
        barrier.wait()
        return ask(r)

    with ThreadPoolExecutor(len(reqs)) as pool:
        t = time.perf_counter()
        list(pool.map(one, reqs))
        return time.perf_counter() - t


MODES = {  # our engine, three ways to prefill
    "exact": "off",  # every prompt in full
    "prefix": "prefix",  # the default: the same computation in pieces, reusing pieces of prompts whose prefix was seen before
    "blocks": "blocks",  # every passage from its own cached block (an approximation)
}


def bench(folder: Path, rounds: int, variants: bool, threads: int | None, quality: bool) -> dict:
    import torch

    from finetune.generator import default_threads

    threads = threads or default_threads()
    reqs = build_requests()
    print(f"loading baseline and HFGenerator ({', '.join(MODES)}) from {folder} ...", flush=True)
    base = Baseline(folder, threads)
    ours = {k: HFGenerator(folder, threads=threads, passage_cache=mode) for k, mode in MODES.items()}
    batchers = {k: BatchingGenerator(g, max_batch=8) for k, g in ours.items()}
    cached = [k for k, g in ours.items() if g.passage_cache is not None]
    lengths = [len(ours["exact"].prompt_ids(r)) for r in reqs]
    print(f"prompt tokens: {min(lengths)}-{max(lengths)} (mean {statistics.mean(lengths):.0f})", flush=True)

    def warm_up() -> None:
        """The 8 prompts asked once (1 token each): every piece of them is cached."""
        for k in cached:
            ours[k].generate_tokens([GenerationRequest(r.question, r.passages, 1) for r in reqs])

    # warm-up (first calls allocate, load kernels); then the caches hold the 8 prompts
    base.run(GenerationRequest(reqs[0].question, reqs[0].passages, 4))
    base.run(GenerationRequest(reqs[0].question, reqs[0].passages, 4), threads=1)
    for g in ours.values():
        g.generate([GenerationRequest(reqs[0].question, reqs[0].passages, 4)])
    warm_up()
    warm = {k: ours[k].passage_cache.describe() for k in cached}
    print(f"  caches warm: {warm}", flush=True)

    b, b1 = Stats(), Stats()
    o = {k: Stats() for k in ours}
    cold: dict[str, list[float]] = {k: [] for k in cached}
    for rnd in range(rounds):
        for i, r in enumerate(reqs[:3]):  # stream speed on 3 prompts per round
            # plain generate on torch's default threads and on 1 thread; a setting that is 5x
            # slower than the other (threads fighting over busy cores) is measured once only
            if i == 0 or b.decode_tps[-1] * 5 > b1.decode_tps[-1]:
                measure_stream(lambda q: baseline_stream(base, q), r, b)
            if i == 0 or b1.decode_tps[-1] * 5 > b.decode_tps[-1]:
                measure_stream(lambda q: baseline_stream(base, q, threads=1), r, b1)
            for k, g in ours.items():
                measure_stream(lambda q, g=g: ours_stream(g, q), r, o[k])
            print(
                f"  round {rnd + 1} stream {i + 1}/3: decode tok/s baseline {b.decode_tps[-1]:.1f}, "
                f"baseline 1 thread {b1.decode_tps[-1]:.1f}, "
                + ", ".join(
                    f"{k} {o[k].decode_tps[-1]:.1f} (prefill {o[k].prefill[-1]:.2f} s)" for k in ours
                ),
                flush=True,
            )
        if rnd == 0:
            # answers and concurrency: the baseline runs on whichever thread setting was faster
            base.threads = (
                1 if statistics.median(b1.decode_tps) > statistics.median(b.decode_tps) else threads
            )
            print(f"  baseline answers on {base.threads} thread(s)", flush=True)
        for r in reqs:
            t, ids = timed(lambda r=r: base.run(r))
            b.latency.append(t)
            b.tokens.append(len(ids))
            for k, g in ours.items():
                t, ids = timed(lambda r=r, g=g: g.generate_tokens([r])[0])
                o[k].latency.append(t)
                o[k].tokens.append(len(ids))
        b.concurrent.append(concurrent(base.answer, reqs))
        for k, batcher in batchers.items():
            o[k].concurrent.append(concurrent(lambda r, bg=batcher: bg.generate([r], timeout=600)[0], reqs))
        for k in cached:  # the same 8 questions with nothing cached: the batch computes every piece
            ours[k].passage_cache.clear()
            cold[k].append(concurrent(lambda r, bg=batchers[k]: bg.generate([r], timeout=600)[0], reqs))
        warm_up()
        print(
            f"  round {rnd + 1}: latency p50 baseline {pct(b.latency, 50):.2f} s, "
            + ", ".join(f"{k} {pct(o[k].latency, 50):.2f} s" for k in ours)
            + f"; 8 concurrent baseline {b.concurrent[-1]:.2f} s, "
            + ", ".join(f"{k} {o[k].concurrent[-1]:.2f} s" for k in ours)
            + " (cold: "
            + ", ".join(f"{k} {cold[k][-1]:.2f} s" for k in cached)
            + ")",
            flush=True,
        )
    timing_load = os.getloadavg()  # the timing rows are done: the load they ran under
    answers = {"baseline": [base.answer(r) for r in reqs]}
    batch_equal = {}
    for k, g in ours.items():
        answers[k] = g.generate(reqs)
        singles = [g.generate([r])[0] for r in reqs]
        batch_equal[k] = sum(a == s for a, s in zip(answers[k], singles, strict=True))
    for batcher in batchers.values():
        batcher.close()
    summaries = {k: v.summary() for k, v in o.items()}
    for k in cached:
        summaries[k]["cold8"] = statistics.median(cold[k])
        summaries[k]["cold_ratio"] = summaries[k]["cold8"] / summaries[k]["mean_latency"]
    result = {
        "baseline": b.summary(),
        "baseline1": {
            "prefill_s": statistics.median(b1.prefill),
            "decode_tps": statistics.median(b1.decode_tps),
            "stream_tps": statistics.median(b1.stream_tps),
        },
        "ours": summaries,
        "warm": warm,
        "cache_end": {k: ours[k].passage_cache.describe() for k in cached},
        "prompt_tokens": (min(lengths), max(lengths), statistics.mean(lengths)),
        "timing_load": timing_load,
        "answers": answers,
        "batch_equal": batch_equal,
        "mean_batch": {k: bg.stats.mean_batch for k, bg in batchers.items()},
        "config": (
            f"engine={ours['prefix'].engine}, dtype={ours['prefix'].dtype}, quantize={ours['prefix'].quantize}"
        ),
        "thread_choice": {k: g._engine.threads.describe() for k, g in ours.items() if g.engine == "fast"},
        "threads": threads,
        "baseline_threads": base.threads,
        "torch": torch.__version__,
        "variants": [],
        "quality": None,
    }
    if quality:
        setup = tutor_setup()
        treqs = tutor_requests(setup)
        refs = [ours["exact"].generate_tokens([r])[0] for r in treqs]
        result["quality"] = {k: passage_cache_quality(ours["exact"], ours[k], treqs, refs) for k in cached}
        result["quality"]["share"] = prompt_sharing(treqs)
        for k, g in ours.items():  # back to back, same retriever
            result["quality"][f"tutor_{k}"] = {
                key: v for key, v in tutor_facts(setup, g).items() if key != "misses"
            }
            print(f"  tutor question set, {k}: {result['quality'][f'tutor_{k}']}", flush=True)
    if variants:
        ref_tokens = [base.run(r) for r in reqs]
        del ours, batchers
        result["variants"] = bench_variants(folder, reqs, ref_tokens, threads)
    return result


def prompt_sharing(reqs: list[GenerationRequest]) -> dict:
    """How much of the question set's prompts a cache could reuse, asked in order from empty:
    passages reusable exactly (the same passages in the same order started an earlier prompt) and
    passages reusable as blocks (the passage was in any earlier prompt)."""
    seen_prefix: set[tuple] = set()
    seen: set = set()
    exact = blocks = total = 0
    for r in reqs:
        for k, p in enumerate(r.passages, 1):
            exact += r.passages[:k] in seen_prefix
            blocks += p in seen
            seen_prefix.add(r.passages[:k])
            seen.add(p)
            total += 1
    return {"passages": total, "exact": exact, "blocks": blocks}


# --- passage cache: answers against the exact prefill ----------------------------------------------


def tutor_setup() -> tuple:
    """The sample course, a retriever over it and the tutor question set (benchmarks/data/tutor_questions.yaml)."""
    import yaml

    from knowledge.course import load_course
    from knowledge.embedder import shared_minilm
    from knowledge.index import KnowledgeIndex
    from knowledge.retriever import Retriever

    data = yaml.safe_load((ROOT / "benchmarks" / "data" / "tutor_questions.yaml").read_text(encoding="utf-8"))
    course = load_course(ROOT / "courses" / "pretraining-finetuning")
    emb = shared_minilm()
    return course, Retriever(KnowledgeIndex.build(course, emb), emb), data


def tutor_requests(setup: tuple, max_new_tokens: int = NEW_TOKENS) -> list[GenerationRequest]:
    """What the Tutor asks the answer model for the question set: real retrieval and the Tutor's
    own passage choice, recorded by a generator that answers nothing (so the Tutor falls back to
    extraction and moves on)."""
    from knowledge.tutor import Turn, Tutor

    class Recorder:
        name = "recorder"

        def __init__(self) -> None:
            self.seen: list[GenerationRequest] = []

        def generate(self, requests):
            self.seen.extend(requests)
            return [""] * len(requests)

    course, retriever, data = setup
    recorder = Recorder()
    tutor = Tutor(course, retriever, recorder, mode="generative", max_new_tokens=max_new_tokens)
    for q in data["questions"]:
        tutor.answer(q["question"], history=[Turn(t["role"], t["content"]) for t in q.get("history") or []])
    return recorder.seen


def tutor_facts(setup: tuple, gen: HFGenerator) -> dict:
    """The tutor benchmark's question set answered generatively with ``gen`` (bench_tutor's scoring)."""
    from benchmarks.bench_tutor import question_set
    from knowledge.tutor import Tutor

    course, retriever, data = setup
    with BatchingGenerator(gen, max_batch=8) as batcher:
        return question_set(Tutor(course, retriever, batcher, mode="generative"), data, workers=8)


def forced_predictions(gen: HFGenerator, r: GenerationRequest, ref: list[int]) -> list[int]:
    """The next token this generator predicts after the prompt and each prefix of ``ref`` (teacher
    forcing: ``ref``'s own tokens are fed back, so one early difference does not hide the rest)."""
    import torch

    engine = gen._engine
    ids, blocks = gen._encode(r)
    with torch.inference_mode():
        cap = len(ids) + len(ref) + 1
        ck = [torch.zeros(1, engine.KV, cap, engine.D, dtype=engine.cdt) for _ in engine.layers]
        cv = [torch.zeros(1, engine.KV, cap, engine.D, dtype=engine.cdt) for _ in engine.layers]
        engine.threads.set(1)
        preds = [engine.prefill_one(ids, blocks, ck, cv, 0)]
        for j, tok in enumerate(ref[:-1]):
            preds.append(int(engine._step(torch.tensor([tok]), [0], [len(ids) + j], ck, cv)[0]))
    return preds


def passage_cache_quality(
    exact: HFGenerator, cached: HFGenerator, reqs: list[GenerationRequest], refs: list[list[int]]
) -> dict:
    """Answers with a cache against the full prefill's (``refs``: its tokens), on the same requests."""
    rows = []
    for i, (r, ref) in enumerate(zip(reqs, refs, strict=True)):
        got = cached.generate_tokens([r])[0]
        preds = forced_predictions(cached, r, ref) if ref else []
        rows.append(
            {
                "passages": len(r.passages),
                "same_tokens": ref == got,
                "same_answer": exact.answer_text(ref, r.max_new_tokens)
                == cached.answer_text(got, r.max_new_tokens),
                "first": bool(ref) and bool(got) and ref[0] == got[0],
                "agree": sum(p == t for p, t in zip(preds, ref, strict=True)),
                "n": len(ref),
            }
        )
        if i % 10 == 9:
            print(f"  quality {i + 1}/{len(reqs)}", flush=True)

    def summary(sel: list[dict]) -> dict:
        return {
            "n": len(sel),
            "same_answer": sum(x["same_answer"] for x in sel),
            "same_tokens": sum(x["same_tokens"] for x in sel),
            "first": sum(x["first"] for x in sel),
            "agreement": sum(x["agree"] for x in sel) / max(1, sum(x["n"] for x in sel)),
        }

    return {
        "all": summary(rows),
        "one": summary([x for x in rows if x["passages"] == 1]),
        "several": summary([x for x in rows if x["passages"] > 1]),
    }


# weight formats are compared on the exact prefill; the passage cache is one more row
VARIANTS = {
    "fast, bf16 + int4 decode weights": {
        "engine": "fast",
        "dtype": "bfloat16",
        "quantize": "int4",
        "passage_cache": False,
    },
    "fast, bf16": {"engine": "fast", "dtype": "bfloat16", "quantize": "none", "passage_cache": False},
    "fast, bf16 + int8 decode weights": {
        "engine": "fast",
        "dtype": "bfloat16",
        "quantize": "int8",
        "passage_cache": False,
    },
    "fast, fp32": {"engine": "fast", "dtype": "float32", "quantize": "none", "passage_cache": False},
    "fast, fp32 + int8 decode weights": {
        "engine": "fast",
        "dtype": "float32",
        "quantize": "int8",
        "passage_cache": False,
    },
    "fast, fp16 weights (fbgemm)": {"engine": "fast", "dtype": "float16", "passage_cache": False},
    "hf generate, bf16": {"engine": "hf", "dtype": "bfloat16", "quantize": "none"},
    "hf generate, fp32 + dynamic int8 (not down_proj)": {
        "engine": "hf",
        "dtype": "float32",
        "quantize": "int8",
    },
}


def forced_agreement(gen: HFGenerator, r: GenerationRequest, ref: list[int]) -> tuple[int, int]:
    """Teacher-forced top-1 agreement with the fp32 baseline: feed the baseline's own tokens and
    count the positions where this option predicts the same next token. Unlike comparing free-
    running answers, one early near-tie does not hide the rest."""
    if gen.engine == "fast":
        preds = forced_predictions(gen, r, ref)
    else:
        import torch

        prompt = gen.prompt_ids(r)
        with torch.inference_mode():
            ids = torch.tensor([prompt + ref])
            logits = gen._engine.model(ids).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(ref)]
            preds = logits.argmax(-1).tolist()
    return sum(p == t for p, t in zip(preds, ref, strict=True)), len(ref)


def bench_variants(
    folder: Path, reqs: list[GenerationRequest], ref: list[list[int]], threads: int
) -> list[dict]:
    """All options loaded side by side and measured in turns (so load changes hit all alike):
    decode tok/s, answer p50, teacher-forced agreement with fp32, batch == single."""
    gens = {label: HFGenerator(folder, threads=threads, **kw) for label, kw in VARIANTS.items()}
    for gen in gens.values():
        gen.generate([GenerationRequest(reqs[0].question, reqs[0].passages, 4)])
    streams = {label: Stats() for label in gens}
    latency: dict[str, list[float]] = {label: [] for label in gens}
    for r in reqs[:2]:
        for label, gen in gens.items():
            measure_stream(lambda q, gen=gen: ours_stream(gen, q), r, streams[label])
    for r in reqs[:4]:
        for label, gen in gens.items():
            latency[label].append(timed(lambda r=r, gen=gen: gen.generate([r]))[0])
    rows = []
    for label, gen in gens.items():
        agree = [forced_agreement(gen, r, ids[:40]) for r, ids in zip(reqs, ref, strict=True) if ids]
        batch = gen.generate(reqs)
        single = [gen.generate([r])[0] for r in reqs]
        rows.append(
            {
                "label": label,
                "decode_tps": statistics.median(streams[label].decode_tps),
                "prefill_s": statistics.median(streams[label].prefill),
                "p50": pct(latency[label], 50),
                "agreement": sum(a for a, _ in agree) / max(1, sum(n for _, n in agree)),
                "batch_equal": sum(a == b for a, b in zip(batch, single, strict=True)),
                "example": single[0],
            }
        )
        print(f"  variant {label}: {rows[-1]}", flush=True)
    return rows


# --- report ----------------------------------------------------------------------------------------


def render(res: dict) -> str:
    b, b1 = res["baseline"], res["baseline1"]
    e, c, k = res["ours"]["exact"], res["ours"]["prefix"], res["ours"]["blocks"]
    lo, hi, mean = res["prompt_tokens"]

    def x(num: float, den: float) -> str:
        return f"{num / den:.1f}x" if den else "-"

    def s_(v: float) -> str:
        return f"{v:.2f} s"

    def tps(v: float) -> str:
        return f"{v:.1f} tok/s"

    rows = [
        [
            "prefill (time to first token)",
            s_(b["prefill_s"]),
            s_(b1["prefill_s"]),
            s_(e["prefill_s"]),
            f"**{s_(c['prefill_s'])}**",
            s_(k["prefill_s"]),
            x(b["prefill_s"], c["prefill_s"]) + " faster",
        ],
        [
            "decode speed, one stream",
            tps(b["decode_tps"]),
            tps(b1["decode_tps"]),
            tps(e["decode_tps"]),
            f"**{tps(c['decode_tps'])}**",
            tps(k["decode_tps"]),
            x(c["decode_tps"], b["decode_tps"]),
        ],
        [
            "60 tokens incl. prefill, one stream",
            tps(b["stream_tps"]),
            tps(b1["stream_tps"]),
            tps(e["stream_tps"]),
            tps(c["stream_tps"]),
            tps(k["stream_tps"]),
            x(c["stream_tps"], b["stream_tps"]),
        ],
        [
            "answer latency p50",
            s_(b["p50"]),
            "",
            s_(e["p50"]),
            f"**{s_(c['p50'])}**",
            s_(k["p50"]),
            x(b["p50"], c["p50"]) + " faster",
        ],
        [
            "answer latency p95",
            s_(b["p95"]),
            "",
            s_(e["p95"]),
            f"**{s_(c['p95'])}**",
            s_(k["p95"]),
            x(b["p95"], c["p95"]) + " faster",
        ],
        [
            "mean answer length",
            f"{b['mean_tokens']:.0f} tokens",
            "",
            f"{e['mean_tokens']:.0f} tokens",
            f"{c['mean_tokens']:.0f} tokens",
            f"{k['mean_tokens']:.0f} tokens",
            "ours stops after 4 sentences or a loop",
        ],
        [
            "8 concurrent questions, all answered",
            s_(b["concurrent8"]),
            "",
            s_(e["concurrent8"]),
            s_(c["concurrent8"]),
            s_(k["concurrent8"]),
            x(b["concurrent8"], c["concurrent8"]) + " faster",
        ],
        [
            "8 concurrent, cold cache",
            "",
            "",
            "",
            s_(c["cold8"]),
            s_(k["cold8"]),
            x(b["concurrent8"], c["cold8"]) + " faster",
        ],
        [
            "8 concurrent / mean single latency",
            f"{b['concurrent_ratio']:.1f}x",
            "",
            f"{e['concurrent_ratio']:.1f}x",
            f"**{c['concurrent_ratio']:.1f}x**",
            f"{k['concurrent_ratio']:.1f}x",
            "target <= 2x",
        ],
        [
            "the same, cold cache",
            "",
            "",
            "",
            f"{c['cold_ratio']:.1f}x",
            f"{k['cold_ratio']:.1f}x",
            "target <= 2x",
        ],
    ]
    warm = res["warm"]
    lines = [
        "## Answer generation (`benchmarks/bench_generation.py`)",
        "",
        stamp(),
        "",
        f"Model: base SmolLM2-135M-Instruct. Prompts: 8 course questions, 3 lesson passages each, "
        f"{lo}-{hi} tokens (mean {mean:.0f}); up to {NEW_TOKENS} new tokens, greedy. "
        f"Baseline: fp32 weights, transformers `model.generate`, one question at a time behind a lock, "
        f"{res['threads']} torch threads and 1 thread for the stream rows; the answer and concurrency rows use "
        f"the faster of the two ({res['baseline_threads']} thread(s) in this run). "
        f"Ours: `HFGenerator` ({res['config']}, up to {res['threads']} threads), 8 concurrent callers through "
        f'`BatchingGenerator(max_batch=8)`, three ways: every prompt prefilled in full (`passage_cache="off"`); '
        'the default `"prefix"` cache (the same computation in pieces: reuses the pieces of a prompt whose whole '
        'prefix an earlier prompt had, the fixed start always, passages when the same passages came in the same '
        'order; token for token the full prefill in fp32, in bf16 rounding apart, below); and `"blocks"` '
        "(each passage from its own block wherever it sits; later passages do not see earlier ones, an approximation "
        "that costs answer quality, below). **Cache conditions**: warm in every row but the cold ones, and warm means "
        "the same 8 prompts were asked before (as for repeated questions), so the prefix cache then prefills only each "
        f"question (prefix cache {warm['prefix']['entries']} pieces, {warm['prefix']['mb']:.0f} MB; blocks "
        f"{warm['blocks']['entries']} blocks, {warm['blocks']['mb']:.0f} MB). Cold: caches emptied right before, so the "
        "batch computes every piece itself (the 8 prompts share only the fixed start exactly; as blocks they share "
        "passages). Baseline and ours alternate request by request, so background load hits all alike; absolute "
        "figures move with the load: when the timing rows were done, the load average (1, 5, 15 min) was "
        + ", ".join(f"{v:.2f}" for v in res.get("timing_load", ()))
        + ".",
        "",
        table(
            [
                "metric",
                "baseline",
                "baseline, 1 thread",
                "ours, full prefill",
                "ours, prefix cache (default)",
                "ours, passage blocks",
                "default vs baseline",
            ],
            rows,
        ),
        "",
        "Batched answers identical to the same questions asked alone: "
        + ", ".join(f"{m} {v}/8" for m, v in res["batch_equal"].items())
        + f". Caches at the end: {res['cache_end']}. Decoding step times the thread chooser measured (ms): "
        f"{res['thread_choice'] or '-'}.",
        "",
    ]
    q = res.get("quality")
    if q:

        def qrow(label: str, v: dict) -> list[str]:
            if not v["n"]:
                return [label, "-", "-", "-"]
            return [
                label,
                f"{v['same_answer']}/{v['n']}",
                f"{v['first']}/{v['n']}",
                f"{100 * v['agreement']:.1f}%",
            ]

        share = q["share"]
        lines += [
            "Answers against the full prefill's, on what the Tutor asks the model for the tutor question set "
            "(60 questions, real retrieval, up to 60 tokens): identical answers, identical first token, and "
            "teacher-forced agreement (the full prefill's tokens fed back; how often the same next token is predicted).",
            "",
            table(
                ["prefill", "identical answers", "same first token", "teacher-forced agreement"],
                [
                    qrow("prefix cache (default), all prompts", q["prefix"]["all"]),
                    qrow("passage blocks, one passage (the same computation in pieces)", q["blocks"]["one"]),
                    qrow("passage blocks, 2-3 passages", q["blocks"]["several"]),
                ],
            ),
            "",
            f"Of the question set's {share['passages']} passages (asked in order, cache empty at the start), "
            f"{share['exact']} could come from the prefix cache (the same passages in the same order began an "
            f"earlier prompt) and {share['blocks']} from the block cache (the passage was in any earlier prompt).",
            "",
        ]
        tut = [(m, q[f"tutor_{m}"]) for m in ("exact", "prefix", "blocks") if f"tutor_{m}" in q]
        if tut:
            lines += [
                "Through the Tutor (bench_tutor's scoring, generative mode, the same retriever, back to back):",
                "",
                table(
                    [
                        "prefill",
                        "answers with all facts",
                        "facts covered",
                        "generated (rest extracted)",
                        "latency p50 / p95 (8 at a time)",
                    ],
                    [
                        [
                            m,
                            f"{t['full']}/{t['n']}",
                            f"{t['facts_hit']}/{t['facts_total']}",
                            f"{t['gen_share']:.0%}",
                            f"{t['p50'] / 1000:.1f} / {t['p95'] / 1000:.1f} s",
                        ]
                        for m, t in tut
                    ],
                ),
                "",
            ]
    if res["variants"]:
        lines += [
            "Options, loaded side by side and measured in turns. 'Agreement': the baseline's fp32 answers "
            "(first 40 tokens of each of the 8) are fed back token by token, and the option predicts the "
            "same next token this often (fp32 itself: ~100%).",
            "",
            table(
                [
                    "option",
                    "decode tok/s",
                    "prefill",
                    "answer p50",
                    "agreement with fp32",
                    "batch == single",
                    "answer to 'What is pre-training?'",
                ],
                [
                    [
                        v["label"],
                        f"{v['decode_tps']:.1f}",
                        f"{v['prefill_s']:.2f} s",
                        f"{v['p50']:.2f} s",
                        f"{100 * v['agreement']:.1f}%",
                        f"{v['batch_equal']}/8",
                        " ".join(v["example"].replace("|", "/").split())[:150],
                    ]
                    for v in res["variants"]
                ],
            ),
            "",
        ]
    lines += [
        "Answers (baseline fp32 `generate` / ours with the prefix cache / ours with passage blocks):",
        "",
    ]
    for i, q_ in enumerate(QUESTIONS):
        lines.append(f"- **{q_}**  ")
        lines.append(f"  baseline: {' '.join(res['answers']['baseline'][i].split())[:300]}  ")
        lines.append(f"  prefix cache: {' '.join(res['answers']['prefix'][i].split())[:300]}  ")
        lines.append(f"  blocks: {' '.join(res['answers']['blocks'][i].split())[:300]}")
    same = sum(a == b_ for a, b_ in zip(res["answers"]["exact"], res["answers"]["prefix"], strict=True))
    lines.append("")
    lines.append(f"Full prefill and prefix cache: {same}/8 answers identical.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model-dir", type=Path, help="model folder (default: the converted base model)")
    parser.add_argument(
        "--data-dir", type=Path, default=Path(os.environ.get("TUTORBOT_DATA_DIR", ROOT / "data"))
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="measurement rounds (baseline and ours alternate)"
    )
    parser.add_argument("--threads", type=int, default=None, help="cores to use (default: all available)")
    parser.add_argument("--variants", action="store_true", help="also measure the other options")
    parser.add_argument(
        "--quality",
        action="store_true",
        help="also compare passage-cache answers with exact-prefill answers on the tutor's question set",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    folder = args.model_dir or ensure_base_model(args.data_dir, progress=print)
    res = bench(folder, args.rounds, args.variants, args.threads, args.quality)
    text = render(res)
    print(text)
    if not args.no_write:
        write_section("generation", text)
        print(f"wrote the generation section of {BENCH_DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
