"""Who may call what: API keys for inference and feedback, an admin key for ``/admin``.

Keys are kept only as SHA-256 digests. A presented key is hashed once and compared with
``hmac.compare_digest`` against every configured digest, with no early exit, so the time
taken does not say which key (or which prefix) matched — the fix vLLM shipped for its
timing-attack advisory. Keys are compared byte for byte (never case-folded) and never logged;
the store records the key's id.

Without any key configured, only loopback clients are served: a gateway is never open to the
network by accident. Trusting loopback alone would let a web page in the user's own browser
reach the gateway through a DNS-rebinding domain (its requests come from 127.0.0.1 but name
the attacker's host), so in that mode a request must also name a loopback host (``Host:
localhost``, ``*.localhost``, a loopback address) or one of ``ALIGNGATE_ALLOWED_HOSTS`` — the
rule Ollama adopted after its rebinding advisory.

Owns: key parsing, the comparison, and the ASGI middleware that guards every route except an
explicit allowlist. Does not know: routes' work, the store.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import error_body
from server.guards import cross_site

MIN_KEY_CHARS = 16
ADMIN_KEY_ID = "admin"
LOOPBACK_KEY_ID = "loopback"
METRICS_KEY_ID = "metrics"
METRICS_PATH = "/metrics"
# Ids no key and no judge may take: the admin, the keyless loopback tenant, the metrics
# scraper, the trust marker and the store's anonymous owner (``store.records.ANONYMOUS_KEY``).
RESERVED_KEY_IDS = frozenset(
    {ADMIN_KEY_ID, LOOPBACK_KEY_ID, METRICS_KEY_ID, "trusted", "anonymous"}
)
# The web UI's pages hold no data (their data calls need a key, as any client's do).
PUBLIC_PATHS = frozenset({"/health", "/ui", "/ui/", "/ui/feedback", "/ui/arena", "/ui/leaderboard"})
PUBLIC_PREFIXES = ("/ui/static/",)  # the web UI's files hold no data


class KeyConfigError(ValueError):
    """A key setting that cannot be used (too short, duplicated, unreadable file)."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    key_id: str
    digest: bytes
    # This key's own limits per minute (the keys file's `rpm=` / `tpm=`); None: the default.
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    # The keys file's `trusted`: the online loop trains on this key's judgments unreviewed.
    trusted: bool = False
    # The keys file's `annotator=NAME`: the label on its feedback when the body gives none.
    annotator: str | None = None


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def key_id_for(key: str) -> str:
    """A stable, non-secret id for a key given without a name (8 bytes of its hash's hash)."""
    return "key-" + hashlib.sha256(digest(key)).hexdigest()[:12]


QUOTA_FIELDS = {"rpm": "requests_per_minute", "tpm": "tokens_per_minute"}


KEY_LINE_FORMS = "`KEY`, `ID KEY` or `ID KEY [rpm=N] [tpm=N] [trusted] [annotator=NAME]`"


# A key's id is stored with every record it makes (the store's ``key_id`` column: 64).
KEY_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:@-]{1,64}$")
KEY_SETTINGS = ("rpm", "tpm", "trusted", "annotator")


def _looks_like_setting(word: str) -> bool:
    return word == "trusted" or word.partition("=")[0] in ("rpm", "tpm", "annotator")


def _key_line(line: str, where: str) -> tuple[str | None, str, dict[str, object]]:
    """``KEY`` | ``ID KEY`` | ``ID KEY rpm=N tpm=N trusted annotator=NAME`` → (id, key,
    settings). Settings come only after the id and the key, so a key may itself hold ``=``.
    Strict: a setting in the key's place, an unknown or repeated setting, or an id the store
    cannot keep is an error naming the line, never a silent misparse. Words that may be a
    key are never echoed."""

    def bad(reason: str) -> KeyConfigError:
        return KeyConfigError(f"{where}: {reason}; expected {KEY_LINE_FORMS}")

    words = line.split()
    if len(words) == 1:
        return None, words[0], {}
    if _looks_like_setting(words[1]) or "=" in words[0]:
        raise bad("a setting where the id or the key belongs; settings come after both")
    if not KEY_ID_PATTERN.match(words[0]):
        raise bad("a key id is 1 to 64 letters, digits or . _ : @ - (the store keeps 64)")
    settings: dict[str, object] = {}
    for word in words[2:]:
        name, sep, value = word.partition("=")
        field = QUOTA_FIELDS.get(name, name)
        if field in settings:
            raise bad(f"{name} is given twice")
        if word == "trusted":
            settings["trusted"] = True
        elif name == "annotator" and sep and value:
            settings["annotator"] = value
        elif name in QUOTA_FIELDS and sep and value.isascii() and value.isdigit():
            settings[field] = int(value)
        elif name in KEY_SETTINGS:
            raise bad(
                "annotator=NAME needs a name"
                if name == "annotator"
                else f"{name}=N takes a whole N ≥ 0 (0: this key is not limited)"
                if name in QUOTA_FIELDS
                else "trusted takes no value"
            )
        elif sep and name.isalpha() and len(name) < MIN_KEY_CHARS:
            raise bad(f"unknown setting {name!r}")
        else:
            # Not echoed: a misplaced word may be a key.
            raise bad("a word that is not a setting")
    return words[0], words[1], settings


