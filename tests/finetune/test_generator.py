"""finetune.generator: HFGenerator on the real base model, plus the answer clean-up rules."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest

from finetune.generator import HFGenerator, _manifest_quantize, _Stop, clean_answer, read_model_name
from knowledge.batching import BatchingGenerator
from knowledge.generation import GenerationError, GenerationRequest, Generator, Passage

FINE_TUNING = Passage(
    title="Overview",
    section="Fine-tuning",
    text=(
        "Fine-tuning takes a pre-trained model and trains it a little further on a small dataset "
        "for one specific task, such as classifying movie reviews as positive or negative. Because "
        "the model already learned general knowledge during pre-training, fine-tuning needs far "
        "less data and compute than training from scratch."
    ),
)
LORA = Passage(
    title="Deep dive",
    section="LoRA",
    text=(
        "LoRA (low-rank adaptation) freezes the original weights and trains two small matrices "
        "whose product is added to a weight matrix. Only a tiny fraction of the parameters is "
        "trained, so it is cheap, and the adapter can be merged into the weights afterwards."
    ),
)
OVERFITTING = Passage(
    title="Deep dive",
    section="Overfitting",
    text=(
        "A model overfits when the training loss keeps falling while the validation loss rises. "
        "Early stopping, fewer epochs and a lower learning rate help."
    ),
)


def words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) > 3}


# --- answer clean-up (no model) ------------------------------------------------------------------


def test_clean_answer_cuts_an_echo_of_the_prompt():
    text = "Fine-tuning adapts a model. Course passages:\n\n[1] Overview > Fine-tuning"
    assert clean_answer(text, 4, truncated=False) == "Fine-tuning adapts a model."
    assert clean_answer("It is cheap.<|im_start|>user\nQuestion: x", 4, truncated=False) == "It is cheap."


def test_clean_answer_stops_at_a_repeated_sentence_and_at_max_sentences():
    looping = "LoRA is cheap. It trains few weights. LoRA is cheap. It trains few weights."
    assert clean_answer(looping, 4, truncated=False) == "LoRA is cheap. It trains few weights."
    many = "One. Two. Three. Four. Five. Six."
    assert clean_answer(many, 4, truncated=False) == "One. Two. Three. Four."


def test_clean_answer_drops_an_unfinished_sentence_only_when_cut_by_the_token_limit():
    assert clean_answer("It is cheap. It also trains", 4, truncated=True) == "It is cheap."
    assert clean_answer("It is cheap. It also trains", 4, truncated=False) == "It is cheap. It also trains"
    assert clean_answer("It also trains", 4, truncated=True) == "It also trains"  # nothing better
    assert clean_answer("  \n ", 4, truncated=False) == ""


def test_clean_answer_drops_openers_headings_and_phrase_loops():
    assert clean_answer("The answer is: ### Adapters\nAdapters are small modules.", 4, False) == (
        "Adapters\nAdapters are small modules."
    )
    assert clean_answer("The answer to the question is: It is cheap.", 4, False) == "It is cheap."
    loop = "Freezing is a way to change the layers and a way to change the layers and a way to"
    assert clean_answer(loop, 4, truncated=False) == "Freezing is a way to change the layers and"
    loop2 = "It is cheap. Freezing is a way to change the layers and a way to change the layers and"
    assert clean_answer(loop2, 4, truncated=False) == "It is cheap."


def test_list_numbers_and_decimals_are_not_sentence_ends():
    assert clean_answer("1. **Overfitting shows in the loss**. 2.", 4, truncated=True) == (
        "1. **Overfitting shows in the loss**."
    )
    assert (
        clean_answer("Use 2e-5 or 0.0001. It works. More", 4, truncated=True)
        == "Use 2e-5 or 0.0001. It works."
    )


def test_stop_rule():
    stop = _Stop(max_sentences=2)
    assert not stop.check("One sentence. And a sec")
    assert stop.check("One sentence. Two sentences. ")
    assert stop.check("Answer. Question: what")
    assert _Stop(4).check("Same thing. Same thing. ")
    assert _Stop(4).check("a way to change the layers and a way to change the layers")
    assert not _Stop(2).check("1. First point 2. Second point")  # list numbers are not sentences


def test_name_comes_from_the_manifest(tmp_path):
    (tmp_path / "tutorbot_model.json").write_text(json.dumps({"name": "v3", "base_model": "x"}))
    assert read_model_name(tmp_path) == "v3"
    (tmp_path / "tutorbot_model.json").write_text(json.dumps({"kind": "base", "base_model": "Smol"}))
    assert read_model_name(tmp_path) == "base:Smol"
    (tmp_path / "tutorbot_model.json").unlink()
    assert read_model_name(tmp_path) == tmp_path.name


def test_a_manifest_can_ask_for_a_quantization(tmp_path):
    assert _manifest_quantize(tmp_path) is None
    (tmp_path / "tutorbot_model.json").write_text(json.dumps({"name": "v3", "quantize": "none"}))
    assert _manifest_quantize(tmp_path) == "none"
    (tmp_path / "tutorbot_model.json").write_text(json.dumps({"quantize": "int3"}))
    assert _manifest_quantize(tmp_path) is None


# --- load failures: one clear GenerationError -----------------------------------------------------


def test_a_folder_that_is_not_a_model_raises_generation_error(tmp_path):
    with pytest.raises(GenerationError, match="not a folder"):
        HFGenerator(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(GenerationError, match="not a model folder") as err:
        HFGenerator(tmp_path)
    assert str(tmp_path) in str(err.value)


@pytest.mark.slow
def test_corrupt_weights_raise_one_clear_generation_error(tmp_path, base_model_dir):
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((base_model_dir / name).read_bytes())
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(GenerationError) as err:
        HFGenerator(tmp_path)
    message = str(err.value)
    assert message.startswith("Cannot load the answer model from")
    assert "\n" not in message


def test_rejects_unknown_options(tmp_path):
    with pytest.raises(ValueError, match="quantize"):
        HFGenerator(tmp_path, quantize="int2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="engine"):
        HFGenerator(tmp_path, engine="onnx")  # type: ignore[arg-type]


# --- the real model --------------------------------------------------------------------------------


@pytest.mark.slow
def test_is_a_generator_named_from_its_manifest(generator):
    assert isinstance(generator, Generator)
    assert generator.name == "base:SmolLM2-135M-Instruct"
    assert generator.engine == "fast"


@pytest.mark.slow
def test_answers_a_grounded_question_from_the_passage(generator):
    answer = generator.generate([GenerationRequest("What is fine-tuning?", (FINE_TUNING,), 48)])[0]
    assert answer
    shared = words(answer) & words(FINE_TUNING.text)
    assert len(shared) >= 3, (answer, shared)
    assert "Course passages" not in answer and "<|im" not in answer
    assert len(re.findall(r"[.!?](\s|$)", answer)) <= generator.max_sentences


@pytest.mark.slow
def test_batch_output_equals_single_outputs(generator):
    requests = [
        GenerationRequest("What is fine-tuning?", (FINE_TUNING,), 16),
        GenerationRequest("Why is LoRA cheap?", (LORA, FINE_TUNING), 16),
        GenerationRequest("How do I notice overfitting?", (OVERFITTING,), 16),
        GenerationRequest("What does LoRA train?", (LORA,), 16),
    ]
    batch = generator.generate_tokens(requests)
    singles = [generator.generate_tokens([r])[0] for r in requests]
    assert batch == singles
    assert generator.generate(requests) == [generator.generate([r])[0] for r in requests]


@pytest.mark.slow
def test_respects_max_new_tokens(generator):
    short = GenerationRequest("What is LoRA?", (LORA,), 5)
    forced = generator.generate_tokens([short], ignore_stops=True)[0]
    assert len(forced) == 5
    assert len(generator.generate_tokens([short])[0]) <= 5
    answer = generator.generate([short])[0]
    assert 0 < len(generator._tokenizer(answer)["input_ids"]) <= 6
    assert generator.generate([GenerationRequest("What is LoRA?", (LORA,), 0)]) == [""]
    assert generator.generate([]) == []


@pytest.mark.slow
def test_safe_to_call_from_threads_and_through_the_batcher(generator):
    requests = [
        GenerationRequest("What is fine-tuning?", (FINE_TUNING,), 16),
        GenerationRequest("What is LoRA?", (LORA,), 16),
        GenerationRequest("What is overfitting?", (OVERFITTING,), 16),
    ]
    expected = [generator.generate([r])[0] for r in requests]
    got: dict[int, str] = {}

    def ask(i: int) -> None:
        got[i] = generator.generate([requests[i]])[0]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(3)] == expected

    with BatchingGenerator(generator, max_batch=8, max_wait_s=0.05) as batcher:
        results: dict[int, str] = {}
        barrier = threading.Barrier(3)

        def ask_batched(i: int) -> None:
            barrier.wait()
            results[i] = batcher.generate([requests[i]], timeout=120)[0]

        threads = [threading.Thread(target=ask_batched, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [results[i] for i in range(3)] == expected
        assert batcher.stats.batches < 3  # they shared a batch


@pytest.mark.slow
def test_fast_engine_computes_what_transformers_computes(base_model_dir: Path):
    """In fp32 our decoder must reproduce transformers' greedy tokens exactly."""
    import torch
    from transformers import AutoModelForCausalLM

    fast = HFGenerator(base_model_dir, dtype="float32", quantize="none", passage_cache=False)
    request = GenerationRequest("Why is LoRA cheap?", (LORA, FINE_TUNING), 16)
    ours = fast.generate_tokens([request], ignore_stops=True)[0]
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([fast.prompt_ids(request)])
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert ours == out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("kind", ["none", "fp16", "int8", "int4"])
def test_a_decoded_row_gets_the_same_bits_in_any_batch(kind):
    """Matrix libraries compute 1-3 rows with other kernels than larger batches; decoding pads the
    batch so that a row's result (and so an answer) never depends on the rows beside it."""
    import torch

    from finetune.generator import _Linear, fp16_weights_available

    if kind == "fp16" and not fp16_weights_available():
        pytest.skip("no fbgemm in this torch build")
    gen = torch.Generator().manual_seed(1)
    layer = _Linear(torch.randn(192, 128, generator=gen) * 0.05, torch.float32, kind)
    xs = torch.randn(12, 128, generator=gen)
    with torch.inference_mode():
        alone = [layer(xs[i : i + 1], prefill=False)[0] for i in range(12)]
        for batch in range(2, 13):
            out = layer(xs[:batch], prefill=False)
            assert all(torch.equal(out[i], alone[i]) for i in range(batch)), batch
        assert torch.allclose(layer(xs, prefill=True), torch.stack(alone), atol=2e-2)


