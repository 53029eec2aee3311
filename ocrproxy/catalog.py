"""The models each upstream lists, kept for a minute: an OCR request for a model its upstream
does not list is refused (404) before any image is fetched or read.

Theory of operation: an upstream's list is its ``GET /v1/models`` answer, as ids. ``GET
/v1/models`` (``models.serve``) stores every list it fetches; an OCR request whose upstream's
list is not known (or no longer fresh) fetches it first, with a short timeout
(``FETCH_TIMEOUT_S``), and concurrent requests share that one fetch. A list is kept for
``MODEL_LIST_TTL_S``; a failed fetch (an error, a timeout, a status other than 200, an empty
list) means "unknown" and is kept too, for ``FAILURE_TTL_S``, so that an upstream whose
``/v1/models`` is down costs one request in that while a wait, not every request.

A false 404 costs more than a wasted OCR call, so a model counts as listed when an id is the
model ignoring case, starts with the model and ``-`` or ``:`` (Anthropic lists dated ids,
``claude-sonnet-4-5-20250929``, and accepts ``claude-sonnet-4-5``; Ollama lists
``llama3:latest`` and accepts ``llama3``), or ends with ``/`` and the model (Gemini lists
``models/gemini-2.5-flash``); the same for the model without a routing tag (OpenRouter's
``deepseek/deepseek-chat:nitro``) and without a release alias's ``-latest`` or ``-0``
(``claude-3-7-sonnet-latest``, ``claude-sonnet-4-0``). Only a known list that has none of
these refuses the model, and ``[[upstreams]] check_models = false`` turns the check off for an
upstream.

The list is fetched with the credentials ``models.serve`` would use (and, for a request's
check, none of that request's other headers: ``models.LIST_HEADERS``): the upstream's own key,
or in relay mode (no ``[auth] keys``, the upstream has no ``api_key``) the client's, whose
account may see other models than another key's. So in relay mode the list is kept per
client credential (its digest, and the account headers relayed with it), and a list one key
fetched never decides for another; at most ``MAX_ENTRIES`` lists are kept (relay-mode
clients choose their keys), the oldest going first.

A fetch runs as a task of the catalog, awaited by its requests through ``asyncio.shield``: a
request that goes away does not cancel the fetch that others (or the next request) will use,
and the fetch ends by itself within ``FETCH_TIMEOUT_S``. ``close`` cancels those still running.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from . import config, upstream
from .describe import credential_digest
from .errors import NotFound, ProxyError

log = logging.getLogger("ocrproxy.catalog")

MODEL_LIST_TTL_S = 60.0  # how long a fetched list decides
FAILURE_TTL_S = 10.0  # how long a failed fetch means "unknown" before the next try
FETCH_TIMEOUT_S = 2.0  # an OCR request waits at most this long for its upstream's list
MAX_ENTRIES = 1024

# An upstream and the client's request headers -> the ids it lists, or None if it did not say.
Fetch = Callable[[config.Upstream, Mapping[str, str]], Awaitable[Sequence[str] | None]]
# (the upstream, by identity: names may repeat, and the config holding it outlives the
# catalog; the credential scope: b"" for the upstream's own key)
_Key = tuple[int, bytes]


@dataclass(frozen=True, slots=True)
class Listing:
    """One upstream's list of model ids."""

    folded: frozenset[str]  # the ids, lower-cased

    @classmethod
    def of(cls, ids: Sequence[str]) -> Listing | None:
        """The listing of ``ids``; None (unknown) when there are none."""
        folded = frozenset(i.lower() for i in ids if i)
        return cls(folded) if folded else None

    def has(self, model: str) -> bool:
        """Whether ``model`` is listed, as an alias or under a tag or namespace included."""
        for name in _names(model.lower()):
            if name in self.folded:
                return True
            dash, colon, slash = name + "-", name + ":", "/" + name
            if any(i.startswith((dash, colon)) or i.endswith(slash) for i in self.folded):
                return True
        return False


# An alias's last part that stands for "some dated release": Anthropic's `-latest` and `-0`
# (`claude-3-7-sonnet-latest`, `claude-sonnet-4-0` for `claude-sonnet-4-20250514`).
_RELEASE_ALIAS = re.compile(r"-(?:latest|0)$")


def _names(model: str) -> list[str]:
    """``model`` and the names it may be listed under: without a routing tag (OpenRouter's
    `:nitro`, `:floor`), without a release alias's last part."""
    names = [model]
    base = model.partition(":")[0] if ":" in model else model
    if base != model and base:
        names.append(base)
    bare = _RELEASE_ALIAS.sub("", base)
    if bare != base and bare:
        names.append(bare)
    return names


