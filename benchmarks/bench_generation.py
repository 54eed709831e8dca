"""Answer generation speed: plain fp32 ``model.generate`` (baseline) vs our HFGenerator, same run.

    .venv/bin/python benchmarks/bench_generation.py            # measure and update docs/BENCHMARKS.md
    .venv/bin/python benchmarks/bench_generation.py --variants # also the other options (fp32, int8, hf...)

What is measured (8 course questions, each with 3 course passages: ~500-600 prompt tokens):
  * single stream: prefill time (time to the first token) and decode tokens/s, forcing 60 new tokens;
  * answer latency p50/p95: real answers (stopping at end of turn; up to 60 new tokens), one at a time;
  * 8 concurrent questions: 8 threads ask at once. Ours goes through BatchingGenerator (one batched
    call); the baseline has one model behind a lock, so the questions queue up. Reported as the
    time until all 8 are answered, and as a multiple of the mean single-question latency.
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


def bench(folder: Path, rounds: int, variants: bool, threads: int | None) -> dict:
    import torch

    from finetune.generator import default_threads

    threads = threads or default_threads()
    reqs = build_requests()
    print(f"loading baseline and HFGenerator from {folder} ...", flush=True)
    base = Baseline(folder, threads)
    ours = HFGenerator(folder, threads=threads)
    batcher = BatchingGenerator(ours, max_batch=8)
    lengths = [len(ours.prompt_ids(r)) for r in reqs]
    print(f"prompt tokens: {min(lengths)}-{max(lengths)} (mean {statistics.mean(lengths):.0f})", flush=True)

    # warm-up (first calls allocate, load kernels)
    base.run(GenerationRequest(reqs[0].question, reqs[0].passages, 4))
    base.run(GenerationRequest(reqs[0].question, reqs[0].passages, 4), threads=1)
    ours.generate([GenerationRequest(reqs[0].question, reqs[0].passages, 4)])

    b, b1, o = Stats(), Stats(), Stats()
    for rnd in range(rounds):
        for i, r in enumerate(reqs[:3]):  # stream speed on 3 prompts per round
            # plain generate on torch's default threads and on 1 thread; a setting that is 5x
            # slower than the other (threads fighting over busy cores) is measured once only
            if i == 0 or b.decode_tps[-1] * 5 > b1.decode_tps[-1]:
                measure_stream(lambda q: baseline_stream(base, q), r, b)
            if i == 0 or b1.decode_tps[-1] * 5 > b.decode_tps[-1]:
                measure_stream(lambda q: baseline_stream(base, q, threads=1), r, b1)
            measure_stream(lambda q: ours_stream(ours, q), r, o)
            print(
                f"  round {rnd + 1} stream {i + 1}/3: decode tok/s baseline {b.decode_tps[-1]:.1f}, "
                f"baseline 1 thread {b1.decode_tps[-1]:.1f}, ours {o.decode_tps[-1]:.1f}",
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
            t, ids = timed(lambda r=r: ours.generate_tokens([r])[0])
            o.latency.append(t)
            o.tokens.append(len(ids))
        b.concurrent.append(concurrent(base.answer, reqs))
        o.concurrent.append(concurrent(lambda r: batcher.generate([r], timeout=300)[0], reqs))
        print(
            f"  round {rnd + 1}: latency p50 baseline {pct(b.latency, 50):.2f} s, ours {pct(o.latency, 50):.2f} s; "
            f"8 concurrent baseline {b.concurrent[-1]:.2f} s, ours {o.concurrent[-1]:.2f} s",
            flush=True,
        )
    answers = {"baseline": [base.answer(r) for r in reqs], "ours": ours.generate(reqs)}
    singles = [ours.generate([r])[0] for r in reqs]
    batch_equal = sum(a == s for a, s in zip(answers["ours"], singles, strict=True))
    batcher.close()
    result = {
        "baseline": b.summary(),
        "baseline1": {
            "prefill_s": statistics.median(b1.prefill),
            "decode_tps": statistics.median(b1.decode_tps),
            "stream_tps": statistics.median(b1.stream_tps),
        },
        "ours": o.summary(),
        "prompt_tokens": (min(lengths), max(lengths), statistics.mean(lengths)),
        "answers": answers,
        "batch_equal": batch_equal,
        "mean_batch": batcher.stats.mean_batch,
        "config": f"engine={ours.engine}, dtype={ours.dtype}, quantize={ours.quantize}",
        "thread_choice": ours._engine.threads.describe() if ours.engine == "fast" else {},
        "threads": threads,
        "baseline_threads": base.threads,
        "torch": torch.__version__,
        "variants": [],
    }
    if variants:
        ref_tokens = [base.run(r) for r in reqs]
        del ours
        result["variants"] = bench_variants(folder, reqs, ref_tokens, threads)
    return result


VARIANTS = {
    "fast, bf16 + int4 decode weights (default)": {"engine": "fast", "dtype": "bfloat16", "quantize": "int4"},
    "fast, bf16": {"engine": "fast", "dtype": "bfloat16", "quantize": "none"},
    "fast, bf16 + int8 decode weights": {"engine": "fast", "dtype": "bfloat16", "quantize": "int8"},
    "fast, fp32": {"engine": "fast", "dtype": "float32", "quantize": "none"},
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
    import torch

    prompt = gen.prompt_ids(r)
    engine = gen._engine
    with torch.inference_mode():
        if gen.engine == "fast":
            cap = len(prompt) + len(ref) + 1
            ck = [torch.zeros(1, engine.KV, cap, engine.D, dtype=engine.cdt) for _ in engine.layers]
            cv = [torch.zeros(1, engine.KV, cap, engine.D, dtype=engine.cdt) for _ in engine.layers]
            preds = [engine._prefill(prompt, ck, cv, 0)]
            for j, tok in enumerate(ref[:-1]):
                preds.append(int(engine._step(torch.tensor([tok]), [0], [len(prompt) + j], ck, cv)[0]))
        else:
            ids = torch.tensor([prompt + ref])
            logits = engine.model(ids).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(ref)]
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
    b, b1, o = res["baseline"], res["baseline1"], res["ours"]
    lo, hi, mean = res["prompt_tokens"]

    def x(num: float, den: float) -> str:
        return f"{num / den:.1f}x" if den else "-"

    rows = [
        [
            "prefill (time to first token)",
            f"{b['prefill_s']:.2f} s",
            f"{b1['prefill_s']:.2f} s",
            f"{o['prefill_s']:.2f} s",
            x(b["prefill_s"], o["prefill_s"]) + " faster",
        ],
        [
            "decode speed, one stream",
            f"{b['decode_tps']:.1f} tok/s",
            f"{b1['decode_tps']:.1f} tok/s",
            f"**{o['decode_tps']:.1f} tok/s**",
            x(o["decode_tps"], b["decode_tps"]),
        ],
        [
            "60 tokens incl. prefill, one stream",
            f"{b['stream_tps']:.1f} tok/s",
            f"{b1['stream_tps']:.1f} tok/s",
            f"{o['stream_tps']:.1f} tok/s",
            x(o["stream_tps"], b["stream_tps"]),
        ],
        [
            "answer latency p50",
            f"{b['p50']:.2f} s",
            "",
            f"**{o['p50']:.2f} s**",
            x(b["p50"], o["p50"]) + " faster",
        ],
        [
            "answer latency p95",
            f"{b['p95']:.2f} s",
            "",
            f"**{o['p95']:.2f} s**",
            x(b["p95"], o["p95"]) + " faster",
        ],
        [
            "mean answer length",
            f"{b['mean_tokens']:.0f} tokens",
            "",
            f"{o['mean_tokens']:.0f} tokens",
            "ours stops after 4 sentences or a loop",
        ],
        [
            "8 concurrent questions, all answered",
            f"{b['concurrent8']:.2f} s",
            "",
            f"{o['concurrent8']:.2f} s",
            x(b["concurrent8"], o["concurrent8"]) + " faster",
        ],
        [
            "8 concurrent / mean single latency",
            f"{b['concurrent_ratio']:.1f}x",
            "",
            f"**{o['concurrent_ratio']:.1f}x**",
            "target <= 2x",
        ],
    ]
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
        f"`BatchingGenerator(max_batch=8)` (mean batch {res['mean_batch']:.1f}). Baseline and ours alternate "
        "request by request, so background load hits both alike; absolute figures move with the load.",
        "",
        table(["metric", "baseline", "baseline, 1 thread", "ours", "ours vs baseline"], rows),
        "",
        f"Batched answers identical to the same questions asked alone: {res['batch_equal']}/8. "
        f"Decoding step times the thread chooser measured (ms): {res['thread_choice'] or '-'}.",
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
    lines += ["Answers (baseline fp32 `generate` / ours):", ""]
    for q, a_b, a_o in zip(QUESTIONS, res["answers"]["baseline"], res["answers"]["ours"], strict=True):
        lines.append(f"- **{q}**  ")
        lines.append(f"  baseline: {' '.join(a_b.split())[:300]}  ")
        lines.append(f"  ours: {' '.join(a_o.split())[:300]}")
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
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    folder = args.model_dir or ensure_base_model(args.data_dir, progress=print)
    res = bench(folder, args.rounds, args.variants, args.threads)
    text = render(res)
    print(text)
    if not args.no_write:
        write_section("generation", text)
        print(f"wrote the generation section of {BENCH_DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