def parse_keys(inline: str | None, keys_file: Path | None) -> list[ApiKey]:
    """``ALIGNGATE_API_KEYS`` (comma-separated keys) and ``ALIGNGATE_API_KEYS_FILE`` (one key a
    line: ``KEY``, ``ID KEY``, or ``ID KEY`` followed by the key's own limits ``rpm=N``
    ``tpm=N``, ``trusted`` and ``annotator=NAME``; ``#`` comments)."""
    entries: list[tuple[str | None, str, dict[str, object]]] = []
    if inline:
        entries += [(None, k.strip(), {}) for k in inline.split(",") if k.strip()]
    if keys_file is not None:
        try:
            lines = keys_file.read_text().splitlines()
        except OSError as exc:
            raise KeyConfigError(f"cannot read the API keys file {keys_file}: {exc}") from exc
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if line and not line.startswith("#"):
                entries.append(_key_line(line, f"{keys_file}:{number}"))
    keys, seen_ids, seen = [], set(), set()
    for name, key, settings in entries:
        if len(key) < MIN_KEY_CHARS:
            raise KeyConfigError(f"an API key is shorter than {MIN_KEY_CHARS} characters")
        key_id = name or key_id_for(key)
        if key_id in seen_ids or key in seen or key_id in RESERVED_KEY_IDS:
            raise KeyConfigError(f"API key id {key_id!r} is used twice or reserved")
        seen_ids.add(key_id)
        seen.add(key)
        keys.append(ApiKey(key_id, digest(key), **settings))  # type: ignore[arg-type]
    return keys


def check_judge_key_ids(judge_key_ids: Mapping[str, str], keys: Iterable[ApiKey]) -> None:
    """A judge's verdicts are stored under its key id (``judge_key_ids``: judge name → id):
    one equal to an API key's id or a reserved id would let that key's holder pass as the
    judge, or the judge as the key. Refused at start, naming both."""
    key_ids = {key.key_id for key in keys}
    for judge, key_id in judge_key_ids.items():
        if key_id in RESERVED_KEY_IDS:
            raise KeyConfigError(
                f"judge {judge!r}: its key id {key_id!r} is reserved "
                f"({', '.join(sorted(RESERVED_KEY_IDS))}); give it another key_id"
            )
        if key_id in key_ids:
            raise KeyConfigError(
                f"judge {judge!r}: its key id {key_id!r} is also the id of an API key; "
                "give the judge another key_id or the key another id"
            )


def trusted_key_ids(keys: Iterable[ApiKey]) -> list[str]:
    """The keys marked ``trusted`` in the keys file."""
    return [k.key_id for k in keys if k.trusted]


def quotas(keys: Iterable[ApiKey], field: str) -> dict[str, int]:
    """The keys that have their own limit for ``field`` (``requests_per_minute`` /
    ``tokens_per_minute``), by key id."""
    return {k.key_id: getattr(k, field) for k in keys if getattr(k, field) is not None}


class KeyRing:
    def __init__(
        self, user_keys: Iterable[ApiKey], admin_key: str | None, metrics_key: str | None = None
    ):
        self.user_keys = list(user_keys)
        for name, key in (("admin", admin_key), ("metrics", metrics_key)):
            if key is not None and len(key) < MIN_KEY_CHARS:
                raise KeyConfigError(f"the {name} key is shorter than {MIN_KEY_CHARS} characters")
        self._admin = digest(admin_key) if admin_key is not None else None
        # A key that opens /metrics and nothing else (a Prometheus scraper's).
        self._metrics = digest(metrics_key) if metrics_key is not None else None

    def is_metrics(self, presented: str) -> bool:
        if self._metrics is None:
            return False
        return hmac.compare_digest(digest(presented), self._metrics)

    @property
    def admin_unset(self) -> bool:
        return self._admin is None

    def identify(self, presented: str) -> ApiKey | None:
        """The user key ``presented`` is, comparing with every key (no early exit)."""
        given = digest(presented)
        found = None
        for key in self.user_keys:
            match = hmac.compare_digest(given, key.digest)
            found = key if match else found
        return found

    def by_id(self, key_id: str) -> ApiKey:
        return next(k for k in self.user_keys if k.key_id == key_id)

    def is_admin(self, presented: str) -> bool:
        if self._admin is None:
            return False
        return hmac.compare_digest(digest(presented), self._admin)


def tenant_of(key_id: str | None) -> str | None:
    """Whose stored completions and feedback a caller sees: its own key id's; the admin
    key's: everyone's (None). Keyless loopback mode is one tenant (``loopback``)."""
    return None if key_id == ADMIN_KEY_ID else key_id


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


def request_host(scope: Scope) -> str | None:
    """The ``Host`` header's name without its port, lower-cased (None: no header)."""
    for name, value in scope.get("headers", []):
        if name == b"host":
            host = value.decode("latin-1").strip().lower()
            if host.startswith("["):  # [::1]:8000
                return host[1 : host.find("]")] if "]" in host else host
            return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return None


