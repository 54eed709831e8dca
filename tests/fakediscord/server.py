"""A fake Discord (REST + gateway) on 127.0.0.1 that the unmodified discord.py client talks to.

Tests own it: they inject gateway events (messages, slash commands, button clicks, modal submits)
and await the REST calls the bot makes in response. Everything the bot sends is recorded.

    fake = FakeDiscord()
    await fake.start()
    with fake.patch_discord():              # Route.BASE and DEFAULT_GATEWAY point here
        ...start a bot with token fake.token...
        it = await fake.slash("ask", question="What is LoRA?", user="alice")
        deferral = await it.callback()      # POST /interactions/{id}/{token}/callback
        reply = await it.reply()            # the first message the bot made for this interaction
    await fake.stop()

Known traps handled here: JSON responses carry ``Content-Type: application/json`` exactly (no
charset, or discord.py treats them as text); gateway frames are plain text; heartbeats are acked;
the application id comes from ``/oauth2/applications/@me``; the interaction callback answers with
the ``interaction`` and ``resource`` objects (``with_response``) so views get routed; 429s carry
``Via`` and a JSON body with ``retry_after`` (without them discord.py raises instead of retrying).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import discord
import yarl
from aiohttp import WSMsgType, web

from tests.fakediscord.payloads import FakeChannel, FakeMember, FakeRole, FakeUser, World, iso_now, snowflake

log = logging.getLogger("tests.fakediscord")

API_PREFIX = "/api/v10"
EPHEMERAL = 1 << 6
LOADING = 1 << 7

# Option types of application commands.
SUB_COMMAND, SUB_COMMAND_GROUP, STRING, INTEGER, BOOLEAN, USER, CHANNEL, ROLE, MENTIONABLE, NUMBER = (
    1,
    2,
    3,
    4,
    5,
    6,
    7,
    8,
    9,
    10,
)

_DEFAULT_ERRORS: dict[int, tuple[int, str]] = {
    400: (50035, "Invalid Form Body"),
    401: (0, "401: Unauthorized"),
    403: (50013, "Missing Permissions"),
    404: (10008, "Unknown Message"),
    500: (0, "500: Internal Server Error"),
    502: (0, "502: Bad Gateway"),
    503: (0, "503: Service Unavailable"),
}


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON response whose content type is exactly ``application/json`` (no charset)."""
    h = {"Content-Type": "application/json"}
    if headers:
        h.update(headers)
    return web.Response(body=json.dumps(data).encode(), status=status, headers=h)


def error_response(status: int, code: int | None = None, message: str | None = None) -> web.Response:
    dcode, dmsg = _DEFAULT_ERRORS.get(status, (0, f"{status}: Error"))
    return json_response({"message": message or dmsg, "code": dcode if code is None else code}, status)


@dataclass
class Recorded:
    """One REST request the bot made, and what the fake answered."""

    method: str
    path: str  # without the /api/v10 prefix, e.g. /channels/123/messages
    query: dict[str, str]
    json: Any  # the JSON body (multipart: the payload_json part), None without a body
    status: int
    time: float  # time.monotonic() when it arrived
    response: Any = None
    files: list[str] = field(default_factory=list)

    @property
    def payload(self) -> Any:
        return self.json

    def __repr__(self) -> str:
        return f"<{self.method} {self.path} -> {self.status}>"


@dataclass
class Failure:
    method: str
    pattern: re.Pattern[str]
    status: int
    times: int
    code: int | None = None
    message: str | None = None
    retry_after: float = 0.1
    is_global: bool = False
    hits: int = 0

    def response(self) -> web.Response:
        if self.status == 429:
            body = {
                "message": "You are being rate limited.",
                "retry_after": self.retry_after,
                "global": self.is_global,
            }
            if self.code is not None:
                body["code"] = self.code
            headers = {
                "Via": "1.1 google",
                "Retry-After": str(max(1, int(self.retry_after + 0.999))),
                "X-RateLimit-Scope": "global" if self.is_global else "user",
            }
            if self.is_global:
                headers["X-RateLimit-Global"] = "true"
            return json_response(body, 429, headers)
        return error_response(self.status, self.code, self.message)


@dataclass
class ModalRecord:
    """A modal the bot opened in answer to an interaction."""

    interaction_token: str
    custom_id: str
    title: str
    components: list[dict]
    user: FakeUser
    channel: FakeChannel


@dataclass
class _Interaction:
    id: int
    token: str
    payload: dict
    user: FakeUser
    channel: FakeChannel
    responded: bool = False
    original_id: int | None = None
    loading: bool = False  # deferred with thinking: the next follow-up fills the original
    ephemeral: bool = False


class _GatewayConnection:
    def __init__(self, ws: web.WebSocketResponse):
        self.ws = ws
        self.seq = 0
        self.shard: tuple[int, int] = (0, 1)
        self.ready = False

    async def send(self, op: int, d: Any, t: str | None = None) -> None:
        frame: dict[str, Any] = {"op": op, "d": d, "s": None, "t": t}
        if op == 0:
            self.seq += 1
            frame["s"] = self.seq
        await self.ws.send_str(json.dumps(frame))  # plain text frames, never compressed


