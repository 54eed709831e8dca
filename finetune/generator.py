"""The answer model the Tutor calls: a causal-LM folder loaded for fast greedy decoding on CPU.

``HFGenerator(folder)`` loads any model folder written by ``finetune.base_model`` or by the
fine-tuning code (safetensors + tokenizer + optional ``tutorbot_model.json`` manifest) and
implements ``knowledge.generation.Generator``.

Why not just ``model.generate``? For a 135M model on two CPU cores, ``generate`` spends much of
each step in Python bookkeeping and reads 540 MB of fp32 weights per token. For Llama-architecture
models (SmolLM2 is one) we run a lean engine of our own (numbers in ``docs/BENCHMARKS.md``, from
``benchmarks/bench_generation.py``):

* weights for the CPU at hand (``dtype="auto"``). With native bf16 (AVX512-BF16/AMX): decoding
  reads 4-bit weights (groups of 32, the scheme the packaged Q4_1 model shipped in, so nearly
  lossless for it), the output layer stays bf16, and prefill multiplies bf16 copies of the same
  weights, pre-packed once for oneDNN, with silu*mul fused in. Without it (AVX2): fp16 weights
  through fbgemm with fp32 activations, for prefill and decoding alike (half the bytes of fp32,
  faster than MKL's fp32 product at every batch size measured, same tokens as fp32);
* passage caching: the passages come from a fixed course, so the keys and values of the prompt's
  fixed prefix (system rule, "Course passages:", "[1]") and of each passage body are computed once
  and kept in a bounded LRU (``_PassageCache``; keys stored before RoPE and rotated to wherever
  the passage sits). A prompt then prefills only its labels ("[2]", "[3]") and the question, which
  attend to everything. Passage [1] is exact; later passages do not attend to the passages before
  them, an approximation whose effect on answers is measured in docs/BENCHMARKS.md
  (``passage_cache=False`` prefills every prompt in full);
* q/k/v and gate/up projections fused into one matrix each; RoPE as one complex multiplication;
* the residual stream, norms, RoPE and softmax in fp32;
* a static KV cache; each prompt is prefilled on its own (no padding waste), then all questions
  of a batch decode together, attention per question on its own slice of the cache (two small
  fp32 products: torch's CPU flash kernel is ~8x slower for a single bf16 query). Every
  operation treats rows independently, so a question gets the same answer alone or in a batch:
  matrix libraries compute small batches with other kernels (other bits), so decoding pads a
  batch to a row count each layer measured at load to be safe (``_Linear``);
* logits only for the last position; greedy; stops at end-of-turn, after ``max_sentences``
  sentences, on a loop, or when the model starts echoing the prompt;
* cores used with care on shared machines (``_Threads``).

Other architectures fall back to transformers' ``generate`` (``engine="hf"`` forces it).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from knowledge.generation import (
    PASSAGE_SEPARATOR,
    GenerationError,
    GenerationRequest,
    build_messages,
    passage_body,
    passage_label,
)

logger = logging.getLogger(__name__)

MANIFEST_NAME = "tutorbot_model.json"
Engine = Literal["auto", "fast", "hf"]
DType = Literal["auto", "bfloat16", "float16", "float32"]
Quantize = Literal["none", "int8", "int4"]
CacheMode = Literal["prefix", "blocks", "off"]

# Text that means the model has started to write the prompt again instead of answering.
_ECHO_MARKERS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "Course passages:",
    "\nQuestion:",
    "Question:",
)
_SPACES = re.compile(r"[ \t]+")


def fp16_weights_available() -> bool:
    """True when torch has fbgemm's fp16-weight matrix product (x86 builds): fp32 activations times
    fp16 weights, AVX2-tuned; on CPUs without native bf16 it beats fp32 at every batch size here."""
    try:
        import torch

        if "fbgemm" not in torch.backends.quantized.supported_engines:
            return False
        packed = torch.ops.quantized.linear_prepack_fp16(torch.ones(8, 16), None)
        return bool(torch.ops.quantized.linear_dynamic_fp16(torch.ones(2, 16), packed)[0, 0] == 16)
    except (AttributeError, RuntimeError):
        return False


def cpu_has_fast_bf16() -> bool:
    """True when the CPU computes bf16 matrix products natively (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="ignore")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def default_threads() -> int:
    """Cores this process may use (at most 8; more does not help a 135M model)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def _manifest_quantize(folder: Path) -> str | None:
    """The quantization a model folder asks for in its manifest (``"quantize"``), if any."""
    try:
        value = json.loads((Path(folder) / MANIFEST_NAME).read_text(encoding="utf-8")).get("quantize")
    except (OSError, ValueError, AttributeError):
        return None
    return value if value in ("none", "int8", "int4") else None


def read_model_name(folder: Path) -> str:
    """The model's display name from its manifest ('base:SmolLM2-135M-Instruct', 'v3', ...)."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = None
    if isinstance(manifest, dict):
        for key in ("name", "version"):
            if manifest.get(key):
                return str(manifest[key])
        if manifest.get("base_model"):
            return f"{manifest.get('kind', 'model')}:{manifest['base_model']}"
    return Path(folder).name


# --- answer text: stopping and clean-up ----------------------------------------------------------

# A sentence ends at . ! ? (optionally followed by closing quotes, brackets or bold markers) before
# whitespace, except after a digit: "0.1", and list numbers such as "2." are not sentence ends.
_SENTENCE_END = re.compile(r"(?<![0-9])[.!?][\"')\]*_]*(?=\s)")
_BOILERPLATE = re.compile(
    r"^\s*(?:the\s+)?(?:short\s+)?answer(?:\s+to\s+(?:the|this|your)\s+question)?\s+is\s*:\s*", re.IGNORECASE
)
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s*", re.MULTILINE)
_WORD = re.compile(r"\w+")
REPEAT_NGRAM = 6  # the same 6 words twice: the model is looping


def _norm_sentence(s: str) -> str:
    return re.sub(r"\W+", " ", s.lower()).strip()


def _repeat_start(text: str, n: int = REPEAT_NGRAM) -> int | None:
    """Character offset where a run of ``n`` words repeats an earlier run, or None."""
    words = [(m.group().lower(), m.start()) for m in _WORD.finditer(text)]
    seen: set[tuple[str, ...]] = set()
    for i in range(len(words) - n + 1):
        gram = tuple(w for w, _ in words[i : i + n])
        if gram in seen:
            return words[i][1]
        seen.add(gram)
    return None


def _sentence_ends(text: str) -> list[int]:
    return [m.end() for m in _SENTENCE_END.finditer(text)]


@dataclass
class _Stop:
    """Per-question stop rules applied to the text generated so far."""

    max_sentences: int

    def check(self, text: str) -> bool:
        """True when generation of this answer can stop (enough sentences, echo, repetition)."""
        if any(m in text for m in _ECHO_MARKERS):
            return True
        text = _BOILERPLATE.sub("", text)
        ends = _sentence_ends(text)
        if len(ends) >= self.max_sentences:
            return True
        seen, start = set(), 0
        for end in ends:
            key = _norm_sentence(text[start:end])
            if key and key in seen:
                return True
            seen.add(key)
            start = end
        return _repeat_start(text) is not None


