"""The answer model the Tutor calls: a causal-LM folder loaded for fast greedy decoding on CPU.

``HFGenerator(folder)`` loads any model folder written by ``finetune.base_model`` or by the
fine-tuning code (safetensors + tokenizer + optional ``tutorbot_model.json`` manifest) and
implements ``knowledge.generation.Generator``.

Why not just ``model.generate``? For a 135M model on two CPU cores, ``generate`` spends much of
each step in Python bookkeeping and reads 540 MB of fp32 weights per token. For Llama-architecture
models (SmolLM2 is one) we run a lean engine of our own (numbers in ``docs/BENCHMARKS.md``, from
``benchmarks/bench_generation.py``):

* decoding reads 4-bit weights (groups of 32, the scheme the packaged Q4_1 model shipped in, so
  nearly lossless for it); the output layer stays bf16. Prefill multiplies bf16 copies of the
  same weights, pre-packed once for oneDNN (AMX / AVX512-BF16), with silu*mul fused in;
* q/k/v and gate/up projections fused into one matrix each; RoPE as one complex multiplication;
* the residual stream, norms, RoPE and softmax in fp32;
* a static KV cache; each prompt is prefilled on its own (no padding waste), then all questions
  of a batch decode together, attention per question on its own slice of the cache. Every
  operation treats rows independently, so a question gets the same answer alone or in a batch;
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

from knowledge.generation import GenerationError, GenerationRequest, build_messages

logger = logging.getLogger(__name__)

MANIFEST_NAME = "tutorbot_model.json"
Engine = Literal["auto", "fast", "hf"]
DType = Literal["auto", "bfloat16", "float32"]
Quantize = Literal["none", "int8", "int4"]

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
        dtype: ``"auto"`` picks bf16 on CPUs with native bf16 (AVX512-BF16/AMX), else fp32.
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
        name: str | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.max_sentences = max_sentences
        self.max_prompt_tokens = max_prompt_tokens
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
            dtype = "bfloat16" if cpu_has_fast_bf16() else "float32"
        if dtype not in ("bfloat16", "float32"):
            raise ValueError(f"dtype must be 'auto', 'bfloat16' or 'float32', not {dtype!r}")
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
                    model, dtype=dtype, quantize=quantize, threads=self.threads
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
    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """Token ids of the chat prompt for one request (the same prompt fine-tuning uses)."""
        messages = build_messages(request.question, request.passages)
        text = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = list(self._tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) > self.max_prompt_tokens:
            head = 64  # the system rule
            ids = ids[:head] + ids[-(self.max_prompt_tokens - head) :]
        return ids

    def generate(self, requests: Sequence[GenerationRequest]) -> list[str]:
        """Greedy answers, same order as ``requests``. Raises GenerationError on failure."""
        if not requests:
            return []
        try:
            prompts = [self.prompt_ids(r) for r in requests]
            limits = [max(0, int(r.max_new_tokens)) for r in requests]
            stops = [_Stop(self.max_sentences) for _ in requests]
            with self._lock:
                outputs = self._decode(prompts, limits, self._stop_ids, self._make_checker(stops))
        except GenerationError:
            raise
        except Exception as exc:
            logger.exception("answer generation failed")
            raise GenerationError(f"The answer model failed: {type(exc).__name__}: {exc}") from exc
        answers = []
        for ids, limit in zip(outputs, limits, strict=True):
            stopped_by_token = bool(ids) and ids[-1] in self._stop_ids
            text = self._tokenizer.decode(
                [i for i in ids if i not in self._stop_ids], skip_special_tokens=True
            )
            truncated = not stopped_by_token and len(ids) >= limit
            answers.append(clean_answer(text, self.max_sentences, truncated))
        return answers

    def generate_tokens(
        self, requests: Sequence[GenerationRequest], *, ignore_stops: bool = False
    ) -> list[list[int]]:
        """Raw generated token ids (no clean-up). ``ignore_stops``: always produce ``max_new_tokens``
        tokens (for measuring speed)."""
        prompts = [self.prompt_ids(r) for r in requests]
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
            return self._decode(prompts, limits, stop_ids, check)

    def _decode(
        self, prompts: list[list[int]], limits: list[int], stop_ids: frozenset[int], check
    ) -> list[list[int]]:
        """The engine call (lock held); notes its timing in ``last_timing``."""
        self.last_timing = None
        out = self._engine.decode(prompts, limits, stop_ids, check)
        self.last_timing = getattr(self._engine, "last_timing", None)
        return out

    def _make_checker(self, stops: list[_Stop]):
        decode = self._tokenizer.decode

        def check(row: int, ids: list[int]) -> bool:
            return stops[row].check(decode(ids, skip_special_tokens=False))

        return check


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

    def __init__(self, model: Any, *, dtype: str, quantize: str, threads: int) -> None:
        import torch
        import torch.nn.functional as F

        self.torch, self.F = torch, F
        self.threads = _Threads(threads)
        c = model.config
        self.H = c.num_attention_heads
        self.KV = c.num_key_value_heads
        self.D = getattr(c, "head_dim", None) or c.hidden_size // self.H
        self.I = c.intermediate_size
        self.hidden = c.hidden_size
        self.eps = float(c.rms_norm_eps)
        self.cdt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
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
            self.head = _Linear(model.lm_head.weight, self.cdt, "none")

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

    def _step(
        self, tokens: Any, slots: list[int], lens: list[int], cache_k: list[Any], cache_v: list[Any]
    ) -> Any:
        """One decoding step for the running rows: tokens[b] sits at position lens[b] of cache slot slots[b]."""
        torch, F = self.torch, self.F
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
            outs = [
                F.scaled_dot_product_attention(
                    q[b].view(1, H, 1, D),
                    ck[slots[b] : slots[b] + 1, :, : lens[b] + 1],
                    cv[slots[b] : slots[b] + 1, :, : lens[b] + 1],
                    enable_gqa=True,
                )
                for b in range(B)
            ]
            att = outs[0] if single else torch.cat(outs, 0)
            x = x + layer.o(att.reshape(B, H * D), prefill=False)
            x = x + layer.down(layer.mlp(self._rms(x, layer.norm2), prefill=False), prefill=False)
        return self.head(self._rms(x, self.norm), prefill=False).float().argmax(-1)

    def _probe(self, batch: int) -> None:
        """The matrix products of one layer for ``batch`` rows: a cheap sample of a decoding step."""
        layer = self.layers[0]
        x = self.torch.zeros(batch, self.hidden, dtype=self.cdt)
        layer.qkv(x, prefill=False)
        layer.down(layer.mlp(x, prefill=False), prefill=False)

    def decode(
        self, prompts: list[list[int]], limits: list[int], stop_ids: frozenset[int], check
    ) -> list[list[int]]:
        torch = self.torch
        self.last_timing: dict[str, float] | None = None
        n = len(prompts)
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
                    return self._prefill(prompts[i], cache_k, cache_v, slot[i])

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
    with one fused gate+up product in 4/8 bits and prefill with the bf16 pair.
    """

    def __init__(self, gate: Any, up: Any, cdt: Any, quantize: str) -> None:
        import torch
        import torch.nn.functional as F

        self.torch, self.F = torch, F
        self.inter = gate.shape[0]
        fused = _Linear(torch.cat([gate.detach(), up.detach()], 0), cdt, quantize, keep_dense=True)
        w = fused.dense_weight()  # the (de-quantized) weights, so prefill and decode agree
        gate_l, up_l = _Linear(w[: self.inter], cdt, "none"), _Linear(w[self.inter :], cdt, "none")
        self.pair = (gate_l, up_l) if gate_l.packed is not None and up_l.packed is not None else None
        # decoding uses the pair too when nothing is quantized
        self.gate_up = fused if (quantize != "none" or self.pair is None) else None
        fused.release_dense()
        if self.gate_up is not None and self.gate_up.kind != "dense" and self.pair is not None:
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
    unavailable, or for fp32). ``"int8"``: symmetric per-output-channel int8 for decoding
    (``_weight_int8pack_mm``). ``"int4"``: asymmetric 4-bit in groups of 32 along the input
    (``_weight_int4pack_mm_for_cpu``): the packaged model was shipped as Q4_1, the same
    4-bit/group-32 scheme, so its weights are represented almost exactly. Quantized layers
    prefill with a bf16 copy of the same de-quantized weights (large products need AMX).
    Every kernel used here computes each row independently of the others in the batch.
    """

    GROUP = 32

    def __init__(self, weight: Any, cdt: Any, quantize: str, *, keep_dense: bool = False) -> None:
        import torch
        import torch.nn.functional as F

        self.F, self.torch = F, torch
        self.dtype = cdt
        self.kind = "dense"
        w = weight.detach().float()
        n, k = w.shape
        if quantize == "int4" and (k % (2 * self.GROUP) or n % 8 or cdt != torch.bfloat16):
            quantize = "int8"  # a shape or dtype the int4 kernel does not take
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
        self.w: Any = w.to(cdt).contiguous()
        self.packed = None
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

    def dense_weight(self) -> Any:
        return self.w

    def release_dense(self) -> None:
        if self.packed is not None:
            self.w = None

    def release_packed(self) -> None:
        """Quantized decode only: another object does the prefill products."""
        if self.kind != "dense":
            self.packed = None
            self.w = None

    def _packed_mm(self, x: Any, packed: Any) -> Any:
        return self.torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")

    def __call__(self, x: Any, *, prefill: bool) -> Any:
        if not prefill and self.kind != "dense":
            if x.dtype != self.torch.bfloat16:
                x = x.to(self.torch.bfloat16)
            if self.kind == "int4":
                return self.torch.ops.aten._weight_int4pack_mm_for_cpu(
                    x, self.q, self.GROUP, self.group_params
                )
            return self.torch.ops.aten._weight_int8pack_mm(x, self.q, self.scale)
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        if self.packed is not None:
            return self._packed_mm(x, self.packed)
        if self.w is None:
            raise RuntimeError("this layer keeps decode weights only")
        return self.F.linear(x, self.w)


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