class FakeDiscord:
    """Discord's REST API and gateway, in-process, for tests. See the module docstring."""

    def __init__(
        self,
        world: World | None = None,
        *,
        token: str | None = None,
        shards: int = 1,
        heartbeat_interval_ms: int = 41250,
    ) -> None:
        self.world = world or World.default()
        self.token = token or f"fake.{secrets.token_urlsafe(16)}"
        self.shards = shards
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.requests: list[Recorded] = []
        self.identifies: list[dict] = []
        self.gateway_received: list[dict] = []
        self.messages: dict[int, dict] = {}
        self.deleted_messages: set[int] = set()
        self.commands: dict[int | None, list[dict]] = {}  # None: global
        self.modals: list[ModalRecord] = []
        self.failures: list[Failure] = []
        self.unhandled: list[Recorded] = []
        self._interactions: dict[str, _Interaction] = {}
        self._connections: list[_GatewayConnection] = []
        self._cond: asyncio.Condition | None = None
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        self._routes = self._build_routes()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> FakeDiscord:
        self._cond = asyncio.Condition()
        app = web.Application()
        app.router.add_get("/gateway", self._gateway)
        app.router.add_route("*", API_PREFIX + "/{tail:.*}", self._api)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        for conn in list(self._connections):
            with contextlib.suppress(Exception):
                await conn.ws.close(code=1001)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeDiscord:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        return self.http_base + API_PREFIX

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    @contextlib.contextmanager
    def patch_discord(self) -> Iterator[None]:
        """Point discord.py's REST and gateway at this server; restore the real ones afterwards."""
        from discord.gateway import DiscordWebSocket
        from discord.http import Route

        old_base, old_gateway = Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY
        Route.BASE = self.api_base  # type: ignore[misc]
        DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(self.gateway_url)
        try:
            yield
        finally:
            Route.BASE = old_base  # type: ignore[misc]
            DiscordWebSocket.DEFAULT_GATEWAY = old_gateway

    # ------------------------------------------------------------------ shortcuts into the world
    @property
    def guild(self):
        return self.world.guild

    @property
    def bot_user(self) -> FakeUser:
        return self.world.bot

    @property
    def application_id(self) -> int:
        return self.world.application_id

    @property
    def users(self) -> dict[str, FakeUser]:
        return self.world.users

    def channel(self, key: int | str | FakeChannel) -> FakeChannel:
        if isinstance(key, FakeChannel):
            return key
        if isinstance(key, int):
            found = self.world.find_channel(key)
            if found is None:
                raise KeyError(f"unknown channel {key}")
            return found
        return self.guild.channel(key)

    # ------------------------------------------------------------------ records and waiting
    def mark(self) -> int:
        """The current position in ``requests``: pass it as ``after=`` to see only what follows."""
        return len(self.requests)

    def find(
        self,
        method: str | None = None,
        path: str | None = None,
        *,
        after: int = 0,
        status: int | None = None,
        ok: bool | None = None,
        predicate: Callable[[Recorded], bool] | None = None,
    ) -> list[Recorded]:
        """Recorded requests matching ``method`` and the regex ``path`` (searched, so anchor it if needed)."""
        rx = re.compile(path) if path else None
        out = []
        for r in self.requests[after:]:
            if method and r.method != method.upper():
                continue
            if rx and not rx.search(r.path):
                continue
            if status is not None and r.status != status:
                continue
            if ok is not None and (200 <= r.status < 300) != ok:
                continue
            if predicate and not predicate(r):
                continue
            out.append(r)
        return out

    async def wait_for(
        self,
        method: str | None = None,
        path: str | None = None,
        *,
        timeout: float = 5.0,
        after: int = 0,
        status: int | None = None,
        ok: bool | None = None,
        predicate: Callable[[Recorded], bool] | None = None,
        count: int = 1,
    ) -> Recorded:
        """The ``count``-th matching request, waiting up to ``timeout`` seconds for it to arrive."""
        return (
            await self.wait_for_all(
                method,
                path,
                timeout=timeout,
                after=after,
                status=status,
                ok=ok,
                predicate=predicate,
                count=count,
            )
        )[count - 1]

    async def wait_for_all(
        self,
        method: str | None = None,
        path: str | None = None,
        *,
        timeout: float = 5.0,
        after: int = 0,
        status: int | None = None,
        ok: bool | None = None,
        predicate: Callable[[Recorded], bool] | None = None,
        count: int = 1,
    ) -> list[Recorded]:
        """At least ``count`` matching requests (all that matched when the count was reached)."""
        assert self._cond is not None, "start() the fake first"

        def matches() -> list[Recorded]:
            return self.find(method, path, after=after, status=status, ok=ok, predicate=predicate)

        deadline = time.monotonic() + timeout
        async with self._cond:
            while True:
                found = matches()
                if len(found) >= count:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._cond.wait(), remaining)
        recent = "\n  ".join(f"{r.method} {r.path} -> {r.status}" for r in self.requests[-15:])
        raise AssertionError(
            f"no {count}x {method or '*'} {path or '*'} (status={status}, ok={ok}) within {timeout}s; "
            f"recent requests:\n  {recent or '(none)'}"
        )

    async def assert_no_request(
        self,
        method: str | None = None,
        path: str | None = None,
        *,
        within: float = 0.3,
        after: int = 0,
        **kw: Any,
    ) -> None:
        """Fail if a matching request arrives (or has arrived since ``after``) within ``within`` seconds."""
        await asyncio.sleep(within)
        found = self.find(method, path, after=after, **kw)
        assert not found, f"unexpected requests: {found}"

    async def _record(self, rec: Recorded) -> None:
        self.requests.append(rec)
        assert self._cond is not None
        async with self._cond:
            self._cond.notify_all()

    # ------------------------------------------------------------------ failure injection
    def fail(
        self,
        method: str,
        path: str,
        status: int,
        *,
        times: int = 1,
        code: int | None = None,
        message: str | None = None,
        retry_after: float = 0.1,
        is_global: bool = False,
    ) -> Failure:
        """Make the next ``times`` matching requests fail with ``status`` (Discord's JSON error format).

        429 answers carry ``retry_after`` (seconds) as Discord does, so discord.py waits and retries.
        ``path`` is a regex searched in the path without the API prefix.
        """
        f = Failure(method.upper(), re.compile(path), status, times, code, message, retry_after, is_global)
        self.failures.append(f)
        return f

    def _take_failure(self, method: str, path: str) -> Failure | None:
        for f in self.failures:
            if f.hits < f.times and f.method == method and f.pattern.search(path):
                f.hits += 1
                return f
        return None

    # ------------------------------------------------------------------ REST
    def _build_routes(self) -> list[tuple[str, re.Pattern[str], Callable]]:
        r = [
            ("GET", r"/users/@me", self._get_me),
            ("GET", r"/oauth2/applications/@me", self._get_application),
            ("GET", r"/gateway", self._get_gateway),
            ("GET", r"/gateway/bot", self._get_gateway_bot),
            ("PUT", r"/applications/(?P<app>\d+)/commands", self._put_commands),
            ("PUT", r"/applications/(?P<app>\d+)/guilds/(?P<guild>\d+)/commands", self._put_commands),
            ("GET", r"/applications/(?P<app>\d+)/commands", self._get_commands),
            ("GET", r"/applications/(?P<app>\d+)/guilds/(?P<guild>\d+)/commands", self._get_commands),
            ("POST", r"/channels/(?P<channel>\d+)/messages", self._post_message),
            ("GET", r"/channels/(?P<channel>\d+)/messages/(?P<message>\d+)", self._get_message),
            ("PATCH", r"/channels/(?P<channel>\d+)/messages/(?P<message>\d+)", self._patch_message),
            ("DELETE", r"/channels/(?P<channel>\d+)/messages/(?P<message>\d+)", self._delete_message),
            ("POST", r"/channels/(?P<channel>\d+)/typing", self._no_content),
            (
                "PUT",
                r"/channels/(?P<channel>\d+)/messages/(?P<message>\d+)/reactions/[^/]+/@me",
                self._no_content,
            ),
            (
                "DELETE",
                r"/channels/(?P<channel>\d+)/messages/(?P<message>\d+)/reactions/[^/]+/@me",
                self._no_content,
            ),
            ("GET", r"/channels/(?P<channel>\d+)", self._get_channel),
            ("POST", r"/users/@me/channels", self._create_dm),
            ("POST", r"/interactions/(?P<iid>\d+)/(?P<token>[^/]+)/callback", self._interaction_callback),
            ("POST", r"/webhooks/(?P<app>\d+)/(?P<token>[^/]+)", self._followup),
            (
                "GET",
                r"/webhooks/(?P<app>\d+)/(?P<token>[^/]+)/messages/(?P<message>@original|\d+)",
                self._get_wh_msg,
            ),
            (
                "PATCH",
                r"/webhooks/(?P<app>\d+)/(?P<token>[^/]+)/messages/(?P<message>@original|\d+)",
                self._edit_wh_msg,
            ),
            (
                "DELETE",
                r"/webhooks/(?P<app>\d+)/(?P<token>[^/]+)/messages/(?P<message>@original|\d+)",
                self._del_wh_msg,
            ),
        ]
        return [(m, re.compile(p + r"/?$"), h) for m, p, h in r]

    async def _api(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        path = "/" + request.match_info["tail"]
        method = request.method.upper()
        body, files = await self._read_body(request)
        rec = Recorded(method, path, dict(request.query), body, 0, arrived, files=files)

        token_in_path = path.startswith(("/webhooks/", "/interactions/"))
        if not token_in_path and request.headers.get("Authorization") != f"Bot {self.token}":
            rec.status = 401
            await self._record(rec)
            return error_response(401)

        failure = self._take_failure(method, path)
        if failure is not None:
            rec.status = failure.status
            await self._record(rec)
            return failure.response()

        for m, rx, handler in self._routes:
            if m == method and (match := rx.fullmatch(path)):
                try:
                    resp = await handler(request, match, body)
                except _HTTPError as e:
                    resp = error_response(e.status, e.code, e.message)
                rec.status = resp.status
                if isinstance(resp, web.Response) and resp.body and resp.content_type == "application/json":
                    rec.response = json.loads(resp.body)  # type: ignore[arg-type]
                await self._record(rec)
                return resp

        log.warning("fake Discord has no route for %s %s", method, path)
        rec.status = 404
        self.unhandled.append(rec)
        await self._record(rec)
        return error_response(404, 0, "404: Not Found")

    @staticmethod
    async def _read_body(request: web.Request) -> tuple[Any, list[str]]:
        if not request.can_read_body:
            return None, []
        if request.content_type.startswith("multipart/"):
            payload, files = None, []
            reader = await request.multipart()
            async for part in reader:
                if part.name == "payload_json":
                    payload = json.loads(await part.text())
                else:
                    files.append(part.filename or part.name or "")
                    await part.read()
            return payload, files
        raw = await request.read()
        if not raw:
            return None, []
        try:
            return json.loads(raw), []
        except ValueError:
            return raw.decode(errors="replace"), []

    async def _no_content(self, request, match, body) -> web.Response:
        return web.Response(status=204)

    async def _get_me(self, request, match, body) -> web.Response:
        return json_response({**self.bot_user.to_dict(), "verified": True, "mfa_enabled": False, "flags": 0})

    async def _get_application(self, request, match, body) -> web.Response:
        owner = self.users["owner"]
        return json_response(
            {
                "id": str(self.application_id),
                "name": self.bot_user.username,
                "icon": None,
                "description": "A course tutor (fake)",
                "summary": "",
                "bot_public": True,
                "bot_require_code_grant": False,
                "owner": owner.to_dict(),
                "team": None,
                "verify_key": "0" * 64,
                "flags": 1 << 19,  # GATEWAY_MESSAGE_CONTENT_LIMITED
                "interactions_endpoint_url": None,
                "redirect_uris": [],
                "tags": [],
                "bot": self.bot_user.to_dict(),
            }
        )

    async def _get_gateway(self, request, match, body) -> web.Response:
        return json_response({"url": self.gateway_url})

    async def _get_gateway_bot(self, request, match, body) -> web.Response:
        return json_response(
            {
                "url": self.gateway_url,
                "shards": self.shards,
                "session_start_limit": {
                    "total": 1000,
                    "remaining": 999,
                    "reset_after": 0,
                    "max_concurrency": 1,
                },
            }
        )

    def _command_key(self, match: re.Match[str]) -> int | None:
        if int(match["app"]) != self.application_id:
            raise _HTTPError(403, 50001, "Missing Access")
        g = match.groupdict().get("guild")
        return int(g) if g else None

    async def _put_commands(self, request, match, body) -> web.Response:
        key = self._command_key(match)
        out = []
        previous = {c["name"]: c for c in self.commands.get(key, [])}
        for cmd in body or []:
            stored = dict(cmd)
            stored.setdefault("type", 1)
            stored.setdefault("description", "")
            stored.setdefault("options", [])
            stored["id"] = previous.get(cmd["name"], {}).get("id") or str(snowflake())
            stored["application_id"] = str(self.application_id)
            stored["version"] = str(snowflake())
            stored.setdefault("default_member_permissions", None)
            if key is not None:
                stored["guild_id"] = str(key)
            out.append(stored)
        self.commands[key] = out
        return json_response(out)

    async def _get_commands(self, request, match, body) -> web.Response:
        return json_response(self.commands.get(self._command_key(match), []))

    # --- messages
    def _make_message(
        self,
        channel: FakeChannel,
        payload: dict,
        *,
        flags: int = 0,
        type_: int = 0,
        interaction: _Interaction | None = None,
    ) -> dict:
        mid = snowflake()
        msg: dict[str, Any] = {
            "id": str(mid),
            "channel_id": str(channel.id),
            "author": self.bot_user.to_dict(),
            "content": "",
            "embeds": [],
            "components": [],
            "attachments": [],
            "mentions": [],
            "mention_roles": [],
            "mention_everyone": False,
            "pinned": False,
            "tts": False,
            "type": type_,
            "timestamp": iso_now(),
            "edited_timestamp": None,
            "flags": flags,
        }
        if channel.guild_id is not None:
            msg["guild_id"] = str(channel.guild_id)
        if interaction is not None:
            msg["webhook_id"] = str(self.application_id)
            msg["application_id"] = str(self.application_id)
            msg["interaction_metadata"] = {
                "id": str(interaction.id),
                "type": interaction.payload["type"],
                "user": interaction.user.to_dict(),
                "authorizing_integration_owners": {},
            }
        self._apply_edit(msg, payload)
        self.messages[mid] = msg
        return msg

    @staticmethod
    def _apply_edit(msg: dict, payload: dict | None) -> None:
        if not payload:
            return
        for key in ("content", "embeds", "components", "attachments", "poll"):
            if key in payload:
                msg[key] = payload[key] if payload[key] is not None else ([] if key != "content" else "")
        if payload.get("message_reference"):
            msg["message_reference"] = payload["message_reference"]
            msg["type"] = 19
        if "flags" in payload and payload["flags"] is not None:
            keep = msg.get("flags", 0) & EPHEMERAL
            msg["flags"] = (payload["flags"] & ~LOADING) | keep
        else:
            msg["flags"] = msg.get("flags", 0) & ~LOADING

    def _message(self, mid: int, channel_id: int | None = None) -> dict:
        msg = self.messages.get(mid)
        if msg is None or (channel_id is not None and int(msg["channel_id"]) != channel_id):
            raise _HTTPError(404, 10008, "Unknown Message")
        return msg

    def _writable_channel(self, channel_id: int) -> FakeChannel:
        ch = self.world.find_channel(channel_id)
        if ch is None:
            raise _HTTPError(404, 10003, "Unknown Channel")
        if ch.guild_id is not None:
            perms = self.guild.permissions_of(self.bot_user, ch)
            if not perms & discord.Permissions(view_channel=True).value:
                raise _HTTPError(403, 50001, "Missing Access")
            if not perms & discord.Permissions(send_messages=True).value:
                raise _HTTPError(403, 50013, "Missing Permissions")
        return ch

    async def _post_message(self, request, match, body) -> web.Response:
        ch = self._writable_channel(int(match["channel"]))
        body = body or {}
        if not (body.get("content") or body.get("embeds") or body.get("components") or body.get("poll")):
            raise _HTTPError(400, 50006, "Cannot send an empty message")
        msg = self._make_message(ch, body, flags=body.get("flags") or 0)
        return json_response(msg)

    async def _get_message(self, request, match, body) -> web.Response:
        return json_response(self._message(int(match["message"]), int(match["channel"])))

    async def _patch_message(self, request, match, body) -> web.Response:
        msg = self._message(int(match["message"]), int(match["channel"]))
        self._apply_edit(msg, body)
        msg["edited_timestamp"] = iso_now()
        return json_response(msg)

    async def _delete_message(self, request, match, body) -> web.Response:
        mid = int(match["message"])
        self._message(mid, int(match["channel"]))
        del self.messages[mid]
        self.deleted_messages.add(mid)
        return web.Response(status=204)

    async def _get_channel(self, request, match, body) -> web.Response:
        ch = self.world.find_channel(int(match["channel"]))
        if ch is None:
            raise _HTTPError(404, 10003, "Unknown Channel")
        return json_response(ch.to_dict())

    async def _create_dm(self, request, match, body) -> web.Response:
        user = self.world.user(int((body or {})["recipient_id"]))
        return json_response(self.world.dm_channel(user).to_dict())

    # --- interactions
    def _interaction(self, token: str, *, unknown_code: int = 10062) -> _Interaction:
        it = self._interactions.get(token)
        if it is None:
            raise _HTTPError(
                404, unknown_code, "Unknown interaction" if unknown_code == 10062 else "Unknown Webhook"
            )
        return it

    async def _interaction_callback(self, request, match, body) -> web.Response:
        it = self._interaction(match["token"])
        if str(it.id) != match["iid"]:
            raise _HTTPError(404, 10062, "Unknown interaction")
        if it.responded:
            raise _HTTPError(400, 40060, "Interaction has already been acknowledged.")
        body = body or {}
        cb_type = body.get("type")
        data = body.get("data") or {}
        flags = data.get("flags") or 0
        it.responded = True
        message = None
        if cb_type == 4:  # CHANNEL_MESSAGE_WITH_SOURCE
            it.ephemeral = bool(flags & EPHEMERAL)
            message = self._make_message(it.channel, data, flags=flags, type_=20, interaction=it)
            it.original_id = int(message["id"])
        elif cb_type == 5:  # DEFERRED_CHANNEL_MESSAGE_WITH_SOURCE: the "thinking..." message
            it.ephemeral = bool(flags & EPHEMERAL)
            message = self._make_message(
                it.channel, {}, flags=(flags & EPHEMERAL) | LOADING, type_=20, interaction=it
            )
            message["flags"] = (flags & EPHEMERAL) | LOADING
            it.original_id = int(message["id"])
            it.loading = True
        elif cb_type in (6, 7):  # DEFERRED_UPDATE_MESSAGE / UPDATE_MESSAGE: the component's message
            source = it.payload.get("message")
            if source is None:
                raise _HTTPError(400, 50035, "Invalid Form Body (no message to update)")
            message = self.messages.get(int(source["id"]), source)
            it.original_id = int(message["id"])
            if cb_type == 7:
                self._apply_edit(message, data)
                message["edited_timestamp"] = iso_now()
        elif cb_type == 9:  # MODAL
            self.modals.append(
                ModalRecord(
                    it.token,
                    data["custom_id"],
                    data.get("title", ""),
                    data.get("components", []),
                    it.user,
                    it.channel,
                )
            )
        elif cb_type == 8:  # APPLICATION_COMMAND_AUTOCOMPLETE_RESULT
            pass
        else:
            it.responded = False
            raise _HTTPError(400, 50035, f"Invalid interaction response type {cb_type!r}")

        if request.query.get("with_response") not in ("1", "true", "True"):
            return web.Response(status=204)
        interaction_obj: dict[str, Any] = {
            "id": str(it.id),
            "type": it.payload["type"],
            "response_message_loading": cb_type == 5,
            "response_message_ephemeral": it.ephemeral,
        }
        if message is not None and cb_type in (4, 5, 7):
            interaction_obj["response_message_id"] = message["id"]
        resource: dict[str, Any] = {"type": cb_type}
        if message is not None and cb_type in (4, 5, 7):
            resource["message"] = message
        return json_response({"interaction": interaction_obj, "resource": resource})

    def _webhook_interaction(self, match: re.Match[str]) -> _Interaction:
        if int(match["app"]) != self.application_id:
            raise _HTTPError(404, 10015, "Unknown Webhook")
        it = self._interaction(match["token"], unknown_code=10015)
        if not it.responded:
            raise _HTTPError(404, 10015, "Unknown Webhook")
        return it

    async def _followup(self, request, match, body) -> web.Response:
        it = self._webhook_interaction(match)
        body = body or {}
        if it.loading and it.original_id is not None:
            # The first follow-up after a "thinking" deferral replaces the loading message.
            msg = self.messages[it.original_id]
            self._apply_edit(msg, body)
            it.loading = False
        else:
            flags = body.get("flags") or 0
            msg = self._make_message(it.channel, body, flags=flags, interaction=it)
        if request.query.get("wait") in ("true", "1", "True"):
            return json_response(msg)
        return web.Response(status=204)

    def _webhook_message(self, it: _Interaction, key: str) -> dict:
        if key == "@original":
            if it.original_id is None:
                raise _HTTPError(404, 10008, "Unknown Message")
            return self._message(it.original_id)
        return self._message(int(key))

    async def _get_wh_msg(self, request, match, body) -> web.Response:
        it = self._webhook_interaction(match)
        return json_response(self._webhook_message(it, match["message"]))

    async def _edit_wh_msg(self, request, match, body) -> web.Response:
        it = self._webhook_interaction(match)
        msg = self._webhook_message(it, match["message"])
        self._apply_edit(msg, body)
        msg["edited_timestamp"] = iso_now()
        if match["message"] == "@original":
            it.loading = False
        return json_response(msg)

    async def _del_wh_msg(self, request, match, body) -> web.Response:
        it = self._webhook_interaction(match)
        msg = self._webhook_message(it, match["message"])
        mid = int(msg["id"])
        del self.messages[mid]
        self.deleted_messages.add(mid)
        return web.Response(status=204)

    # ------------------------------------------------------------------ gateway
    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        conn = _GatewayConnection(ws)
        self._connections.append(conn)
        try:
            await conn.send(10, {"heartbeat_interval": self.heartbeat_interval_ms})
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                frame = json.loads(msg.data)
                self.gateway_received.append(frame)
                op, d = frame.get("op"), frame.get("d")
                if op == 1:  # HEARTBEAT
                    await conn.send(11, None)
                elif op == 2:  # IDENTIFY
                    await self._identify(conn, d)
                elif op == 6:  # RESUME
                    conn.ready = True
                    await conn.send(0, {}, "RESUMED")
        finally:
            self._connections.remove(conn)
        return ws

    async def _identify(self, conn: _GatewayConnection, d: dict) -> None:
        if d.get("token") != self.token:
            await conn.ws.close(code=4004, message=b"Authentication failed.")
            return
        self.identifies.append(d)
        shard = d.get("shard") or [0, 1]
        conn.shard = (int(shard[0]), int(shard[1]))
        guilds = [g for g in [self.guild] if self._shard_of(g.id, conn.shard[1]) == conn.shard[0]]
        ready = {
            "v": 10,
            "user": {**self.bot_user.to_dict(), "verified": True, "mfa_enabled": False, "flags": 0},
            "guilds": [{"id": str(g.id), "unavailable": True} for g in guilds],
            "session_id": secrets.token_hex(16),
            "resume_gateway_url": self.gateway_url,
            "shard": list(conn.shard),
            "application": {"id": str(self.application_id), "flags": 1 << 19},
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "geo_ordered_rtc_regions": [],
            "guild_join_requests": [],
            "user_settings": {},
        }
        await conn.send(0, ready, "READY")
        for g in guilds:
            await conn.send(0, g.to_dict(), "GUILD_CREATE")
        conn.ready = True
        assert self._cond is not None
        async with self._cond:
            self._cond.notify_all()

    @staticmethod
    def _shard_of(guild_id: int, shard_count: int) -> int:
        return (guild_id >> 22) % shard_count

    async def wait_for_identify(self, count: int = 1, timeout: float = 5.0) -> dict:
        """The ``count``-th IDENTIFY payload the bot sent (waiting for it)."""
        assert self._cond is not None
        deadline = time.monotonic() + timeout
        async with self._cond:
            while len(self.identifies) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"the bot did not IDENTIFY {count}x within {timeout}s")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._cond.wait(), remaining)
        return self.identifies[count - 1]

    async def dispatch(
        self, event: str, data: dict, *, guild_id: int | None = None, timeout: float = 5.0
    ) -> None:
        """Send a DISPATCH event to the shard that owns ``guild_id`` (shard 0 for DMs)."""
        gid = guild_id if guild_id is not None else (int(data["guild_id"]) if data.get("guild_id") else None)
        deadline = time.monotonic() + timeout
        while True:
            conns = [c for c in self._connections if c.ready and not c.ws.closed]
            if gid is not None:
                conns = [c for c in conns if self._shard_of(gid, c.shard[1]) == c.shard[0]]
            else:
                conns = [c for c in conns if c.shard[0] == 0]
            if conns:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"no gateway connection ready for {event} (is the bot running?)")
            await asyncio.sleep(0.01)
        for c in conns:
            await c.send(0, data, event)

    async def disconnect(self, code: int = 4000) -> None:
        """Drop every gateway connection (the client reconnects and RESUMEs, as after a network blip)."""
        for c in list(self._connections):
            await c.ws.close(code=code)

    # ------------------------------------------------------------------ injected events
    def _resolve_user(self, who: FakeUser | str | int) -> FakeUser:
        return self.world.user(who)

    async def send_message(
        self,
        content: str,
        *,
        user: FakeUser | str = "alice",
        channel: FakeChannel | str | int = "general",
        mentions: list[FakeUser | str] | None = None,
        mention_everyone: bool = False,
        reference: dict | int | None = None,
    ) -> MessageHandle:
        """A user posts a message (MESSAGE_CREATE). ``<@id>`` in ``content`` adds that user to mentions."""
        author = self._resolve_user(user)
        ch = self.channel(channel)
        mentioned = [self._resolve_user(m) for m in mentions or []]
        for uid in re.findall(r"<@!?(\d+)>", content):
            with contextlib.suppress(KeyError):
                u = self.world.user(int(uid))
                if u not in mentioned:
                    mentioned.append(u)
        mid = snowflake()
        data: dict[str, Any] = {
            "id": str(mid),
            "channel_id": str(ch.id),
            "author": author.to_dict(),
            "content": content,
            "timestamp": iso_now(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": mention_everyone,
            "mentions": [],
            "mention_roles": [],
            "attachments": [],
            "embeds": [],
            "components": [],
            "pinned": False,
            "type": 0,
            "flags": 0,
        }
        if ch.guild_id is not None:
            data["guild_id"] = str(ch.guild_id)
            member = self.guild.member(author)
            if member is not None:
                data["member"] = self.guild.member_dict(member, with_user=False)
            for u in mentioned:
                md = dict(u.to_dict())
                m = self.guild.member(u)
                if m is not None:
                    md["member"] = self.guild.member_dict(m, with_user=False)
                data["mentions"].append(md)
        else:
            data["mentions"] = [u.to_dict() for u in mentioned]
        if reference is not None:
            ref_id = reference if isinstance(reference, int) else int(reference["id"])
            data["message_reference"] = {"message_id": str(ref_id), "channel_id": str(ch.id)}
            if ref_id in self.messages:
                data["referenced_message"] = self.messages[ref_id]
            data["type"] = 19
        start = self.mark()
        await self.dispatch("MESSAGE_CREATE", data, guild_id=ch.guild_id)
        return MessageHandle(self, mid, ch, data, start)

    async def send_dm(self, content: str, *, user: FakeUser | str = "alice") -> MessageHandle:
        """A user sends the bot a direct message."""
        u = self._resolve_user(user)
        return await self.send_message(content, user=u, channel=self.world.dm_channel(u))

    def _interaction_payload(
        self, type_: int, data: dict, user: FakeUser, ch: FakeChannel, message: dict | None = None
    ) -> _Interaction:
        iid = snowflake()
        token = f"itok.{secrets.token_urlsafe(24)}"
        p: dict[str, Any] = {
            "id": str(iid),
            "application_id": str(self.application_id),
            "type": type_,
            "data": data,
            "token": token,
            "version": 1,
            "locale": "en-US",
            "entitlements": [],
            "attachment_size_limit": 8 * 1024 * 1024,
            "channel_id": str(ch.id),
            "channel": ch.to_dict(),
        }
        if ch.guild_id is None:
            p["user"] = user.to_dict()
            p["context"] = 1  # BOT_DM
            p["authorizing_integration_owners"] = {"0": str(user.id)}
            p["app_permissions"] = str(discord.Permissions.text().value)
        else:
            member = self.guild.member(user)
            if member is None:
                member = FakeMember(user)
            p["guild_id"] = str(ch.guild_id)
            p["guild"] = {"id": str(ch.guild_id), "locale": "en-US", "features": []}
            p["guild_locale"] = "en-US"
            p["member"] = self.guild.member_dict(member, channel=ch)
            p["context"] = 0  # GUILD
            p["authorizing_integration_owners"] = {"0": str(ch.guild_id)}
            p["app_permissions"] = str(self.guild.permissions_of(self.bot_user, ch))
        if message is not None:
            p["message"] = message
        it = _Interaction(iid, token, p, user, ch)
        self._interactions[token] = it
        return it

    def _find_command(self, name: str, guild_id: int | None) -> dict:
        pools = ([self.commands.get(guild_id, [])] if guild_id is not None else []) + [
            self.commands.get(None, [])
        ]
        for pool in pools:
            for cmd in pool:
                if cmd["name"] == name and cmd.get("type", 1) == 1:
                    return cmd
        known = sorted({c["name"] for pool in pools for c in pool})
        raise LookupError(
            f"/{name} is not registered with the fake Discord (synced: {known}); did the bot sync?"
        )

    def _build_options(self, defs: list[dict], values: dict[str, Any], resolved: dict) -> list[dict]:
        by_name = {o["name"]: o for o in defs}
        out = []
        for name, value in values.items():
            if value is None:
                continue
            if name not in by_name:
                raise ValueError(f"unknown option {name!r}; the command has {sorted(by_name)}")
            opt_type = by_name[name]["type"]
            out.append(
                {"name": name, "type": opt_type, "value": self._option_value(opt_type, value, resolved)}
            )
        missing = [o["name"] for o in defs if o.get("required") and o["name"] not in values]
        if missing:
            raise ValueError(f"missing required options {missing}")
        return out

    def _option_value(self, opt_type: int, value: Any, resolved: dict) -> Any:
        if opt_type == CHANNEL:
            ch = self.channel(value)
            resolved.setdefault("channels", {})[str(ch.id)] = {
                **ch.to_dict(),
                "permissions": str(self.guild.permissions_of(self.bot_user, ch)),
            }
            return str(ch.id)
        if opt_type == MENTIONABLE and isinstance(value, FakeRole):
            opt_type = ROLE
        if opt_type in (USER, MENTIONABLE):
            u = self._resolve_user(value)
            resolved.setdefault("users", {})[str(u.id)] = u.to_dict()
            m = self.guild.member(u)
            if m is not None:
                resolved.setdefault("members", {})[str(u.id)] = self.guild.member_dict(m, with_user=False)
            return str(u.id)
        if opt_type == ROLE:
            role = self.guild.role(value) if isinstance(value, str) else value
            resolved.setdefault("roles", {})[str(role.id)] = role.to_dict()
            return str(role.id)
        if opt_type == INTEGER:
            return int(value)
        if opt_type == NUMBER:
            return float(value)
        if opt_type == BOOLEAN:
            return bool(value)
        return value

    async def slash(
        self,
        command: str,
        options: dict[str, Any] | None = None,
        *,
        user: FakeUser | str = "alice",
        channel: FakeChannel | str | int = "general",
        dm: bool = False,
        **kw_options: Any,
    ) -> InteractionHandle:
        """A user runs a slash command: ``slash("ask", question="...")``, ``slash("tutor reindex")``.

        Subcommands are space-separated. Option names that are not identifiers go in ``options``.
        The command must have been synced by the bot; option types come from the synced schema.
        """
        u = self._resolve_user(user)
        ch = self.world.dm_channel(u) if dm else self.channel(channel)
        values = {**(options or {}), **kw_options}
        parts = command.strip().lstrip("/").split()
        cmd = self._find_command(parts[0], ch.guild_id)
        resolved: dict = {}
        defs = cmd.get("options", [])
        chain: list[tuple[str, int]] = []
        for sub in parts[1:]:
            node = next(
                (o for o in defs if o["name"] == sub and o["type"] in (SUB_COMMAND, SUB_COMMAND_GROUP)), None
            )
            if node is None:
                raise LookupError(f"/{command}: no subcommand {sub!r} in {[o['name'] for o in defs]}")
            chain.append((sub, node["type"]))
            defs = node.get("options", [])
        leaf = self._build_options(defs, values, resolved)
        opts: list[dict] = leaf
        for name, t in reversed(chain):
            opts = [{"name": name, "type": t, "options": opts}]
        data: dict[str, Any] = {"id": cmd["id"], "name": cmd["name"], "type": 1, "options": opts}
        if cmd.get("guild_id"):
            data["guild_id"] = cmd["guild_id"]
        if resolved:
            data["resolved"] = resolved
        start = self.mark()
        it = self._interaction_payload(2, data, u, ch)
        await self.dispatch("INTERACTION_CREATE", it.payload, guild_id=ch.guild_id)
        return InteractionHandle(self, it, start)

    def message(self, message: dict | int | str | Recorded) -> dict:
        """The fake's current copy of a message the bot sent (by id, payload or recorded request)."""
        if isinstance(message, Recorded):
            message = message.response
        mid = int(message["id"]) if isinstance(message, dict) else int(message)
        try:
            return self.messages[mid]
        except KeyError:
            raise KeyError(f"the bot never sent message {mid} (or it was deleted)") from None

    def messages_in(self, channel: FakeChannel | str | int) -> list[dict]:
        """The bot's messages in a channel as they are now (edits applied, deleted ones gone), oldest first."""
        cid = str(self.channel(channel).id)
        return [m for _, m in sorted(self.messages.items()) if m["channel_id"] == cid]

    @staticmethod
    def components_of(message: dict) -> list[dict]:
        """Every interactive component in a message, flattened out of rows and containers."""
        out: list[dict] = []

        def walk(items: list[dict]) -> None:
            for c in items:
                if "components" in c:
                    walk(c["components"])
                if "accessory" in c:
                    walk([c["accessory"]])
                if c.get("type") in (2, 3, 5, 6, 7, 8) and "custom_id" in c:
                    out.append(c)

        walk(message.get("components", []))
        return out

    def find_button(
        self, message: dict | int | str | Recorded, *, label: str | None = None, emoji: str | None = None
    ) -> dict:
        msg = self.message(message)
        for c in self.components_of(msg):
            if label is not None and c.get("label") != label:
                continue
            if emoji is not None and (c.get("emoji") or {}).get("name") != emoji:
                continue
            return c
        raise LookupError(f"no button label={label!r} emoji={emoji!r} in {self.components_of(msg)}")

    async def click(
        self,
        message: dict | int | str | Recorded,
        custom_id: str | None = None,
        *,
        user: FakeUser | str = "alice",
        label: str | None = None,
        emoji: str | None = None,
        check: bool = True,
    ) -> InteractionHandle:
        """A user clicks a button of a message the bot sent (by ``custom_id``, ``label`` or ``emoji``).

        ``check=False`` sends the click even if the message has no such button (a stale or forged click).
        """
        u = self._resolve_user(user)
        msg = self.message(message)
        if custom_id is None:
            custom_id = self.find_button(msg, label=label, emoji=emoji)["custom_id"]
        if check:
            comp = next((c for c in self.components_of(msg) if c.get("custom_id") == custom_id), None)
            if comp is None:
                raise LookupError(
                    f"message {msg['id']} has no component {custom_id!r}: {self.components_of(msg)}"
                )
            if comp.get("disabled"):
                raise LookupError(f"button {custom_id!r} is disabled: Discord would not send this click")
        ch = self.channel(int(msg["channel_id"]))
        start = self.mark()
        it = self._interaction_payload(3, {"custom_id": custom_id, "component_type": 2}, u, ch, message=msg)
        await self.dispatch("INTERACTION_CREATE", it.payload, guild_id=ch.guild_id)
        return InteractionHandle(self, it, start)

    async def select(
        self,
        message: dict | int | str | Recorded,
        custom_id: str,
        values: list[str],
        *,
        user: FakeUser | str = "alice",
    ) -> InteractionHandle:
        """A user picks ``values`` in a string select menu of a message the bot sent."""
        u = self._resolve_user(user)
        msg = self.message(message)
        ch = self.channel(int(msg["channel_id"]))
        start = self.mark()
        data = {"custom_id": custom_id, "component_type": 3, "values": values}
        it = self._interaction_payload(3, data, u, ch, message=msg)
        await self.dispatch("INTERACTION_CREATE", it.payload, guild_id=ch.guild_id)
        return InteractionHandle(self, it, start)

    async def submit_modal(
        self,
        modal: ModalRecord | InteractionHandle,
        values: dict[str, str] | None = None,
        *,
        user: FakeUser | str | None = None,
    ) -> InteractionHandle:
        """Submit a modal the bot opened; ``values`` maps a text input's custom_id or label to its text."""
        if isinstance(modal, InteractionHandle):
            modal = await modal.modal()
        values = values or {}
        u = self._resolve_user(user) if user is not None else modal.user

        def answer(comp: dict, label: str | None) -> dict:
            cid = comp.get("custom_id")
            text = values.get(cid, values.get(label or comp.get("label") or "", ""))
            return {"type": comp.get("type", 4), "custom_id": cid, "value": text}

        submitted = []
        for row in modal.components:
            if row.get("type") == 1:
                submitted.append(
                    {"type": 1, "components": [answer(c, None) for c in row.get("components", [])]}
                )
            elif row.get("type") == 18:  # Label wrapping one component
                submitted.append({"type": 18, "component": answer(row["component"], row.get("label"))})
        start = self.mark()
        data = {"custom_id": modal.custom_id, "components": submitted}
        it = self._interaction_payload(5, data, u, modal.channel)
        await self.dispatch("INTERACTION_CREATE", it.payload, guild_id=modal.channel.guild_id)
        return InteractionHandle(self, it, start)


class _HTTPError(Exception):
    def __init__(self, status: int, code: int, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class InteractionHandle:
    """An interaction the test injected, and helpers to await the bot's responses to it."""

    def __init__(self, fake: FakeDiscord, it: _Interaction, start: int):
        self.fake = fake
        self._it = it
        self.id = it.id
        self.token = it.token
        self.payload = it.payload
        self.start = start

    def _is_mine(self, r: Recorded) -> bool:
        return self.token in r.path

    def requests(self) -> list[Recorded]:
        """Every REST call the bot made with this interaction's token so far."""
        return self.fake.find(after=self.start, predicate=self._is_mine)

    async def callback(self, *, timeout: float = 5.0, ok: bool | None = True) -> Recorded:
        """The initial response (POST .../callback); ``json["type"]``: 4 message, 5 deferred, 7 update, 9 modal."""
        return await self.fake.wait_for(
            "POST",
            rf"^/interactions/{self.id}/{re.escape(self.token)}/callback$",
            after=self.start,
            timeout=timeout,
            ok=ok,
        )

    async def followup(self, n: int = 1, *, timeout: float = 5.0) -> Recorded:
        """The ``n``-th follow-up message (POST /webhooks/{app}/{token}) that succeeded."""
        return await self.fake.wait_for(
            "POST",
            rf"^/webhooks/\d+/{re.escape(self.token)}$",
            after=self.start,
            timeout=timeout,
            ok=True,
            count=n,
        )

    async def edit(self, n: int = 1, *, timeout: float = 5.0) -> Recorded:
        """The ``n``-th successful edit of the original response (PATCH .../messages/@original)."""
        return await self.fake.wait_for(
            "PATCH",
            rf"^/webhooks/\d+/{re.escape(self.token)}/messages/@original$",
            after=self.start,
            timeout=timeout,
            ok=True,
            count=n,
        )

    async def reply(self, *, timeout: float = 5.0) -> dict:
        """The payload of the first visible message the bot produced for this interaction.

        That is a callback of type 4 (or 7), else the first follow-up or edit of the original after
        a deferral. Returns the JSON the bot sent (``content``, ``embeds``, ``components``, ``flags``,
        ``allowed_mentions``); ``fake.message(handle.original_id)`` has the message as stored.
        """

        def visible(r: Recorded) -> bool:
            if not self._is_mine(r) or not (200 <= r.status < 300):
                return False
            if r.method == "POST" and r.path.endswith("/callback"):
                return (r.json or {}).get("type") in (4, 7)
            return (r.method == "POST" and r.path.startswith("/webhooks/")) or (
                r.method == "PATCH" and r.path.endswith("/@original")
            )

        rec = await self.fake.wait_for(after=self.start, timeout=timeout, predicate=visible)
        if rec.path.endswith("/callback"):
            return rec.json.get("data") or {}
        return rec.json or {}

    async def modal(self, *, timeout: float = 5.0) -> ModalRecord:
        """The modal the bot opened in answer (callback type 9)."""
        await self.fake.wait_for(
            "POST",
            rf"^/interactions/{self.id}/{re.escape(self.token)}/callback$",
            after=self.start,
            timeout=timeout,
            ok=True,
            predicate=lambda r: (r.json or {}).get("type") == 9,
        )
        return next(m for m in reversed(self.fake.modals) if m.interaction_token == self.token)

    @property
    def original_id(self) -> int | None:
        return self._it.original_id

    @property
    def original(self) -> dict:
        """The stored original response message (after deferral: as filled by the follow-up)."""
        assert self._it.original_id is not None, "the bot has not responded with a message yet"
        return self.fake.message(self._it.original_id)


class MessageHandle:
    """A message the test posted as a user, and helpers to await the bot's answer to it."""

    def __init__(self, fake: FakeDiscord, mid: int, channel: FakeChannel, payload: dict, start: int):
        self.fake = fake
        self.id = mid
        self.channel = channel
        self.payload = payload
        self.start = start

    async def reply(self, *, timeout: float = 5.0, referencing: bool = False) -> Recorded:
        """The bot's next message in this channel (``referencing=True``: only a reply to this message)."""

        def mine(r: Recorded) -> bool:
            if not referencing:
                return True
            ref = (r.json or {}).get("message_reference") or {}
            return str(ref.get("message_id")) == str(self.id)

        return await self.fake.wait_for(
            "POST",
            rf"^/channels/{self.channel.id}/messages$",
            after=self.start,
            timeout=timeout,
            ok=True,
            predicate=mine,
        )

    async def typing(self, *, timeout: float = 5.0) -> Recorded:
        return await self.fake.wait_for(
            "POST", rf"^/channels/{self.channel.id}/typing$", after=self.start, timeout=timeout
        )