def clean_answer(text: str, max_sentences: int, truncated: bool) -> str:
    """The answer as shown to students: the model's text without its typical noise.

    Cuts echoes of the prompt, a looping repeat (a repeated sentence or 6-word run) and anything
    past ``max_sentences``; drops an "The answer is:" opener and Markdown heading marks.
    ``truncated``: generation stopped mid-way (token limit or a cut repeat); an unfinished last
    sentence is dropped when at least one complete sentence precedes it.
    """
    for marker in _ECHO_MARKERS:
        cut = text.find(marker)
        if cut >= 0:
            text = text[:cut]
            truncated = False
    text = _HEADING.sub("", _BOILERPLATE.sub("", text.strip())).strip()
    repeat = _repeat_start(text)
    if repeat is not None:
        text, truncated = text[:repeat].rstrip(" ,;:-"), True
    if not text:
        return ""
    ends = _sentence_ends(text + " ")
    pieces, start = [], 0
    for end in ends:
        pieces.append(text[start:end])
        start = end
    tail = text[start:]
    kept: list[str] = []
    seen: set[str] = set()
    for piece in pieces:
        key = _norm_sentence(piece)
        if key and key in seen:
            tail = ""  # a repeat: the model is looping; what follows is noise
            break
        seen.add(key)
        kept.append(piece)
        if len(kept) >= max_sentences:
            tail = ""
            break
    if tail.strip() and not (truncated and kept):
        kept.append(tail)
    out = "".join(kept).strip()
    out = "\n".join(_SPACES.sub(" ", line).strip() for line in out.splitlines())
    return re.sub(r"\n{3,}", "\n\n", out).strip()


# --- the generator ---------------------------------------------------------------------------------


