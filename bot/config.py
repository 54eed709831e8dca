"""Settings for tutorbot, read from the environment (prefix ``TUTORBOT_``) and ``.env``.

Built once in the composition root (``bot.__main__`` / ``bot.cli``), never at import time.
``DISCORD_TOKEN`` and ``DATABASE_URL`` are also read without the prefix, as hosting platforms set them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TUTORBOT_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    # --- course and index -------------------------------------------------------------------
    course_dir: Path = Field(
        PROJECT_ROOT / "courses" / "pretraining-finetuning",
        description="Folder of the course the tutor teaches (see docs/COURSE_FORMAT.md).",
    )
    data_dir: Path = Field(
        PROJECT_ROOT / "data",
        description="Where the SQLite database, the index, converted models and runs are kept.",
    )
    index_dir: Path | None = Field(
        None, description="Folder of the search index. Default: <data_dir>/index/<course id>."
    )

    # --- database -------------------------------------------------------------------------
    database_url: str | None = Field(
        None,
        validation_alias=AliasChoices("TUTORBOT_DATABASE_URL", "DATABASE_URL"),
        description="SQLAlchemy async URL. Default: SQLite at <data_dir>/tutorbot.db. "
        "PostgreSQL: postgresql+asyncpg://user@host/db.",
    )

    # --- retrieval ------------------------------------------------------------------------
    retrieval_k: int = Field(5, ge=1, le=50, description="Passages retrieved per question.")
    dense_weight: float = Field(0.6, ge=0, description="Weight of the cosine similarity in the fused score.")
    bm25_weight: float = Field(0.4, ge=0, description="Weight of the (max-normalised) keyword score, BM25 of words + phrases, in the fused score.")

    # --- answering ------------------------------------------------------------------------
    answer_mode: Literal["auto", "generative", "extractive"] = Field(
        "auto",
        description="auto: the answer model writes (checked against the passages) once a fine-tuned model "
        "has been promoted, extraction until then; generative: always the model (the base one if none is "
        "promoted); extractive: the best sentences of the passages.",
    )
    generation_timeout_s: float = Field(
        20.0, gt=0, description="Generation slower than this falls back to the extractive answer."
    )
    passage_cache: Literal["prefix", "blocks", "off"] = Field(
        "prefix",
        description="Reuse of the answer model's keys and values across prompts. prefix: reuses "
        "the part of a prompt an earlier prompt began with (the fixed start, repeated passages); blocks: "
        "each passage from its own cached block wherever it sits (faster, approximate); off: every "
        "prompt in full.",
    )
    passage_cache_mb: float = Field(
        512, ge=0, description="Memory bound of that cache in MB (least recently used pieces go first)."
    )
    max_new_tokens: int = Field(96, ge=8, le=512, description="Longest generated answer, in tokens.")
    max_question_chars: int = Field(
        2000, ge=50, description="Longer questions are truncated (with a notice) before answering."
    )
    model_check_s: float = Field(
        60.0, ge=0, description="How often the bot checks the model registry for a newly promoted model (0: never)."
    )
    models_dir: Path | None = Field(
        None, description="Model registry folder. Default: <data_dir>/models."
    )

    # --- Discord --------------------------------------------------------------------------
    discord_token: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("TUTORBOT_DISCORD_TOKEN", "DISCORD_TOKEN"),
        description="Bot token. Without it, `make run` starts the terminal tutor.",
    )
    dev_guild_id: int | None = Field(
        None,
        validation_alias=AliasChoices("TUTORBOT_DEV_GUILD_ID", "DEV_GUILD_ID"),
        description="Sync slash commands to this guild only (instant) instead of globally.",
    )
    shard_count: int | None = Field(
        None,
        validation_alias=AliasChoices("TUTORBOT_SHARD_COUNT", "SHARD_COUNT"),
        description="Total shards across all processes (None: Discord's recommendation).",
    )
    shard_ids: list[int] | None = Field(
        None,
        validation_alias=AliasChoices("TUTORBOT_SHARD_IDS", "SHARD_IDS"),
        description="Shards this process runs, e.g. [0,1] (None: all).",
    )
    admin_role: str | None = Field(
        None, description="Role name allowed to use admin commands besides Manage Server."
    )
    answer_on_mention: bool = Field(True, description="Answer when the bot is mentioned.")
    answer_in_dms: bool = Field(True, description="Answer direct messages.")
    user_rate: int = Field(5, ge=1, description="Answers per user per rate window.")
    channel_rate: int = Field(20, ge=1, description="Answers per channel per rate window.")
    rate_window_s: float = Field(60.0, gt=0, description="Rate-limit window in seconds.")
    max_concurrent_generations: int = Field(
        8, ge=1, description="Questions answered at once; more wait in a queue (batched together)."
    )

    # --- quizzes --------------------------------------------------------------------------
    quiz_questions: int = Field(5, ge=1, le=25, description="Default questions per quiz.")
    quiz_seconds: int = Field(30, ge=10, le=120, description="Default seconds per question.")
    quiz_allow_change: bool = Field(True, description="A student may change their answer before the deadline.")
    quiz_idle_questions: int = Field(
        3, ge=1, description="A quiz ends itself after this many questions in a row with no answers."
    )

    # --- logging --------------------------------------------------------------------------
    log_level: str = Field("INFO", description="Logging level.")

    @field_validator("shard_ids", mode="before")
    @classmethod
    def _parse_shard_ids(cls, v: object) -> object:
        if isinstance(v, str) and v.strip() and not v.strip().startswith("["):
            return [int(x) for x in v.replace(",", " ").split()]
        return v

    # --- derived --------------------------------------------------------------------------
    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'tutorbot.db').resolve()}"

    @property
    def resolved_models_dir(self) -> Path:
        return self.models_dir or self.data_dir / "models"

    def resolved_index_dir(self, course_id: str) -> Path:
        return self.index_dir or self.data_dir / "index" / course_id
