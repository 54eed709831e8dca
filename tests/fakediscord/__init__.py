"""A fake Discord server for end-to-end tests of the bot: see ``server.FakeDiscord``.

Quick use (fixtures in tests/bot/conftest.py wrap this):

    async with FakeDiscord() as fake, running_bot(fake, make_bot()) as bot:
        it = await fake.slash("ask", question="What is LoRA?", user="alice")
        assert (await it.callback()).json["type"] == 5
        reply = await it.reply()
"""

from tests.fakediscord.payloads import (
    FakeChannel,
    FakeGuild,
    FakeMember,
    FakeRole,
    FakeUser,
    World,
    snowflake,
)
from tests.fakediscord.runner import running_bot
from tests.fakediscord.server import (
    FakeDiscord,
    InteractionHandle,
    MessageHandle,
    ModalRecord,
    Recorded,
    json_response,
)

__all__ = [
    "FakeChannel",
    "FakeDiscord",
    "FakeGuild",
    "FakeMember",
    "FakeRole",
    "FakeUser",
    "InteractionHandle",
    "MessageHandle",
    "ModalRecord",
    "Recorded",
    "World",
    "json_response",
    "running_bot",
    "snowflake",
]