class HFGenerator:
    """Greedy answers from a local causal-LM folder, fast on CPU. Thread-safe (one lock).

    Args:
        model_dir: folder with config.json, *.safetensors and the tokenizer (and optionally
            ``tutorbot_model.json``, whose ``name`` becomes ``self.name``).
        engine: ``"fast"`` (our lean Llama decoder), ``"hf"`` (transformers ``generate``) or
            ``"auto"`` (fast when the architecture is supported).
        dtype: ``"auto"`` picks bf16 on CPUs with native bf16 (AVX512-BF16/AMX), else fp16
            weights (``"float16"``: fbgemm's fp16-weight products with fp32 activations, the
            residual stream and the KV cache in fp32; needs an x86 torch build), else fp32.
        quantize: weights of the decoder layers for decoding (the output layer stays bf16).
            ``"auto"``: what the folder's manifest asks for (``"quantize"``; the fine-tuning code
            writes it), else int4 with bf16 and none with fp32. ``"int4"``: 4-bit in groups of 32
            (``_weight_int4pack_mm_for_cpu``; the packaged model was Q4_1, the same scheme, so
            this is nearly lossless for it, and a step reads 4x fewer bytes than bf16).
            ``"int8"``: per-channel int8 weights (``_weight_int8pack_mm``; worse agreement with
            fp32 than int4 here). Prefill always uses bf16 copies of the same weights. With
            ``engine="hf"``, any quantization means dynamic int8 except ``mlp.down_proj``
            (quantizing its activations wrecks answers).
        threads: most cores one generation uses (None: the cores this process may use, at most 8).
            Only the threads that generate are affected (torch's thread count is per thread).
            Prefill runs one thread per prompt, prompts side by side; decoding picks 1 or
            ``threads`` by measuring both (see ``_Threads``).
        max_sentences: answers are cut after this many sentences.
        max_prompt_tokens: longer prompts keep their start and end (the question).
        passage_cache: reuse keys and values computed for earlier prompts (fast engine only; see
            ``_PassageCache``). ``"prefix"`` (default): the prompt's fixed start, and its
            passages when an earlier prompt began with the same passages in the same order (a
            repeated question, or one whose top passages match); the same computation in pieces:
            in fp32 the answer is the one a full prefill gives, in bf16 the pieces round apart
            from one long product and a near-tie can go the other way (docs/BENCHMARKS.md: 36 of
            60 answers identical, 98.5% teacher-forced agreement). ``"blocks"``: every passage from
            its own cached block, whatever its rank and neighbours, so almost every prompt prefills only its question; passage [1] is
            exact, but later passages do not attend to the passages before them, which costs the
            base model answer quality (docs/BENCHMARKS.md: 29 -> 18 of 60 tutor answers with all
            facts), so it is not the default. ``"off"`` (or False): every prompt prefilled in full.
        passage_cache_mb: memory bound of that cache (least recently used blocks go first).
        name: overrides the manifest's name.
    """

    def __init__(
        self,
        model_dir: Path | str,
        *,
        engine: Engine = "auto",
        dtype: DType = "auto",
        quantize: Quantize | Literal["auto"] = "auto",
        threads: int | None = None,
        max_sentences: int = 4,
        max_prompt_tokens: int = 1536,
        passage_cache: CacheMode | bool = "prefix",
        passage_cache_mb: float = 512,
        name: str | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.max_sentences = max_sentences
        self.max_prompt_tokens = max_prompt_tokens
        if passage_cache_mb < 0:
            raise ValueError("passage_cache_mb must be >= 0")
        cache_mode = {True: "prefix", False: "off"}.get(passage_cache, passage_cache)  # type: ignore[call-overload]
        if cache_mode not in ("prefix", "blocks", "off"):
            raise ValueError(f"passage_cache must be 'prefix', 'blocks' or 'off', not {passage_cache!r}")
        self.cache_mode: CacheMode = cache_mode
        self._lock = threading.Lock()
        if quantize not in ("auto", "none", "int8", "int4"):
            raise ValueError(f"quantize must be 'auto', 'none', 'int8' or 'int4', not {quantize!r}")
        if engine not in ("auto", "fast", "hf"):
            raise ValueError(f"engine must be 'auto', 'fast' or 'hf', not {engine!r}")
        started = time.monotonic()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import torch
        except ImportError as exc:  # pragma: no cover - the venv has it
            raise GenerationError(f"The answer model needs torch: {exc}") from exc
        self.threads = max(1, int(threads)) if threads is not None else default_threads()
        if dtype == "auto":
            dtype = (
                "bfloat16"
                if cpu_has_fast_bf16()
                else "float16"
                if engine != "hf" and fp16_weights_available()
                else "float32"
            )
        if dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be 'auto', 'bfloat16', 'float16' or 'float32', not {dtype!r}")
        if quantize == "auto":
            quantize = _manifest_quantize(self.model_dir) or (
                "int4" if dtype == "bfloat16" and engine != "hf" else "none"
            )
        self.dtype = dtype
        self.quantize = quantize
        self._tokenizer, model = self._load(torch)
        self._stop_ids = self._find_stop_ids(model)
        use_fast = engine == "fast" or (engine == "auto" and _LlamaEngine.supports(model.config))
        if engine == "fast" and not _LlamaEngine.supports(model.config):
            raise GenerationError(
                f"The model in {self.model_dir} ({model.config.model_type}) is not supported by the fast "
                "engine; use engine='hf'."
            )
        try:
            if use_fast:
                self._engine: _LlamaEngine | _HFEngine = _LlamaEngine(
                    model,
                    dtype=dtype,
                    quantize=quantize,
                    threads=self.threads,
                    cache_bytes=int(passage_cache_mb * 2**20) if cache_mode != "off" else None,
                    cache_mode=cache_mode,
                )
            else:
                self._engine = _HFEngine(
                    model, self._tokenizer, dtype=dtype, quantize=quantize, threads=self.threads
                )
        except Exception as exc:
            raise GenerationError(f"Cannot prepare the answer model from {self.model_dir}: {exc}") from exc
        self.engine = "fast" if use_fast else "hf"
        self._name = name or read_model_name(self.model_dir)
        # {"prefill_s", "decode_s", "steps", "batch"} of the last call, for logs and benchmarks
        self.last_timing: dict[str, float] | None = None
        logger.info(
            "answer model %s loaded from %s in %.1f s (engine=%s, dtype=%s, quantize=%s, threads=%d)",
            self._name,
            self.model_dir,
            time.monotonic() - started,
            self.engine,
            dtype,
            quantize,
            self.threads,
        )

    @property
    def name(self) -> str:
        return self._name

    # --- loading -------------------------------------------------------------------------------
    def _load(self, torch: Any) -> tuple[Any, Any]:
        folder = self.model_dir
        if not folder.is_dir():
            raise GenerationError(f"Cannot load the answer model: {folder} is not a folder.")
        if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
            raise GenerationError(
                f"Cannot load the answer model: {folder} is not a model folder "
                "(it needs config.json and *.safetensors weights)."
            )
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
            from transformers.utils import logging as hf_logging

            bars = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # no "Loading weights" bar in the bot's console
            try:
                tokenizer = AutoTokenizer.from_pretrained(folder)
                model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            finally:
                if bars:
                    hf_logging.enable_progress_bar()
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise GenerationError(f"Cannot load the answer model from {folder}: {reason}") from exc
        model.eval()
        if tokenizer.chat_template is None:
            raise GenerationError(
                f"Cannot load the answer model from {folder}: its tokenizer has no chat template."
            )
        return tokenizer, model

    def _find_stop_ids(self, model: Any) -> frozenset[int]:
        ids: set[int] = set()
        for source in (getattr(model, "generation_config", None), model.config, self._tokenizer):
            eos = getattr(source, "eos_token_id", None)
            if isinstance(eos, int):
                ids.add(eos)
            elif isinstance(eos, (list, tuple)):
                ids.update(int(i) for i in eos)
        vocab = self._tokenizer.get_vocab()
        for tok in ("<|im_end|>", "<|im_start|>", "<|endoftext|>", "<|eot_id|>"):
            if tok in vocab:
                ids.add(vocab[tok])
        return frozenset(ids)

    # --- generation ----------------------------------------------------------------------------
    @property
    def passage_cache(self) -> _PassageCache | None:
        """The cache of passage key/value blocks (None: prompts are prefilled in full)."""
        return getattr(self._engine, "cache", None)

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """Token ids of the chat prompt for one request (the same prompt fine-tuning uses)."""
        return self._encode(request)[0]

    def _encode(self, request: GenerationRequest) -> tuple[list[int], _Blocks | None]:
        """The prompt's token ids, and where its passage bodies sit (None: prefill it in full)."""
        messages = build_messages(request.question, request.passages)
        text = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        want_blocks = self.passage_cache is not None and bool(request.passages)
        enc = self._tokenizer(text, add_special_tokens=False, return_offsets_mapping=want_blocks)
        ids = list(enc["input_ids"])
        if len(ids) > self.max_prompt_tokens:
            head = 64  # the system rule
            return ids[:head] + ids[-(self.max_prompt_tokens - head) :], None
        if not want_blocks:
            return ids, None
        return ids, _find_blocks(text, enc["offset_mapping"], request)

    def _encode_all(self, requests: Sequence[GenerationRequest]) -> tuple[list[list[int]], list[Any]]:
        encoded = [self._encode(r) for r in requests]
        return [ids for ids, _ in encoded], [blocks for _, blocks in encoded]

    def warm(self, passages: Sequence[Any]) -> int:
        """Compute and cache the key/value blocks of ``passages`` (``knowledge.generation.Passage``)
        ahead of questions, e.g. every chunk of a small course. Returns how many blocks were
        computed (0 without a cache). Stops once the cache is full (more would evict earlier ones).
        Safe to run in a background thread while questions are answered (the cache has its own
        lock; a block both need is computed once)."""
        cache = self.passage_cache
        if cache is None or not passages or not isinstance(self._engine, _LlamaEngine):
            return 0
        before = cache.stats.misses
        for p in passages:
            ids, blocks = self._encode(GenerationRequest("?", (p,), 1))
            if blocks is not None:
                self._engine.warm(ids, blocks)
            if cache.full:
                break
        return cache.stats.misses - before

    def generate(self, requests: Sequence[GenerationRequest]) -> list[str]:
        """Greedy answers, same order as ``requests``. Raises GenerationError on failure."""
        if not requests:
            return []
        try:
            prompts, blocks = self._encode_all(requests)
            limits = [max(0, int(r.max_new_tokens)) for r in requests]
            stops = [_Stop(self.max_sentences) for _ in requests]
            with self._lock:
                outputs = self._decode(prompts, limits, self._stop_ids, self._make_checker(stops), blocks)
        except GenerationError:
            raise
        except Exception as exc:
            logger.exception("answer generation failed")
            raise GenerationError(f"The answer model failed: {type(exc).__name__}: {exc}") from exc
        return [self.answer_text(ids, limit) for ids, limit in zip(outputs, limits, strict=True)]

    def answer_text(self, ids: Sequence[int], limit: int) -> str:
        """The answer shown for generated token ids (``limit``: the request's max_new_tokens)."""
        stopped_by_token = bool(ids) and ids[-1] in self._stop_ids
        text = self._tokenizer.decode([i for i in ids if i not in self._stop_ids], skip_special_tokens=True)
        truncated = not stopped_by_token and len(ids) >= limit
        return clean_answer(text, self.max_sentences, truncated)

    def generate_tokens(
        self, requests: Sequence[GenerationRequest], *, ignore_stops: bool = False
    ) -> list[list[int]]:
        """Raw generated token ids (no clean-up). ``ignore_stops``: always produce ``max_new_tokens``
        tokens (for measuring speed)."""
        prompts, blocks = self._encode_all(requests)
        limits = [max(0, int(r.max_new_tokens)) for r in requests]
        if ignore_stops:
            stop_ids: frozenset[int] = frozenset()

            def check(row: int, ids: list[int]) -> bool:
                return False

        else:
            stop_ids, check = (
                self._stop_ids,
                self._make_checker([_Stop(self.max_sentences) for _ in requests]),
            )
        with self._lock:
            return self._decode(prompts, limits, stop_ids, check, blocks)

    def _decode(
        self,
        prompts: list[list[int]],
        limits: list[int],
        stop_ids: frozenset[int],
        check,
        blocks: list[Any] | None = None,
    ) -> list[list[int]]:
        """The engine call (lock held); notes its timing in ``last_timing``."""
        self.last_timing = None
        if isinstance(self._engine, _LlamaEngine):
            out = self._engine.decode(prompts, limits, stop_ids, check, blocks)
        else:
            out = self._engine.decode(prompts, limits, stop_ids, check)
        self.last_timing = getattr(self._engine, "last_timing", None)
        return out

    def _make_checker(self, stops: list[_Stop]):
        decode = self._tokenizer.decode

        def check(row: int, ids: list[int]) -> bool:
            return stops[row].check(decode(ids, skip_special_tokens=False))

        return check


# --- passage blocks -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Blocks:
    """Where a prompt's passage bodies sit, in tokens.

    ``prefix``: tokens before the first body (the system rule, "Course passages:", "[1]"), shared
    by every prompt. ``bodies``: the (start, end) token span of each passage body (" Title > Section
    \ntext" and the blank line after it). Everything else (the labels "[2]", "[3]", the question and
    the assistant header) is computed for each prompt."""

    prefix: int
    bodies: tuple[tuple[int, int], ...]


def _find_blocks(text: str, offsets: Sequence[tuple[int, int]], request: GenerationRequest) -> _Blocks | None:
    """Token spans of the passage bodies in a tokenized prompt; None when a body does not begin and
    end on token boundaries (then the prompt is prefilled in full, unchanged)."""
    token_at: dict[int, int] = {}
    for i, (a, b) in enumerate(offsets):
        if b > a and (i == 0 or offsets[i - 1][1] <= a):
            token_at.setdefault(a, i)
    spans = []
    cursor = 0
    for i, passage in enumerate(request.passages, 1):
        label, body = passage_label(i), passage_body(passage) + PASSAGE_SEPARATOR
        at = text.find(label + body, cursor)
        if at < 0:
            return None
        start, end = at + len(label), at + len(label) + len(body)
        if start not in token_at or end not in token_at:
            return None
        spans.append((token_at[start], token_at[end]))
        cursor = end
    if not spans or spans[0][0] == 0:
        return None
    return _Blocks(prefix=spans[0][0], bodies=tuple(spans))


@dataclass
class PassageCacheStats:
    hits: int = 0
    misses: int = 0  # blocks computed
    evictions: int = 0


class _PassageCache:
    """Key/value blocks of prompt pieces that recur: the shared prompt prefix and passage bodies.

    A passage comes from a fixed course, so the keys and values its tokens produce in every layer
    can be computed once, after the prefix (system rule, "Course passages:", "[1]"), at the position
    right after it, and reused wherever the passage appears. Keys are stored BEFORE the rotary
    position embedding: placing a block at its real position is one complex multiplication by that
    position's rotations, the same operation a full prefill does there; a block is position-free.

    Key: (context tokens, block tokens): the exact token ids, so a changed system rule or passage
    text is a different entry; the cache belongs to one loaded model (its engine), so model identity
    is implied. Least recently used entries are evicted beyond ``max_bytes``. Thread-safe: when two
    prompts need the same missing block at once, one computes it and the other waits for it. A block
    is computed the same way (one thread, the same operators) whoever asks, so a question gets the
    same answer with a cold or a warm cache, alone or in a batch.
    """

    def __init__(self, max_bytes: int) -> None:
        from collections import OrderedDict

        self.max_bytes = max(0, int(max_bytes))
        self.stats = PassageCacheStats()
        self.bytes = 0
        self._entries: OrderedDict[tuple, tuple[Any, Any]] = OrderedDict()
        self._pending: dict[tuple, threading.Event] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def full(self) -> bool:
        return self.bytes >= self.max_bytes * 0.95

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def get(self, key: tuple, compute: Any) -> tuple[Any, Any]:
        """The (keys, values) stored under ``key``, computed by ``compute()`` when missing."""
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    self.stats.hits += 1
                    return entry
                waiting = self._pending.get(key)
                if waiting is None:
                    self._pending[key] = threading.Event()
                    self.stats.misses += 1
            if waiting is None:
                break
            waiting.wait()  # another thread is computing it; then look again
        try:
            entry = compute()
            self._store(key, entry)
            return entry
        finally:
            with self._lock:
                self._pending.pop(key).set()

    def _store(self, key: tuple, entry: tuple[Any, Any]) -> None:
        size = sum(t.numel() * t.element_size() for t in entry)
        with self._lock:
            if size > self.max_bytes:
                return
            while self._entries and self.bytes + size > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self.bytes -= sum(t.numel() * t.element_size() for t in old)
                self.stats.evictions += 1
            self._entries[key] = entry
            self.bytes += size

    def describe(self) -> dict[str, float]:
        return {
            "entries": len(self._entries),
            "mb": round(self.bytes / 2**20, 1),
            "max_mb": round(self.max_bytes / 2**20, 1),
            "hits": self.stats.hits,
            "misses": self.stats.misses,
            "evictions": self.stats.evictions,
        }


# --- engines ---------------------------------------------------------------------------------------


class _LlamaEngine:
    """A lean greedy decoder for Llama-architecture models (SmolLM2), see the module docstring."""

    @staticmethod
    def supports(config: Any) -> bool:
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        rope_type = (
            rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
        )
        return (
            getattr(config, "model_type", None) == "llama"
            and not getattr(config, "attention_bias", False)
            and not getattr(config, "mlp_bias", False)
            and getattr(config, "hidden_act", "silu") == "silu"
            and rope_type in (None, "default")
        )

    def __init__(
        self,
        model: Any,
        *,
        dtype: str,
        quantize: str,
        threads: int,
        cache_bytes: int | None = None,
        cache_mode: str = "prefix",
    ) -> None:
        import torch
        import torch.nn.functional as F

        self.torch, self.F = torch, F
        self.threads = _Threads(threads)
        self.cache = _PassageCache(cache_bytes) if cache_bytes is not None else None
        self.cache_mode = cache_mode
        c = model.config
        self.H = c.num_attention_heads
        self.KV = c.num_key_value_heads
        self.D = getattr(c, "head_dim", None) or c.hidden_size // self.H
        self.scale = self.D**-0.5  # attention's 1/sqrt(d), as scaled_dot_product_attention uses
        self.I = c.intermediate_size
        self.hidden = c.hidden_size
        self.eps = float(c.rms_norm_eps)
        self.cdt = torch.bfloat16 if dtype == "bfloat16" else torch.float32  # activations, KV cache
        if dtype == "float16" and quantize == "none":
            quantize = "fp16"  # every product (prefill and decoding) with fbgemm's fp16 weights
        self.max_positions = int(c.max_position_embeddings)
        rope = getattr(c, "rope_parameters", None) or {}
        theta = float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)))
        inv = 1.0 / (theta ** (torch.arange(0, self.D, 2, dtype=torch.float32) / self.D))
        angles = torch.outer(torch.arange(self.max_positions, dtype=torch.float32), inv)
        self.rotations = torch.polar(torch.ones_like(angles), angles)  # [positions, D/2] complex64
        # HF's rotate_half pairs dim i with i + D/2 of each head. Interleaving the rows of the q and
        # k projections makes those pairs adjacent, so RoPE is one complex multiplication. q.k is
        # unchanged by a permutation applied to both, and v is untouched.
        half = self.D // 2
        perm = torch.stack([torch.arange(half), torch.arange(half) + half], 1).reshape(-1)

        def heads_interleaved(w: Any, n_heads: int) -> Any:
            return w.view(n_heads, self.D, -1)[:, perm].reshape(n_heads * self.D, -1)

        self.layers = []
        with torch.no_grad():
            for layer in model.model.layers:
                a, m = layer.self_attn, layer.mlp
                qkv = torch.cat(
                    [
                        heads_interleaved(a.q_proj.weight.detach().float(), self.H),
                        heads_interleaved(a.k_proj.weight.detach().float(), self.KV),
                        a.v_proj.weight.detach().float(),
                    ],
                    0,
                )
                self.layers.append(
                    _Layer(
                        norm1=layer.input_layernorm.weight.detach().float().clone(),
                        qkv=_Linear(qkv, self.cdt, quantize),
                        o=_Linear(a.o_proj.weight, self.cdt, quantize),
                        norm2=layer.post_attention_layernorm.weight.detach().float().clone(),
                        mlp=_MLP(m.gate_proj.weight, m.up_proj.weight, self.cdt, quantize),
                        down=_Linear(m.down_proj.weight, self.cdt, quantize),
                    )
                )
            self.norm = model.model.norm.weight.detach().float().clone()
            self.embed = model.model.embed_tokens.weight.detach().float().clone()
            # The output layer ranks every token: 4 bits blur the ranking (top-1 agreement with fp32
            # fell from 96% to 84%), and the int8 kernel is slower here than packed bf16.
            self.head = _Linear(model.lm_head.weight, self.cdt, "fp16" if dtype == "float16" else "none")

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of keys and values one prompt token takes in the cache (all layers)."""
        return len(self.layers) * 2 * self.KV * self.D * self.torch.finfo(self.cdt).bits // 8

    def _rms(self, x: Any, w: Any) -> Any:
        return self.F.rms_norm(x, (self.hidden,), w, self.eps).to(self.cdt)

    def _rope(self, x: Any, rot: Any) -> Any:
        """x [..., D] with interleaved pairs; rot broadcastable to [..., D/2] (complex)."""
        xc = self.torch.view_as_complex(x.float().unflatten(-1, (self.D // 2, 2)))
        return self.torch.view_as_real(xc * rot).flatten(-2).to(self.cdt)

    def _prefill(self, ids: list[int], cache_k: list[Any], cache_v: list[Any], row: int) -> int:
        """Run one prompt, fill its cache row, return the first generated token."""
        torch, F = self.torch, self.F
        T = len(ids)
        H, KV, D = self.H, self.KV, self.D
        x = self.embed[torch.tensor(ids)]  # [T, hidden] fp32 residual stream
        rot = self.rotations[:T]  # [T, D/2], broadcasts over heads
        for li, layer in enumerate(self.layers):
            q, k, v = layer.qkv(self._rms(x, layer.norm1), prefill=True).split([H * D, KV * D, KV * D], -1)
            q = self._rope(q.view(T, H, D).transpose(0, 1), rot)
            k = self._rope(k.view(T, KV, D).transpose(0, 1), rot)
            v = v.view(T, KV, D).transpose(0, 1)
            cache_k[li][row, :, :T] = k
            cache_v[li][row, :, :T] = v
            att = F.scaled_dot_product_attention(
                q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), is_causal=True, enable_gqa=True
            )
            x = x + layer.o(att[0].transpose(0, 1).reshape(T, H * D), prefill=True)
            x = x + layer.down(layer.mlp(self._rms(x, layer.norm2), prefill=True), prefill=True)
        return int(self.head(self._rms(x[-1:], self.norm), prefill=False).float().argmax(-1))

    # --- prefill from cached passage blocks ----------------------------------------------------
    def _forward(
        self,
        ids: Sequence[int],
        positions: list[int],
        cache_k: list[Any],
        cache_v: list[Any],
        row: int,
        *,
        keep: tuple[list[Any], list[Any]] | None = None,
        logits: bool = True,
        first: int = 0,
    ) -> int | None:
        """Run the tokens ``ids`` at ``positions`` (ascending) over cache row ``row``.

        Positions from ``first`` up to ``positions[-1]`` that are not among ``positions`` must
        already hold keys and values (the prefix and placed passage blocks); each new token attends
        to every position from ``first`` up to its own. ``keep`` collects each layer's keys before
        RoPE and values ([KV, n, D]). Returns the next token after the last one (when ``logits``)."""
        torch, F = self.torch, self.F
        n, T = len(ids), positions[-1] + 1
        H, KV, D = self.H, self.KV, self.D
        start = positions[0]
        contiguous = T - start == n
        pos = torch.tensor(positions)
        rot = self.rotations[pos]
        # attention over [first, T): causal among the new tokens, everything before them visible
        mask = None if start == first and contiguous else (torch.arange(first, T)[None, :] <= pos[:, None])
        x = self.embed[torch.tensor(list(ids))]
        for li, layer in enumerate(self.layers):
            q, k, v = layer.qkv(self._rms(x, layer.norm1), prefill=True).split([H * D, KV * D, KV * D], -1)
            q = self._rope(q.view(n, H, D).transpose(0, 1), rot)
            k = k.view(n, KV, D).transpose(0, 1)
            v = v.view(n, KV, D).transpose(0, 1)
            if keep is not None:
                keep[0].append(k.contiguous())
                keep[1].append(v.contiguous())
            ck, cv = cache_k[li], cache_v[li]
            if contiguous:
                ck[row, :, start:T] = self._rope(k, rot)
                cv[row, :, start:T] = v
            else:
                ck[row].index_copy_(1, pos, self._rope(k, rot))
                cv[row].index_copy_(1, pos, v.contiguous())
            att = F.scaled_dot_product_attention(
                q.unsqueeze(0),
                ck[row : row + 1, :, first:T],
                cv[row : row + 1, :, first:T],
                attn_mask=None if mask is None else mask[None, None],
                is_causal=mask is None,
                enable_gqa=True,
            )
            x = x + layer.o(att[0].transpose(0, 1).reshape(n, H * D), prefill=True)
            x = x + layer.down(layer.mlp(self._rms(x, layer.norm2), prefill=True), prefill=True)
        if not logits:
            return None
        return int(self.head(self._rms(x[-1:], self.norm), prefill=False).float().argmax(-1))

    def _block(self, context: tuple[int, ...], tokens: tuple[int, ...]) -> tuple[Any, Any]:
        """Cached keys (before RoPE) and values [layers, KV, n, D] of ``tokens`` placed right after
        ``context`` (itself a cached block computed from the start)."""
        assert self.cache is not None

        def compute() -> tuple[Any, Any]:
            torch = self.torch
            P, n = len(context), len(tokens)
            shape = (1, self.KV, P + n, self.D)
            ck = [torch.empty(shape, dtype=self.cdt) for _ in self.layers]
            cv = [torch.empty(shape, dtype=self.cdt) for _ in self.layers]
            if P:
                self._place(self._block((), context), 0, ck, cv, 0)
            keep: tuple[list[Any], list[Any]] = ([], [])
            self.threads.set(1)  # the same operators whoever computes it: answers do not depend on it
            self._forward(tokens, list(range(P, P + n)), ck, cv, 0, keep=keep, logits=False)
            return torch.stack(keep[0]), torch.stack(keep[1])

        return self.cache.get((context, tokens), compute)

    def _place(
        self, block: tuple[Any, Any], start: int, cache_k: list[Any], cache_v: list[Any], row: int
    ) -> None:
        """Write a cached block into a cache row at ``start``: its keys rotated to their real positions."""
        k, v = block
        n = k.shape[2]
        k = self._rope(k, self.rotations[start : start + n])  # [layers, KV, n, D]
        for li in range(len(self.layers)):
            cache_k[li][row, :, start : start + n] = k[li]
            cache_v[li][row, :, start : start + n] = v[li]

    def _prefill_blocks(
        self, ids: list[int], blocks: _Blocks, cache_k: list[Any], cache_v: list[Any], row: int
    ) -> int:
        """Prefill one prompt from cached blocks: the shared prefix (exact), each passage body as
        computed right after the prefix (exact for passage [1]; later passages do not see the ones
        before them), then the labels and the question, which attend to everything."""
        prefix = tuple(ids[: blocks.prefix])
        self._place(self._block((), prefix), 0, cache_k, cache_v, row)
        live: list[int] = []
        at = blocks.prefix
        for start, end in blocks.bodies:
            live.extend(range(at, start))
            self._place(self._block(prefix, tuple(ids[start:end])), start, cache_k, cache_v, row)
            at = end
        live.extend(range(at, len(ids)))
        first = self._forward([ids[i] for i in live], live, cache_k, cache_v, row)
        assert first is not None
        return first

    def _prefill_prefix(
        self, ids: list[int], blocks: _Blocks, cache_k: list[Any], cache_v: list[Any], row: int
    ) -> int:
        """Prefill one prompt in pieces (the fixed start, then each passage with its label, then the
        question), each piece attending to everything before it: exact. A piece whose whole prompt
        prefix an earlier prompt had is taken from the cache; a new one is computed in this row and
        stored under that prefix."""
        assert self.cache is not None
        self.threads.set(1)
        ends = [blocks.prefix] + [end for _, end in blocks.bodies]
        start = 0
        for end in ends:
            key = ("prefix", start, tuple(ids[:end]))

            computed: list[int] = []

            def compute(
                start: int = start, end: int = end, computed: list[int] = computed
            ) -> tuple[Any, Any]:
                keep: tuple[list[Any], list[Any]] = ([], [])
                self._forward(
                    ids[start:end], list(range(start, end)), cache_k, cache_v, row, keep=keep, logits=False
                )
                computed.append(start)
                return self.torch.stack(keep[0]), self.torch.stack(keep[1])

            piece = self.cache.get(key, compute)
            if not computed:  # from the cache (or another prompt's row): place it here
                self._place(piece, start, cache_k, cache_v, row)
            start = end
        first = self._forward(ids[start:], list(range(start, len(ids))), cache_k, cache_v, row)
        assert first is not None
        return first

    def prefill_one(
        self, ids: list[int], blocks: _Blocks | None, cache_k: list[Any], cache_v: list[Any], row: int
    ) -> int:
        """Prefill a prompt into a cache row (reusing cached pieces when possible); the first token."""
        if blocks is not None and self.cache is not None:
            if self.cache_mode == "blocks":
                return self._prefill_blocks(ids, blocks, cache_k, cache_v, row)
            return self._prefill_prefix(ids, blocks, cache_k, cache_v, row)
        return self._prefill(ids, cache_k, cache_v, row)

    def warm(self, ids: list[int], blocks: _Blocks) -> None:
        """Compute (and cache) the fixed start and passage pieces of a prompt, without running it."""
        with self.torch.inference_mode():
            if self.cache_mode == "blocks":
                prefix = tuple(ids[: blocks.prefix])
                self._block((), prefix)
                for start, end in blocks.bodies:
                    self._block(prefix, tuple(ids[start:end]))
                return
            cap = blocks.bodies[-1][1]
            shape = (1, self.KV, cap + 1, self.D)
            ck = [self.torch.empty(shape, dtype=self.cdt) for _ in self.layers]
            cv = [self.torch.empty(shape, dtype=self.cdt) for _ in self.layers]
            self._prefill_prefix(ids[: cap + 1], blocks, ck, cv, 0)  # one token of "question"

    def _step(
        self, tokens: Any, slots: list[int], lens: list[int], cache_k: list[Any], cache_v: list[Any]
    ) -> Any:
        """One decoding step for the running rows: tokens[b] sits at position lens[b] of cache slot slots[b]."""
        torch = self.torch
        B = tokens.shape[0]
        H, KV, D = self.H, self.KV, self.D
        pos = torch.tensor(lens)
        rows = torch.tensor(slots)
        rot = self.rotations[pos].unsqueeze(1)  # [B, 1, D/2]
        x = self.embed[tokens]  # [B, hidden]
        single = B == 1
        for li, layer in enumerate(self.layers):
            qkv = layer.qkv(self._rms(x, layer.norm1), prefill=False).view(B, H + 2 * KV, D)
            qk = self._rope(qkv[:, : H + KV], rot)  # q and k heads rotated in one go
            q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + KV :]
            ck, cv = cache_k[li], cache_v[li]
            if single:  # plain slicing is cheaper than index_put for one row
                ck[slots[0], :, lens[0]] = k[0]
                cv[slots[0], :, lens[0]] = v[0]
            else:
                ck[rows, :, pos] = k
                cv[rows, :, pos] = v
            outs = [self._attend_one(q[b], ck[slots[b], :, : lens[b] + 1], cv[slots[b], :, : lens[b] + 1])
                    for b in range(B)]
            att = outs[0] if single else torch.stack(outs, 0)
            x = x + layer.o(att.reshape(B, H * D), prefill=False)
            x = x + layer.down(layer.mlp(self._rms(x, layer.norm2), prefill=False), prefill=False)
        return self.head(self._rms(x, self.norm), prefill=False).float().argmax(-1)

    def _attend_one(self, q: Any, k: Any, v: Any) -> Any:
        """Attention of one new token (q: [H, D]) over its row's keys and values ([KV, n, D]), in
        fp32. torch's CPU flash kernel takes ~0.6 ms for one bf16 query over 600 positions (it is
        built for blocks of queries) against ~0.08 ms for these two small products: at 30 layers and
        8 rows that was 85% of a decoding step (profiled). Query head h reads key/value head h // G,
        as ``enable_gqa`` does. Keeping the decoding buffers in fp32 instead, so that no step converts
        them, measured no faster (8 answers in one batch: 1.95-2.01 s bf16, 2.05-2.10 s fp32): the fp32
        history is twice the bytes to read."""
        torch = self.torch
        KV, D = self.KV, self.D
        qg = q.reshape(KV, -1, D).float()  # [KV, G, D]
        scores = torch.matmul(qg, k.float().transpose(1, 2)).mul_(self.scale)  # [KV, G, n]
        out = torch.matmul(torch.softmax(scores, -1), v.float())  # [KV, G, D]
        return out.reshape(-1, D).to(self.cdt)  # [H, D]

    def _probe(self, batch: int) -> None:
        """The matrix products of one layer for ``batch`` rows: a cheap sample of a decoding step."""
        layer = self.layers[0]
        x = self.torch.zeros(batch, self.hidden, dtype=self.cdt)
        layer.qkv(x, prefill=False)
        layer.down(layer.mlp(x, prefill=False), prefill=False)

    def decode(
        self,
        prompts: list[list[int]],
        limits: list[int],
        stop_ids: frozenset[int],
        check,
        blocks: Sequence[_Blocks | None] | None = None,
    ) -> list[list[int]]:
        torch = self.torch
        self.last_timing: dict[str, float] | None = None
        n = len(prompts)
        plans = list(blocks) if blocks is not None else [None] * n
        outputs: list[list[int]] = [[] for _ in range(n)]
        active = [i for i in range(n) if limits[i] > 0]
        if not active:
            return outputs
        capacity = max(len(prompts[i]) + limits[i] for i in active)
        if capacity > self.max_positions:
            raise GenerationError(
                f"The prompt is too long for the model ({capacity} > {self.max_positions} tokens)."
            )
        started = time.perf_counter()
        with torch.inference_mode():
            shape = (len(active), self.KV, capacity, self.D)
            cache_k = [torch.empty(shape, dtype=self.cdt) for _ in self.layers]
            cache_v = [torch.empty(shape, dtype=self.cdt) for _ in self.layers]
            slot = {i: s for s, i in enumerate(active)}

            def prefill(i: int) -> int:
                with torch.inference_mode():
                    return self.prefill_one(prompts[i], plans[i], cache_k, cache_v, slot[i])

            lens = {}
            for i, first in zip(active, self.threads.prefill_all(prefill, active), strict=True):
                outputs[i].append(first)
                lens[i] = len(prompts[i])
            prefilled = time.perf_counter()
            steps = 0
            running = [i for i in active if not self._finished(i, outputs, limits, stop_ids, check)]
            while running:
                steps += 1
                # Finished rows simply drop out: the running rows address their own cache slots.
                tokens = torch.tensor([outputs[i][-1] for i in running])
                with self.threads.decoding(len(running), lambda b=len(running): self._probe(b)):
                    nxt = self._step(
                        tokens, [slot[i] for i in running], [lens[i] for i in running], cache_k, cache_v
                    )
                for i, t in zip(running, nxt.tolist(), strict=True):
                    outputs[i].append(int(t))
                    lens[i] += 1
                running = [i for i in running if not self._finished(i, outputs, limits, stop_ids, check)]
        self.last_timing = {
            "prefill_s": prefilled - started,
            "decode_s": time.perf_counter() - prefilled,
            "steps": steps,
            "batch": len(active),
        }
        return outputs

    @staticmethod
    def _finished(
        i: int, outputs: list[list[int]], limits: list[int], stop_ids: frozenset[int], check
    ) -> bool:
        ids = outputs[i]
        return ids[-1] in stop_ids or len(ids) >= limits[i] or check(i, ids)


class _Threads:
    """How a generation call uses the cores, chosen for robustness on shared machines.

    torch's intra-op thread count is per calling thread (an OpenMP setting), so this only touches
    the threads generation runs on. Lessons measured on a shared 2-core machine:

    * Splitting small operators over 2 cores is a trap when another process keeps a core busy:
      every operator waits for the descheduled thread. A decoding step took 1.2 s on 2 threads
      against 25 ms on 1 with the machine loaded (with idle cores, 2 threads can be faster).
    * Prefill runs each prompt on ONE thread (oneDNN splits some large products differently for
      different thread counts, and answers must not depend on the load); the prompts of a batch
      are prefilled side by side on a small pool, which uses the cores without cross-core waits.
    * Decoding keeps the batch together (its rows share every read of the weights; splitting the
      batch over two threads measured slower on the loaded machine: 5.8 s against 4.3 s for 8x60
      tokens). The step runs on 1 or all cores, chosen by measuring: steps use the faster
      setting and the other is re-tried now and then, ever more rarely while it keeps losing, and
      only if a ~1 ms probe does not show the cores busy. Decoding operators give identical
      results for any thread count, so this choice never changes an answer.
    """

    BUCKETS = (1, 4)  # decoding batch sizes measured separately: 1, 2-4, 5+
    FIRST_TRY_S = 0.5  # decoding time before the other setting is first tried
    MAX_GAP_S = 60.0  # longest wait between two tries of a losing setting

    def __init__(self, max_threads: int) -> None:
        import torch

        self.torch = torch
        self.max_threads = max(1, max_threads)
        self._pool: Any = None
        self._pool_lock = threading.Lock()
        self._local = threading.local()
        self._ema: dict[tuple[int, int], float] = {}
        self._next_try: dict[int, float] = {}
        self._gap: dict[int, float] = {}

    def set(self, n: int) -> None:
        """Set this thread's torch thread count (cheap when unchanged)."""
        if getattr(self._local, "n", None) != n:
            self.torch.set_num_threads(n)
            self._local.n = n

    # --- prefill ---------------------------------------------------------------------------------
    def prefill_all(self, prefill: Any, rows: list[int]) -> list[int]:
        """``prefill(row)`` for every row, one torch thread each, up to ``max_threads`` at once."""
        if self.max_threads == 1 or len(rows) == 1:
            self.set(1)
            return [prefill(i) for i in rows]

        def run(i: int) -> int:
            self.set(1)
            return prefill(i)

        return list(self._get_pool().map(run, rows))

    def _get_pool(self) -> Any:
        with self._pool_lock:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(self.max_threads, thread_name_prefix="tutorbot-prefill")
            return self._pool

    # --- decoding --------------------------------------------------------------------------------
    def decoding(self, batch: int, probe: Any) -> _TimedStep:
        """Context for one decoding step of ``batch`` rows; ``probe()`` runs a tiny sample of it."""
        return _TimedStep(self, sum(batch > b for b in self.BUCKETS), probe)

    def _best(self, bucket: int) -> int:
        one, many = self._ema.get((bucket, 1)), self._ema.get((bucket, self.max_threads))
        if many is None or (one is not None and one <= many):
            return 1
        return self.max_threads

    def _choose(self, bucket: int, now: float, probe: Any) -> int:
        if self.max_threads == 1:
            return 1
        next_try = self._next_try.setdefault(bucket, now + self.FIRST_TRY_S)
        best = self._best(bucket)
        if now < next_try:
            return best
        other = self.max_threads if best == 1 else 1
        if other == self.max_threads and not self._probe_says_more_is_faster(probe):
            # Busy cores: a whole step on several threads could take 50x longer; skip this try.
            self._postpone(bucket, now, lost=True)
            return best
        return other

    def _probe_says_more_is_faster(self, probe: Any) -> bool:
        """Time a few small products (a ms or so) on 1 and on max threads; True if max is faster."""
        times = {}
        for n in (1, self.max_threads, 1, self.max_threads):
            self.set(n)
            t = time.perf_counter()
            probe()
            times[n] = min(times.get(n, float("inf")), time.perf_counter() - t)
        return times[self.max_threads] < times[1]

    def _postpone(self, bucket: int, now: float, *, lost: bool) -> None:
        gap = min(self._gap.get(bucket, 1.0) * 2, self.MAX_GAP_S) if lost else 1.0
        self._gap[bucket] = gap
        self._next_try[bucket] = now + gap

    def _record(self, bucket: int, n: int, seconds: float, now: float) -> None:
        if self.max_threads == 1:
            return
        best_before = self._best(bucket)
        key = (bucket, n)
        old = self._ema.get(key)
        self._ema[key] = seconds if old is None else 0.7 * old + 0.3 * seconds
        one = self._ema.get((bucket, 1))
        if n > 1 and one is not None and seconds > 3 * one:
            self._ema[key] = seconds  # the cores just got busy: stop using them at once
        if n != best_before:  # that was a try of the other setting
            self._postpone(bucket, now, lost=self._best(bucket) == best_before)

    def describe(self) -> dict[str, float]:
        """Measured decoding step times (ms) per batch bucket and thread count."""
        return {
            f"batch{('1', '2-4', '5+')[b]}_threads{n}_ms": round(v * 1000, 2)
            for (b, n), v in sorted(self._ema.items())
        }


