"""Composition root: Settings -> logging -> database -> tutor runtime, quiz service -> TutorBot.

`python -m bot` is the main job (`make run`): the Discord bot when DISCORD_TOKEN is set, otherwise
the terminal tutor on the configured course.
"""

from __future__ import annotations

import sys


def run_discord(settings) -> int:
    """Run the Discord bot until stopped. Returns the process exit code."""
    import asyncio

    from bot.client import main as bot_main

    return asyncio.run(bot_main(settings)) or 0


def main() -> None:
    from bot.cli import app
    from bot.config import Settings

    s = Settings()
    has_token = s.discord_token is not None and s.discord_token.get_secret_value().strip()
    argv = ["run"] if has_token else ["chat"]
    if not has_token:
        print("No DISCORD_TOKEN set: starting the terminal tutor. (See README to run it on Discord.)", file=sys.stderr)
    app(argv)


if __name__ == "__main__":
    main()
