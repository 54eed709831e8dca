"""Versioned answer models: ``models/v1, v2, ...``, a ``CURRENT`` pointer, promotion and rollback.

Layout (``models_dir`` is ``Settings.resolved_models_dir``, by default ``data/models``)::

    models/
      base/SmolLM2-135M-Instruct/   the converted base model (finetune.base_model)
      v1/                           a registered model: weights, tokenizer, tutorbot_model.json
      v2/
      CURRENT                       {"version": "v2", "history": ["v1", "v2"], "changed_at": ...}
      .registry.lock

A version's ``tutorbot_model.json`` is its manifest: name/version, base model, data hash, training
config, metrics, code revision, created_at. It is written last, and the folder appears under its
final name by one rename, so a version folder is either complete or absent.

``CURRENT`` is replaced with ``os.replace`` of a fully written temp file: readers see the old or
the new pointer, never a mix, and an interrupted promotion changes nothing. No pointer (or a
pointer to nothing) means the base model is in service. ``history`` lists promotions in order;
``rollback`` pops the last one.

Promotion rules: a version must be complete and valid (manifest, config, readable safetensors
headers, tokenizer) and built on the registry's base model; it is refused when its primary metric
is below the current model's (the score measured against the model in service on the same split
when the candidate's metrics carry it, else the current version's own stored score), unless forced.
A corrupt version is never promoted, forced or not.

The running bot polls ``state_token()`` / ``changed_since(token)`` (one small file read) and calls
its ``reload_model()`` when the current model changed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from finetune.base_model import BASE_MODEL_NAME, MANIFEST_NAME

log = logging.getLogger(__name__)

POINTER = "CURRENT"
VERSION_RE = re.compile(r"^v(\d+)$")
PRIMARY_METRIC = "answer_cosine"  # see finetune.evaluate
ROOT = Path(__file__).resolve().parent.parent


class RegistryError(RuntimeError):
    """A registry operation was refused or failed; nothing changed."""


class PromotionRefused(RegistryError):
    """The candidate scores below the model in service (use force to override)."""


@dataclass(frozen=True)
class ModelVersion:
    version: str
    path: Path
    manifest: dict = field(default_factory=dict, compare=False)
    valid: bool = True
    problem: str = ""
    current: bool = False

    @property
    def number(self) -> int:
        return int(VERSION_RE.match(self.version).group(1))

    @property
    def metrics(self) -> dict:
        m = self.manifest.get("metrics")
        return m if isinstance(m, dict) else {}

    @property
    def primary(self) -> float | None:
        v = self.metrics.get("primary")
        return float(v) if isinstance(v, (int, float)) else None

    @property
    def primary_metric(self) -> str:
        return str(self.metrics.get("primary_metric") or PRIMARY_METRIC)

    def as_dict(self) -> dict:
        return {
            "version": self.version, "path": str(self.path), "current": self.current, "valid": self.valid,
            "problem": self.problem or None, "base_model": self.manifest.get("base_model"),
            "method": self.manifest.get("method"), "data_sha256": self.manifest.get("data_sha256"),
            "created_at": self.manifest.get("created_at"), "code_revision": self.manifest.get("code_revision"),
            "primary_metric": self.primary_metric, "primary": self.primary, "metrics": self.metrics,
        }


def check_model_dir(folder: Path, base_model: str = BASE_MODEL_NAME) -> str:
    """'' when ``folder`` is a complete model built on ``base_model``, else the problem in words."""
    folder = Path(folder)
    if not folder.is_dir():
        return f"{folder} is not a folder"
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no {MANIFEST_NAME} in {folder} (incomplete or not a tutorbot model)"
    except (OSError, ValueError) as exc:
        return f"{folder / MANIFEST_NAME} is unreadable ({exc})"
    if not isinstance(manifest, dict):
        return f"{folder / MANIFEST_NAME} is not a JSON object"
    if manifest.get("base_model") != base_model:
        return (f"{folder} is built on {manifest.get('base_model') or 'an unknown base model'!s}, "
                f"not {base_model}: the tutor's prompt and tokenizer are made for {base_model}")
    if not (folder / "config.json").is_file():
        return f"{folder} has no config.json"
    if not ((folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()):
        return f"{folder} has no tokenizer"
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        return f"{folder} has no *.safetensors weights"
    try:
        from safetensors import safe_open

        for w in weights:
            with safe_open(str(w), framework="pt") as f:
                if not list(f.keys()):
                    return f"{w} holds no tensors"
    except Exception as exc:  # a truncated or foreign file fails in the header
        return f"{w.name} in {folder} is damaged ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return ""


def code_revision(root: Path = ROOT) -> str | None:
    """``git rev-parse HEAD`` of the project (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class Registry:
    def __init__(self, models_dir: Path | str, *, base_model: str = BASE_MODEL_NAME):
        self.root = Path(models_dir)
        self.base_model = base_model

    # --- reading ---------------------------------------------------------------------------
    def _pointer(self) -> dict:
        try:
            data = json.loads((self.root / POINTER).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("model registry pointer %s is unreadable (%s); serving the base model", self.root / POINTER, exc)
            return {}
        return data if isinstance(data, dict) else {}

    def _version(self, name: str, *, current: str | None = None) -> ModelVersion:
        path = self.root / name
        problem = check_model_dir(path, self.base_model)
        manifest: dict = {}
        with contextlib.suppress(OSError, ValueError):
            raw = json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8"))
            manifest = raw if isinstance(raw, dict) else {}
        return ModelVersion(name, path, manifest, not problem, problem, name == current)

    def list(self) -> list[ModelVersion]:
        """Every version folder, oldest first (invalid ones included, flagged)."""
        if not self.root.is_dir():
            return []
        current = self._pointer().get("version")
        names = [p.name for p in self.root.iterdir() if p.is_dir() and VERSION_RE.match(p.name)]
        return [self._version(n, current=current) for n in sorted(names, key=lambda n: int(n[1:]))]

    def get(self, version: str) -> ModelVersion:
        version = _norm_version(version)
        if not (self.root / version).is_dir():
            known = ", ".join(v.version for v in self.list()) or "none"
            raise RegistryError(f"no model version {version} in {self.root} (versions: {known})")
        return self._version(version, current=self._pointer().get("version"))

    def current_version(self) -> str | None:
        """The promoted version's name ('v3'), or None when the base model is in service. Cheap."""
        v = self._pointer().get("version")
        return v if isinstance(v, str) and VERSION_RE.match(v) else None

    def current(self) -> ModelVersion | None:
        v = self.current_version()
        if v is None or not (self.root / v).is_dir():
            return None
        return self._version(v, current=v)

    def current_dir(self) -> Path | None:
        """Folder of the model in service, or None (serve the base model). A broken current
        version is reported and skipped, never loaded."""
        cur = self.current()
        if cur is None:
            if self.current_version():
                log.warning("current model %s is missing from %s; serving the base model", self.current_version(), self.root)
            return None
        if not cur.valid:
            log.warning("current model %s is damaged (%s); serving the base model", cur.version, cur.problem)
            return None
        return cur.path

    def state_token(self) -> str:
        """Changes whenever the current model changes (promote, rollback): version + change time."""
        p = self._pointer()
        return f"{p.get('version') or 'base'}@{p.get('changed_at') or '-'}"

    def changed_since(self, token: str | None) -> bool:
        return token != self.state_token()

    # --- writing ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            yield
            return
        with open(self.root / ".registry.lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _write_pointer(self, version: str | None, history: list[str], action: str) -> None:
        data = {"version": version, "history": history, "action": action,
                "changed_at": datetime.now(UTC).isoformat(timespec="microseconds")}
        tmp = self.root / f".{POINTER}.tmp-{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(json.dumps(data, indent=2) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.root / POINTER)  # the atomic switch
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise RegistryError(f"could not switch the current model ({exc}); the previous one stays in service") from exc

    def register(self, run_dir: Path | str, metrics: dict | None = None, *, extra: dict | None = None) -> str:
        """Copy a trained model (``run_dir/model`` or a model folder) into the next ``vN``; returns 'vN'.

        The run's ``run.json`` (when present) supplies the config and training time. Refused (nothing
        written) when the folder is incomplete or built on another base model.
        """
        run_dir = Path(run_dir)
        model_dir = run_dir / "model" if (run_dir / "model").is_dir() else run_dir
        problem = check_model_dir(model_dir, self.base_model)
        if problem:
            raise RegistryError(f"cannot register {model_dir}: {problem}")
        src_manifest = json.loads((model_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
        run: dict = {}
        with contextlib.suppress(OSError, ValueError):
            run = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
        with self._lock():
            taken = [int(m.group(1)) for p in self.root.iterdir() if (m := VERSION_RE.match(p.name))]
            version = f"v{max(taken, default=0) + 1}"
            tmp = self.root / f".tmp-{version}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                tmp.mkdir()
                for f in sorted(model_dir.iterdir()):
                    if f.is_file() and f.name != MANIFEST_NAME:
                        _link_or_copy(f, tmp / f.name)
                manifest = {
                    **src_manifest,
                    "name": version,
                    "version": version,
                    "kind": "finetuned",
                    "base_model": self.base_model,
                    "data_sha256": src_manifest.get("data_sha256") or run.get("data_sha256"),
                    "config": run.get("config") or src_manifest.get("config") or {},
                    "metrics": metrics or {},
                    "training_seconds": run.get("seconds"),
                    "run_dir": str(run_dir.resolve()),
                    "code_revision": code_revision(),
                    "created_at": src_manifest.get("created_at") or datetime.now(UTC).isoformat(timespec="seconds"),
                    "registered_at": datetime.now(UTC).isoformat(timespec="seconds"),
                    **(extra or {}),
                }
                (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")
                os.rename(tmp, self.root / version)
            except OSError as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                raise RegistryError(f"could not register {model_dir} as {version}: {exc}") from exc
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        log.info("registered %s as %s", model_dir, version)
        return version

    def promotion_check(self, version: str) -> tuple[bool, str]:
        """(allowed, reason) for promoting ``version`` without force; raises for a broken version."""
        cand = self.get(version)
        if not cand.valid:
            raise RegistryError(f"{cand.version} is damaged or incomplete and cannot be promoted: {cand.problem}")
        cur = self.current()
        name = cand.primary_metric
        score = cand.primary
        baseline = cand.metrics.get("baseline") if isinstance(cand.metrics.get("baseline"), dict) else {}
        cur_name = cur.version if cur else f"base:{self.base_model}"
        if cur is not None and cur.version == cand.version:
            return True, f"{cand.version} is already current"
        ref, how = None, ""
        if baseline and baseline.get("model") in (cur_name, cur.manifest.get("name") if cur else None) \
                and isinstance(baseline.get("primary"), (int, float)):
            ref, how = float(baseline["primary"]), "measured on the same held-out split"
        elif cur is not None and cur.primary is not None and cur.primary_metric == name:
            ref, how = cur.primary, f"{cur.version}'s stored score"
        if ref is None:
            return True, f"no comparable score for {cur_name}; promoting on the candidate's own evaluation"
        if score is None:
            return False, f"{cand.version} has no {name} score to compare with {cur_name} ({ref:.4f})"
        if score < ref:
            return False, f"{cand.version} scores {name} {score:.4f}, below {cur_name}'s {ref:.4f} ({how})"
        return True, f"{cand.version} scores {name} {score:.4f} >= {cur_name}'s {ref:.4f} ({how})"

    def promote(self, version: str, *, force: bool = False) -> ModelVersion:
        """Make ``version`` the model in service (atomic pointer switch)."""
        with self._lock():
            allowed, reason = self.promotion_check(version)
            if not allowed and not force:
                raise PromotionRefused(f"promotion refused: {reason}. Use --force to promote anyway.")
            cand = self.get(version)
            p = self._pointer()
            history = [v for v in p.get("history") or [] if isinstance(v, str)]
            if p.get("version") != cand.version:
                history.append(cand.version)
                self._write_pointer(cand.version, history, "promote" + (" (forced)" if force and not allowed else ""))
            log.info("promoted %s (%s)", cand.version, reason)
            return self._version(cand.version, current=cand.version)

    def rollback(self) -> ModelVersion | None:
        """Go back to the model promoted before the current one (None: the base model)."""
        with self._lock():
            p = self._pointer()
            history = [v for v in p.get("history") or [] if isinstance(v, str)]
            if not p.get("version"):
                raise RegistryError("nothing to roll back: the base model is already in service")
            if history and history[-1] == p.get("version"):
                history.pop()
            while history and not self._version(history[-1]).valid:
                log.warning("skipping damaged version %s in the rollback history", history[-1])
                history.pop()
            target = history[-1] if history else None
            self._write_pointer(target, history, "rollback")
            return self._version(target, current=target) if target else None


def _norm_version(v: str) -> str:
    v = str(v).strip()
    if v.isdigit():
        v = f"v{v}"
    if not VERSION_RE.match(v):
        raise RegistryError(f"{v!r} is not a version name (expected v1, v2, ...)")
    return v


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link when on the same filesystem (instant, no extra space), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


async def watch_current(registry: Registry, on_change, *, interval_s: float = 30.0, stop=None) -> None:
    """Poll the registry and call ``on_change()`` (in a worker thread) whenever the current model
    changes: the bot's hot reload. ``on_change`` is e.g. ``TutorRuntime.reload_model``, which swaps
    the generator while answers in flight finish on the old one. A failing reload is logged and
    retried at the next change; ``stop`` (an asyncio.Event) ends the loop.

        asyncio.create_task(watch_current(Registry(settings.resolved_models_dir), runtime.reload_model))
    """
    import asyncio

    token = registry.state_token()
    while stop is None or not stop.is_set():
        try:
            if stop is None:
                await asyncio.sleep(interval_s)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval_s)
                if stop.is_set():
                    return
            current = await asyncio.to_thread(registry.state_token)
            if current != token:
                token = current
                log.info("the current model changed (%s); reloading", current)
                await asyncio.to_thread(on_change)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("reloading the answer model failed; the previous model stays in service")


def wait_for_change(registry: Registry, token: str, timeout_s: float, poll_s: float = 2.0) -> bool:
    """Block until the current model changes or ``timeout_s`` passes (for scripts; the bot polls)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if registry.changed_since(token):
            return True
        time.sleep(poll_s)
    return registry.changed_since(token)