def scope_of(up: config.Upstream, incoming: Mapping[str, str], *, relay_auth: bool) -> _Key:
    """Whose view of ``up`` a request has: the upstream's own (every client's request goes
    with the same credentials), or in relay mode the client's key and the account headers
    that go with it. What one scope learns about an upstream never decides for another."""
    if not relay_auth or up.api_key:
        return id(up), b""
    account = (incoming.get("OpenAI-Organization", ""), incoming.get("OpenAI-Project", ""))
    credential = upstream.client_credential(incoming) or ""
    return id(up), credential_digest("\0".join((credential, *account)))


class Catalog:
    """Per-upstream model lists, fetched once at a time per upstream and credential."""

    def __init__(
        self,
        fetch: Fetch,
        *,
        relay_auth: bool,
        ttl_s: float = MODEL_LIST_TTL_S,
        failure_ttl_s: float = FAILURE_TTL_S,
        timeout_s: float = FETCH_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self.relay_auth = relay_auth
        self.ttl_s = ttl_s
        self.failure_ttl_s = failure_ttl_s
        self.timeout_s = timeout_s
        self.clock = clock
        self._entries: dict[_Key, tuple[float, Listing | None]] = {}
        self._flights: dict[_Key, asyncio.Task[Listing | None]] = {}

    def _key(self, up: config.Upstream, incoming: Mapping[str, str]) -> _Key:
        return scope_of(up, incoming, relay_auth=self.relay_auth)

    def store(
        self, up: config.Upstream, incoming: Mapping[str, str], ids: Sequence[str] | None
    ) -> Listing | None:
        """Keep what ``up`` listed for the client of ``incoming`` (None: it did not say)."""
        return self._put(self._key(up, incoming), ids)

    def _put(self, key: _Key, ids: Sequence[str] | None) -> Listing | None:
        listing = Listing.of(ids) if ids is not None else None
        ttl = self.ttl_s if listing is not None else self.failure_ttl_s
        self._entries.pop(key, None)  # re-inserted last: the dict's order is the age order
        if len(self._entries) >= MAX_ENTRIES:
            del self._entries[next(iter(self._entries))]
        self._entries[key] = (self.clock() + ttl, listing)
        return listing

    async def listing(self, up: config.Upstream, incoming: Mapping[str, str]) -> Listing | None:
        """What ``up`` lists for this client: kept, or fetched now (at most ``timeout_s``);
        None when that is not known."""
        key = self._key(up, incoming)
        kept = self._entries.get(key)
        if kept is not None and kept[0] > self.clock():
            return kept[1]
        task = self._flights.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fill(key, up, incoming))
            self._flights[key] = task
            task.add_done_callback(lambda done: self._landed(key, done))
        return await asyncio.shield(task)

    def _landed(self, key: _Key, task: asyncio.Task[Listing | None]) -> None:
        if self._flights.get(key) is task:
            del self._flights[key]
        if not task.cancelled():
            task.exception()  # retrieved: no "never retrieved" warning when nobody waits

    async def _fill(
        self, key: _Key, up: config.Upstream, incoming: Mapping[str, str]
    ) -> Listing | None:
        try:
            async with asyncio.timeout(self.timeout_s):
                ids = await self._fetch(up, incoming)
        except Exception as exc:  # whatever went wrong, the list is unknown: never a 500
            if isinstance(exc, TimeoutError):
                reason = "no answer in time"
            else:
                reason = exc.message if isinstance(exc, ProxyError) else type(exc).__name__
            log.info(
                "upstream %s's model list is unknown (%s): model names go unchecked for %g s",
                up.name,
                reason,
                self.failure_ttl_s,
            )
            ids = None
        return self._put(key, ids)

    async def check(
        self, up: config.Upstream, incoming: Mapping[str, str], model: str, typed: str, suffix: str
    ) -> None:
        """Refuse ``model`` (the request's ``typed`` one, suffix taken off) with a 404 if
        ``up`` is known not to list it; let it through when that is not known."""
        if not up.check_models:
            return
        listing = await self.listing(up, incoming)
        if listing is None or listing.has(model):
            return
        if typed != model:
            reason = (
                f"`{model}` is not among the models its upstream lists. OCR variants are the "
                f"listed models plus `{suffix}` (GET /v1/models)."
            )
        else:
            reason = "it is not among the models its upstream lists (GET /v1/models)."
        raise NotFound(
            f"The model `{typed}` does not exist: {reason}", param="model", code="model_not_found"
        )

    async def close(self) -> None:
        """Cancel the fetches still running."""
        flights = list(self._flights.values())
        for task in flights:
            task.cancel()
        await asyncio.gather(*flights, return_exceptions=True)


def requested_as(typed: str, model: str) -> str | None:
    """The note an upstream's 404 for ``model`` gets when the user typed another name."""
    return f" (requested as `{typed}`)" if typed != model else None