class _TimedStep:
    """Times one decoding step on the thread count the chooser picks."""

    def __init__(self, threads: _Threads, bucket: int, probe: Any) -> None:
        self.threads, self.bucket, self.probe = threads, bucket, probe

    def __enter__(self) -> None:
        self.started = time.perf_counter()
        self.n = self.threads._choose(self.bucket, self.started, self.probe)
        self.started = time.perf_counter()
        self.threads.set(self.n)

    def __exit__(self, *exc: object) -> None:
        now = time.perf_counter()
        self.threads._record(self.bucket, self.n, now - self.started, now)


@dataclass
class _Layer:
    norm1: Any
    qkv: _Linear
    o: _Linear
    norm2: Any
    mlp: _MLP
    down: _Linear


class _MLP:
    """silu(x @ Wg.T) * (x @ Wu.T).

    With oneDNN (bf16), the silu and the multiplication are fused into the two matrix products
    (no separate passes over the [tokens, intermediate] activations). Quantized models decode
    with one fused gate+up product in 4/8 bits and prefill with the bf16 pair. fp16 and fp32
    weights use one fused gate+up product for both.
    """

    def __init__(self, gate: Any, up: Any, cdt: Any, quantize: str) -> None:
        import torch
        import torch.nn.functional as F

        self.torch, self.F = torch, F
        self.inter = gate.shape[0]
        fused = _Linear(torch.cat([gate.detach(), up.detach()], 0), cdt, quantize, keep_dense=True)
        self.pair = None
        if cdt == torch.bfloat16:
            w = fused.dense_weight()  # the (de-quantized) weights, so prefill and decode agree
            gate_l, up_l = _Linear(w[: self.inter], cdt, "none"), _Linear(w[self.inter :], cdt, "none")
            if gate_l.packed is not None and up_l.packed is not None:
                self.pair = (gate_l, up_l)
        # decoding uses the pair too when nothing is quantized
        self.gate_up = fused if (quantize != "none" or self.pair is None) else None
        fused.release_dense()
        if self.gate_up is not None and self.gate_up.kind in ("int4", "int8") and self.pair is not None:
            self.gate_up.release_packed()

    def __call__(self, x: Any, *, prefill: bool) -> Any:
        if self.pair is not None and (prefill or self.gate_up is None):
            gate, up = self.pair
            ops = self.torch.ops.mkldnn
            x = x.to(gate.dtype)
            g = ops._linear_pointwise(x, gate.packed, None, "swish", [], "")
            return ops._linear_pointwise.binary(x, g, up.packed, None, "mul")
        assert self.gate_up is not None
        g, u = self.gate_up(x, prefill=prefill).split([self.inter, self.inter], -1)
        return self.F.silu(g) * u