@pytest.mark.slow
def test_fp16_weights_agree_with_fp32(base_model_dir):
    from finetune.generator import fp16_weights_available

    if not fp16_weights_available():
        pytest.skip("no fbgemm in this torch build")
    request = GenerationRequest("Why is LoRA cheap?", (LORA, FINE_TUNING), 12)
    fp32 = HFGenerator(base_model_dir, dtype="float32", passage_cache=False)
    fp16 = HFGenerator(base_model_dir, dtype="float16", passage_cache=False)
    assert fp16.dtype == "float16" and fp16._engine.layers[0].qkv.kind == "fp16"
    assert fp16.generate_tokens([request], ignore_stops=True) == fp32.generate_tokens(
        [request], ignore_stops=True
    )


# --- the thread chooser (no model: synthetic step times, a sleeping probe) -----------------------


def test_thread_chooser_keeps_one_core_while_the_cores_are_busy_and_uses_both_when_faster():
    import time

    import torch

    from finetune.generator import _Threads

    def probe_busy() -> None:  # two threads slower than one: another process holds a core
        time.sleep(0.004 if torch.get_num_threads() > 1 else 0.001)

    def probe_idle() -> None:
        time.sleep(0.001 if torch.get_num_threads() > 1 else 0.004)

    before = torch.get_num_threads()
    try:
        t = _Threads(2)
        assert t._choose(0, 0.0, probe_busy) == 1  # nothing measured yet: one core
        t._record(0, 1, 0.020, 0.02)
        assert t._choose(0, 0.1, probe_busy) == 1  # too early to try the other setting
        assert t._choose(0, 1.0, probe_busy) == 1  # due, but the probe shows busy cores: skipped
        first_gap = t._gap[0]
        assert t._choose(0, t._next_try[0], probe_busy) == 1
        assert t._gap[0] > first_gap  # and waits longer each time

        now = t._next_try[0]
        assert t._choose(0, now, probe_idle) == 2  # idle cores: a real step on both
        t._record(0, 2, 0.010, now + 0.01)
        assert t._choose(0, now + 0.1, probe_idle) == 2  # faster: kept
        t._record(0, 2, 0.500, now + 0.6)  # the cores just got busy
        assert t._choose(0, now + 0.7, probe_busy) == 1  # back to one core at once
        assert _Threads(1)._choose(0, 100.0, probe_idle) == 1
    finally:
        torch.set_num_threads(before)
