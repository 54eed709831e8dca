"""The world the fake Discord server serves: users, roles, channels, a guild, and their JSON payloads.

Payloads carry every key discord.py reads with ``data[...]`` (a missing one is a KeyError deep in
the client, far from the test that caused it). Permissions are plain integers computed the way
Discord does for interactions: @everyone | member roles, everything for administrators and the owner.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import discord

DISCORD_EPOCH_MS = 1420070400000
_counter = itertools.count()
_lock = threading.Lock()


def snowflake() -> int:
    """A unique, time-ordered Discord-style id."""
    with _lock:
        n = next(_counter)
    return ((int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22) | (n & 0x3FFFFF)


def iso_now() -> str:
    return datetime.now(UTC).isoformat()


# Permission sets used by the default world ---------------------------------------------------
EVERYONE_PERMS = discord.Permissions(
    view_channel=True,
    send_messages=True,
    send_messages_in_threads=True,
    embed_links=True,
    attach_files=True,
    read_message_history=True,
    add_reactions=True,
    use_application_commands=True,
    use_external_emojis=True,
).value
ALL_PERMS = discord.Permissions.all().value
MANAGE_GUILD = discord.Permissions(manage_guild=True).value
ADMINISTRATOR = discord.Permissions(administrator=True).value


@dataclass
class FakeUser:
    id: int
    username: str
    bot: bool = False
    global_name: str | None = None

    @property
    def mention(self) -> str:
        return f"<@{self.id}>"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "username": self.username,
            "discriminator": "0",
            "global_name": self.global_name or self.username,
            "avatar": None,
            "bot": self.bot,
            "public_flags": 0,
        }


@dataclass
class FakeRole:
    id: int
    name: str
    permissions: int = 0
    position: int = 0
    managed: bool = False

    @property
    def mention(self) -> str:
        return f"<@&{self.id}>"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "name": self.name,
            "permissions": str(self.permissions),
            "position": self.position,
            "color": 0,
            "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
            "hoist": False,
            "managed": self.managed,
            "mentionable": False,
            "flags": 0,
            "icon": None,
            "unicode_emoji": None,
        }


@dataclass
class FakeChannel:
    id: int
    name: str
    guild_id: int | None
    type: int = 0  # 0 text, 1 DM
    position: int = 0
    recipient: FakeUser | None = None  # DMs only
    # Permission overwrites, Discord's format: {"id", "type": 0 role | 1 member, "allow", "deny"}.
    overwrites: list[dict] = field(default_factory=list)

    @property
    def mention(self) -> str:
        return f"<#{self.id}>"

    def to_dict(self) -> dict[str, Any]:
        if self.type == 1:
            return {
                "id": str(self.id),
                "type": 1,
                "last_message_id": None,
                "recipients": [self.recipient.to_dict()] if self.recipient else [],
                "flags": 0,
            }
        return {
            "id": str(self.id),
            "type": self.type,
            "guild_id": str(self.guild_id),
            "name": self.name,
            "position": self.position,
            "permission_overwrites": [
                {"id": str(o["id"]), "type": o["type"], "allow": str(o["allow"]), "deny": str(o["deny"])}
                for o in self.overwrites
            ],
            "nsfw": False,
            "parent_id": None,
            "topic": None,
            "last_message_id": None,
            "rate_limit_per_user": 0,
            "flags": 0,
        }


@dataclass
class FakeMember:
    user: FakeUser
    roles: list[int] = field(default_factory=list)
    nick: str | None = None


@dataclass
class FakeGuild:
    id: int
    name: str
    owner_id: int
    roles: list[FakeRole] = field(default_factory=list)
    channels: list[FakeChannel] = field(default_factory=list)
    members: list[FakeMember] = field(default_factory=list)

    @property
    def everyone(self) -> FakeRole:
        return next(r for r in self.roles if r.id == self.id)

    def role(self, name: str) -> FakeRole:
        for r in self.roles:
            if r.name == name:
                return r
        raise KeyError(f"no role named {name!r} in the fake guild")

    def channel(self, key: int | str) -> FakeChannel:
        for c in self.channels:
            if c.id == key or c.name == key:
                return c
        raise KeyError(f"no channel {key!r} in the fake guild")

    def member(self, user: FakeUser | int) -> FakeMember | None:
        uid = user if isinstance(user, int) else user.id
        return next((m for m in self.members if m.user.id == uid), None)

    def permissions_of(self, user: FakeUser | int, channel: FakeChannel | None = None) -> int:
        """Discord's permission computation: base (roles) then the channel's overwrites."""
        uid = user if isinstance(user, int) else user.id
        if uid == self.owner_id:
            return ALL_PERMS
        member = self.member(uid)
        roles = set(member.roles) if member is not None else set()
        perms = self.everyone.permissions
        for r in self.roles:
            if r.id in roles:
                perms |= r.permissions
        if perms & ADMINISTRATOR:
            return ALL_PERMS
        if channel is None:
            return perms
        ows = channel.overwrites
        for o in ows:  # @everyone
            if o["type"] == 0 and o["id"] == self.id:
                perms = (perms & ~o["deny"]) | o["allow"]
        allow = deny = 0
        for o in ows:  # roles, together
            if o["type"] == 0 and o["id"] in roles:
                allow |= o["allow"]
                deny |= o["deny"]
        perms = (perms & ~deny) | allow
        for o in ows:  # the member
            if o["type"] == 1 and o["id"] == uid:
                perms = (perms & ~o["deny"]) | o["allow"]
        return perms

    def member_dict(
        self, member: FakeMember, *, with_user: bool = True, channel: FakeChannel | None = None
    ) -> dict:
        d: dict[str, Any] = {
            "roles": [str(r) for r in member.roles],
            "joined_at": "2024-01-01T00:00:00+00:00",
            "premium_since": None,
            "deaf": False,
            "mute": False,
            "flags": 0,
            "pending": False,
            "nick": member.nick,
            "avatar": None,
            "communication_disabled_until": None,
        }
        if with_user:
            d["user"] = member.user.to_dict()
        d["permissions"] = str(self.permissions_of(member.user, channel))
        return d

    def to_dict(self) -> dict[str, Any]:
        """The GUILD_CREATE payload."""
        return {
            "id": str(self.id),
            "name": self.name,
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "owner_id": str(self.owner_id),
            "afk_channel_id": None,
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 1,
            "explicit_content_filter": 0,
            "roles": [r.to_dict() for r in self.roles],
            "emojis": [],
            "stickers": [],
            "features": [],
            "mfa_level": 0,
            "system_channel_id": None,
            "system_channel_flags": 0,
            "rules_channel_id": None,
            "vanity_url_code": None,
            "description": None,
            "banner": None,
            "premium_tier": 0,
            "premium_subscription_count": 0,
            "preferred_locale": "en-US",
            "public_updates_channel_id": None,
            "nsfw_level": 0,
            "premium_progress_bar_enabled": False,
            "joined_at": "2024-01-01T00:00:00+00:00",
            "large": False,
            "unavailable": False,
            "member_count": len(self.members),
            "voice_states": [],
            "members": [self.member_dict(m) for m in self.members],
            "channels": [c.to_dict() for c in self.channels],
            "threads": [],
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
        }


@dataclass
class World:
    """Everything the fake server knows about: the bot, its application, one guild and its people.

    ``users`` is keyed by a short name: ``owner`` (guild owner), ``mod`` (Manage Server through the
    Moderator role), ``ta`` (only the "Tutor Admin" role, no Manage Server), ``alice``, ``bob``,
    ``carol`` (students), and ``bot`` (the bot itself).
    """

    bot: FakeUser
    application_id: int
    guild: FakeGuild
    users: dict[str, FakeUser]
    dm_channels: dict[int, FakeChannel] = field(default_factory=dict)

    @classmethod
    def default(cls) -> World:
        guild_id = snowflake()
        bot = FakeUser(snowflake(), "TutorBot", bot=True)
        users = {
            name: FakeUser(snowflake(), name) for name in ("owner", "mod", "ta", "alice", "bob", "carol")
        }
        users["bot"] = bot
        everyone = FakeRole(guild_id, "@everyone", EVERYONE_PERMS, 0)
        moderator = FakeRole(snowflake(), "Moderator", MANAGE_GUILD, 3)
        tutor_admin = FakeRole(snowflake(), "Tutor Admin", 0, 2)
        bot_role = FakeRole(snowflake(), "TutorBot", EVERYONE_PERMS, 1, managed=True)
        channels = [
            FakeChannel(snowflake(), "general", guild_id, position=0),
            FakeChannel(snowflake(), "questions", guild_id, position=1),
            FakeChannel(snowflake(), "quiz", guild_id, position=2),
            FakeChannel(
                snowflake(),
                "announcements",
                guild_id,
                position=3,
                overwrites=[
                    {
                        "id": bot.id,
                        "type": 1,
                        "allow": 0,
                        "deny": discord.Permissions(send_messages=True).value,
                    }
                ],
            ),
        ]
        members = [
            FakeMember(users["owner"]),
            FakeMember(users["mod"], [moderator.id]),
            FakeMember(users["ta"], [tutor_admin.id]),
            FakeMember(users["alice"]),
            FakeMember(users["bob"]),
            FakeMember(users["carol"]),
            FakeMember(bot, [bot_role.id]),
        ]
        guild = FakeGuild(
            id=guild_id,
            name="Course Server",
            owner_id=users["owner"].id,
            roles=[everyone, bot_role, tutor_admin, moderator],
            channels=channels,
            members=members,
        )
        return cls(bot=bot, application_id=snowflake(), guild=guild, users=users)

    def user(self, who: FakeUser | str | int) -> FakeUser:
        if isinstance(who, FakeUser):
            return who
        if isinstance(who, str):
            return self.users[who]
        for u in self.users.values():
            if u.id == who:
                return u
        raise KeyError(f"unknown user {who!r}")

    def dm_channel(self, user: FakeUser) -> FakeChannel:
        ch = self.dm_channels.get(user.id)
        if ch is None:
            ch = FakeChannel(snowflake(), f"dm-{user.username}", None, type=1, recipient=user)
            self.dm_channels[user.id] = ch
        return ch

    def find_channel(self, channel_id: int) -> FakeChannel | None:
        for c in self.guild.channels:
            if c.id == channel_id:
                return c
        for c in self.dm_channels.values():
            if c.id == channel_id:
                return c
        return None