class _Linear:
    """y = x @ W.T with W stored for fast CPU inference.

    ``quantize="none"``: bf16 weights pre-packed for oneDNN (plain ``F.linear`` when that is
    unavailable, or for fp32). ``"fp16"``: fp16 weights pre-packed for fbgemm, fp32 activations
    (``quantized.linear_dynamic_fp16``: despite the name nothing is quantized but the weights'
    rounding to fp16), used for prefill and decoding alike. ``"int8"``: symmetric per-output-
    channel int8 for decoding (``_weight_int8pack_mm``). ``"int4"``: asymmetric 4-bit in groups of
    32 along the input (``_weight_int4pack_mm_for_cpu``): the packaged model was shipped as Q4_1,
    the same 4-bit/group-32 scheme, so its weights are represented almost exactly. Quantized
    layers prefill with a dense copy of the same de-quantized weights (large products need AMX).

    Rows and batches: an answer must not depend on the batch it was decoded in, but matrix
    libraries switch kernels with the number of rows (MKL's fp32 product computes 1-3 rows
    differently from 4 or more; fbgemm's fp16 product 1 or 2 rows, and row blocks of 1-2 left
    over, differently from blocks of 3-6), and the bits of a row change with the kernel. Each
    layer measures at load which row counts give every row the bits it gets among 16 rows
    (``_safe_rows``), and decoding pads a batch to the next such count.
    """

    GROUP = 32
    PROBE_ROWS = 16
    _SAFE_SEEN: dict[tuple, tuple[int, ...]] = {}  # (kind, out, in, dtype, packed) -> safe row counts

    def __init__(self, weight: Any, cdt: Any, quantize: str, *, keep_dense: bool = False) -> None:
        import torch
        import torch.nn.functional as F

        self.F, self.torch = F, torch
        self.dtype = cdt
        self.kind = "dense"
        w = weight.detach().float()
        n, k = w.shape
        self.n_out, self.n_in = n, k
        if quantize == "int4" and (k % (2 * self.GROUP) or n % 8):
            quantize = "int8"  # a shape the int4 kernel does not take
        self.packed = None
        self.p16 = None
        if quantize == "fp16":
            self.p16 = torch.ops.quantized.linear_prepack_fp16(w.contiguous(), None)
            self.kind = "fp16"
            self.w: Any = w.half().float().contiguous() if keep_dense else None
            self.safe = self._safe_rows()
            return
        if quantize == "int4":
            groups = w.view(n, k // self.GROUP, self.GROUP)
            lo, hi = groups.amin(-1), groups.amax(-1)
            step = ((hi - lo) / 15).clamp(min=1e-10)
            q = torch.round((groups - lo[..., None]) / step[..., None]).clamp(0, 15).to(torch.int32)
            params = torch.stack([step.t(), (lo + 8 * step).t()], -1).to(torch.bfloat16).contiguous()
            self.group_params = params  # [k / 32, n, (scale, zero)]: w = (q - 8) * scale + zero
            self.q = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.view(n, k).contiguous(), 2)
            p = params.float()
            w = ((q.float() - 8) * p[..., 0].t()[..., None] + p[..., 1].t()[..., None]).view(n, k)
            self.kind = "int4"
        elif quantize == "int8":
            scale = w.abs().amax(1).clamp(min=1e-8) / 127.0
            self.q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
            self.scale = scale.to(torch.bfloat16)
            w = self.q.float() * scale[:, None]
            self.kind = "int8"
        self.w = w.to(cdt).contiguous()
        if cdt == torch.bfloat16 and torch.backends.mkldnn.is_available():
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(self.w, 8)
                probe = torch.randn(2, k, dtype=cdt)
                if torch.equal(self._packed_mm(probe, packed), F.linear(probe, self.w)):
                    self.packed = packed
            except (RuntimeError, AttributeError):  # no oneDNN bf16 support: plain linear
                self.packed = None
        if self.packed is not None and not keep_dense:
            self.w = None  # the packed copy serves every call
        self.safe = self._safe_rows()

    def dense_weight(self) -> Any:
        return self.w

    def release_dense(self) -> None:
        if self.packed is not None or self.kind == "fp16":
            self.w = None

    def release_packed(self) -> None:
        """Quantized decode only: another object does the prefill products."""
        if self.kind in ("int4", "int8"):
            self.packed = None
            self.w = None

    # --- batches that do not change a row's bits -----------------------------------------------
    def _safe_rows(self) -> tuple[int, ...]:
        """Row counts (1..PROBE_ROWS) at which the decoding product gives each row exactly the bits
        it gets in a product of PROBE_ROWS rows, wherever the row sits. Measured once per shape."""
        key = (self.kind, self.n_out, self.n_in, str(self.dtype), self.packed is not None)
        if key not in _Linear._SAFE_SEEN:
            torch = self.torch
            gen = torch.Generator().manual_seed(0)
            xs = torch.randn(self.PROBE_ROWS, self.n_in, generator=gen).to(self.dtype)
            with torch.inference_mode():
                ref = self._decode_mm(xs)
                safe = []
                for m in range(1, self.PROBE_ROWS + 1):
                    ok = True
                    for offset in (0, m // 2 + 1, self.PROBE_ROWS - 1):
                        rows = [(offset + j) % self.PROBE_ROWS for j in range(m)]
                        out = self._decode_mm(xs[rows])
                        ok = ok and all(torch.equal(out[j], ref[r]) for j, r in enumerate(rows))
                    if ok:
                        safe.append(m)
            _Linear._SAFE_SEEN[key] = tuple(safe) or tuple(range(1, self.PROBE_ROWS + 1))
        return _Linear._SAFE_SEEN[key]

    def _decode_rows(self, x: Any) -> Any:
        """The decoding product with the batch padded (or split) to row counts that keep bits."""
        rows = x.shape[0]
        if rows in self.safe:
            return self._decode_mm(x)
        if rows < self.safe[-1]:
            pad = next(m for m in self.safe if m > rows)
            return self._decode_mm(self.torch.cat([x, x.new_zeros(pad - rows, x.shape[1])]))[:rows]
        step = self.safe[-1]  # a large batch: in pieces of the largest safe size
        return self.torch.cat([self._decode_rows(x[i : i + step]) for i in range(0, rows, step)])

    # --- products ------------------------------------------------------------------------------
    def _packed_mm(self, x: Any, packed: Any) -> Any:
        return self.torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")

    def _decode_mm(self, x: Any) -> Any:
        torch = self.torch
        if self.kind in ("int4", "int8"):
            if x.dtype != torch.bfloat16:
                x = x.to(torch.bfloat16)
            if self.kind == "int4":
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.q, self.GROUP, self.group_params)
            else:
                y = torch.ops.aten._weight_int8pack_mm(x, self.q, self.scale)
            return y if y.dtype == self.dtype else y.to(self.dtype)
        return self._dense(x)

    def _dense(self, x: Any) -> Any:
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        if self.kind == "fp16":
            return self.torch.ops.quantized.linear_dynamic_fp16(x, self.p16)
        if self.packed is not None:
            return self._packed_mm(x, self.packed)
        if self.w is None:
            raise RuntimeError("this layer keeps decode weights only")
        return self.F.linear(x, self.w)

    def __call__(self, x: Any, *, prefill: bool) -> Any:
        """``prefill``: one prompt's tokens (its own call: no padding needed); else decoding rows."""
        if prefill:
            return self._dense(x)
        return self._decode_rows(x)