def is_loopback_name(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):  # RFC 6761
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_allowed_hosts(value: str) -> frozenset[str]:
    return frozenset(h.strip().lower() for h in value.split(",") if h.strip())


def is_loopback(scope: Scope) -> bool:
    client = scope.get("client")
    host = client[0] if client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class AuthMiddleware:
    """Guards every HTTP route: ``/admin/*`` needs the admin key, everything else a user key
    (or the admin key); ``PUBLIC_PATHS`` (and ``/metrics`` when public) need none."""

    def __init__(
        self,
        app: ASGIApp,
        keys: KeyRing,
        metrics_public: bool,
        allowed_hosts: frozenset[str] = frozenset(),
    ):
        self.app = app
        self.keys = keys
        self.public = PUBLIC_PATHS | ({"/metrics"} if metrics_public else set())
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path in self.public or path.startswith(PUBLIC_PREFIXES):
            await self.app(scope, receive, send)
            return
        if path == METRICS_PATH and self._metrics_scraper(scope):
            scope.setdefault("state", {})["key_id"] = METRICS_KEY_ID
            await self.app(scope, receive, send)
            return
        # /metrics counts every tenant's traffic by model and key: an operator's view (the
        # admin key, or the metrics key above), never a tenant's.
        admin_route = path == "/admin" or path.startswith("/admin/") or path == METRICS_PATH
        key_id, refusal, annotator = self._decide(scope, admin_route)
        if key_id == LOOPBACK_KEY_ID and not self._host_allowed(scope):
            refusal = (403, self._host_refusal(scope))
        elif key_id == LOOPBACK_KEY_ID and (other_site := cross_site.refusal(scope)):
            refusal = (403, other_site)
        if refusal is not None:
            status, message = refusal
            await _refuse(send, status, message)
            return
        state = scope.setdefault("state", {})
        state["key_id"] = key_id
        state["annotator"] = annotator
        await self.app(scope, receive, send)

    def _metrics_scraper(self, scope: Scope) -> bool:
        token = bearer_token(scope)
        return token is not None and self.keys.is_metrics(token)

    def _host_allowed(self, scope: Scope) -> bool:
        """Trust from loopback alone also needs a loopback (or allowed) ``Host``; a request
        without one cannot come from a browser."""
        host = request_host(scope)
        if host is None or "*" in self.allowed_hosts:
            return True
        return is_loopback_name(host) or host in self.allowed_hosts

    @staticmethod
    def _host_refusal(scope: Scope) -> str:
        return (
            f"Host {request_host(scope)!r} is not a loopback name. Without keys this gateway "
            "trusts loopback clients, so it refuses other Host headers (a web page could "
            "reach it by DNS rebinding); add the name to ALIGNGATE_ALLOWED_HOSTS or "
            "configure keys."
        )

    def _decide(
        self, scope: Scope, admin_route: bool
    ) -> tuple[str | None, tuple[int, str] | None, str | None]:
        """(key id, refusal, the key's annotator name)."""
        key_id, refusal = self._decide_key(scope, admin_route)
        annotator = None
        if key_id is not None and key_id not in (ADMIN_KEY_ID, LOOPBACK_KEY_ID):
            annotator = self.keys.by_id(key_id).annotator
        return key_id, refusal, annotator

    def _decide_key(
        self, scope: Scope, admin_route: bool
    ) -> tuple[str | None, tuple[int, str] | None]:
        token = bearer_token(scope)
        if token is not None and self.keys.is_admin(token):
            return ADMIN_KEY_ID, None
        if admin_route:
            if self.keys.admin_unset:
                if is_loopback(scope):
                    return LOOPBACK_KEY_ID, None
                return None, (
                    401,
                    "Admin routes answer loopback clients only unless "
                    "ALIGNGATE_ADMIN_KEY is set on the server.",
                )
            if token is None:
                return None, (401, "The admin key is required (Authorization: Bearer …).")
            if self.keys.identify(token) is not None:
                return None, (403, "This route needs the admin key; an API key does not open it.")
            return None, (401, "Incorrect API key provided.")
        if not self.keys.user_keys:
            # No API keys configured: loopback clients only (whatever token they send, as
            # OpenAI clients always send one).
            if is_loopback(scope):
                return LOOPBACK_KEY_ID, None
            return None, (
                401,
                "No API keys are configured (ALIGNGATE_API_KEYS); this gateway "
                "serves loopback clients only.",
            )
        if token is None:
            return None, (401, "An API key is required (Authorization: Bearer …).")
        user = self.keys.identify(token)
        if user is None:
            return None, (401, "Incorrect API key provided.")
        return user.key_id, None


async def _refuse(send: Send, status: int, message: str) -> None:
    error_type = "authentication_error" if status == 401 else "permission_error"
    code = "invalid_api_key" if status == 401 else "admin_key_required"
    if message.startswith("Host "):
        code = "host_not_allowed"
    elif message.startswith("Cross-site "):
        code = "cross_site_request"
    body = json.dumps(error_body(message, error_type, None, code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
