"""Whether a request is a web page's, sent by the browser of someone who visited it.

Without keys the gateway trusts loopback clients, and a browser on the same machine is a
loopback client for any page it shows: a page could post feedback, votes or admin calls to
the local gateway with the user's trust. Browsers say where a request comes from
(``Sec-Fetch-Site``, sent by every current browser; ``Origin`` on every cross-origin POST),
so a state-changing request (any method but GET, HEAD, OPTIONS) another site's page sent is
refused. Clients that are not browsers (curl, SDKs) send neither header and are not
affected; nor are the gateway's own pages (same origin).

A JSON body sent as ``text/plain`` (a form's, sent without a CORS preflight) is never read
as JSON: FastAPI parses JSON only under a JSON content type since 0.65.2 (CVE-2021-32677).

Owns: the decision. Does not know: keys (``auth`` asks only in keyless loopback mode).
"""

from __future__ import annotations

from starlette.types import Scope

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# "same-site" is another origin too (another port on localhost, a sibling subdomain).
ALLOWED_FETCH_SITES = frozenset({"same-origin", "none"})  # none: the user typed it


def refusal(scope: Scope) -> str | None:
    """Why the request is refused as another site's (None: it is not)."""
    if scope.get("method", "GET") in SAFE_METHODS:
        return None
    headers = {
        name.decode("latin-1").lower(): value.decode("latin-1").strip()
        for name, value in scope.get("headers", [])
    }
    fetch_site = headers.get("sec-fetch-site", "").lower()
    origin = headers.get("origin")
    if fetch_site and fetch_site not in ALLOWED_FETCH_SITES:
        return _words(f"Sec-Fetch-Site: {fetch_site}")
    if origin is not None and origin.lower() != own_origin(scope, headers.get("host")):
        return _words(f"Origin: {origin}")
    return None


def own_origin(scope: Scope, host: str | None) -> str:
    """This server's origin as the client addressed it (scheme and ``Host``)."""
    scheme = "https" if scope.get("scheme") in ("https", "wss") else "http"
    return f"{scheme}://{(host or '').lower()}"


def _words(seen: str) -> str:
    return (
        f"Cross-site request refused ({seen}). Without keys this gateway trusts loopback "
        "clients, so it refuses state-changing requests sent by other sites' web pages; "
        "configure keys (ALIGNGATE_API_KEYS) to serve browsers on other origins."
    )