class _HFEngine:
    """transformers ``generate`` with left padding (architectures the fast engine does not cover)."""

    def __init__(self, model: Any, tokenizer: Any, *, dtype: str, quantize: str, threads: int) -> None:
        import torch

        self.torch = torch
        self.threads = threads
        if dtype == "bfloat16" and quantize == "none":
            model = model.to(torch.bfloat16)
        if quantize != "none":
            # Dynamic int8 everywhere except mlp.down_proj, whose activations have outliers that
            # per-tensor int8 destroys. Note: dynamic quantization scales activations per batch,
            # so a batched answer can differ from the same question asked alone.
            from torch.ao.quantization import quantize_dynamic

            names = {
                n
                for n, mod in model.named_modules()
                if isinstance(mod, torch.nn.Linear) and not n.endswith("down_proj") and n != "lm_head"
            }
            model = quantize_dynamic(model, names, dtype=torch.qint8)
        self.model = model
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def decode(
        self, prompts: list[list[int]], limits: list[int], stop_ids: frozenset[int], check
    ) -> list[list[int]]:
        torch = self.torch
        self.last_timing: dict[str, float] | None = None
        outputs: list[list[int]] = [[] for _ in prompts]
        active = [i for i in range(len(prompts)) if limits[i] > 0]
        if not active:
            return outputs
        width = max(len(prompts[i]) for i in active)
        ids = torch.full((len(active), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(active), width), dtype=torch.long)
        for r, i in enumerate(active):
            p = prompts[i]
            ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        torch.set_num_threads(self.threads)  # this thread only
        first = FirstTokenClock()
        started = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                streamer=first if len(active) == 1 else None,
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max(limits[i] for i in active),
                do_sample=False,
                eos_token_id=sorted(stop_ids),
                pad_token_id=self.pad_id,
            )
        done = time.perf_counter()
        prefill = (first.at or done) - started
        self.last_timing = {
            "prefill_s": prefill,
            "decode_s": done - started - prefill,
            "steps": out.shape[1] - width - 1,
            "batch": len(active),
        }
        for r, i in enumerate(active):
            gen: list[int] = []
            for t in out[r, width:].tolist():
                gen.append(int(t))
                if t in stop_ids or len(gen) >= limits[i] or check(i, gen):
                    break
            outputs[i] = gen
        return outputs


class FirstTokenClock:
    """A transformers streamer that only notes when the first generated token arrives."""

    def __init__(self) -> None:
        self.calls = 0
        self.at: float | None = None

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt
            self.at = time.perf_counter()

    def end(self) -> None:
        pass
