"""Calls to the Hugging Face hub with a time limit, and their failures as one line.

huggingface_hub's shared HTTP client has no time limit, and some of its calls (the
`model_info` that `snapshot_download` starts with) pass none either, so a hub that
accepts the connection and never answers held the command forever. `configure()`
fixes that for every request of that client, which transformers and datasets use too:

- each wait left without a limit (connecting, waiting for an answer) gets one:
  $HF_HUB_DOWNLOAD_TIMEOUT seconds (huggingface_hub's own setting, 10 by default),
  per wait, not per download, so a large file still downloads at any steady speed;
- once the hub has not answered in time, or its name did not resolve (no network, no
  DNS), every later request of the process fails at once as if HF_HUB_OFFLINE=1 were set
  (`HubTimeout`, an `OfflineModeIsEnabled`), so the libraries fall back on their caches,
  or fail, without retrying: their retries (six more waits, with pauses) would otherwise
  keep a command waiting for minutes, or 25 s on a machine without a network.

`explain(err, what, fix)` turns a hub failure into one `HsdError` line; when the hub
did not answer in time (or could not be reached) the line names the two ways to go on
without it: HF_HUB_OFFLINE=1 (files already in the cache) and local files or folders.
"""

from __future__ import annotations

import functools
import os

from hsd_jax.errors import HsdError

DEFAULT_TIMEOUT = 10.0  # seconds, huggingface_hub's own default for its downloads

_configured = False


def wait_limit() -> float:
    """The limit on each wait for the hub: $HF_HUB_DOWNLOAD_TIMEOUT, else 10 s."""
    try:
        value = float(os.environ.get("HF_HUB_DOWNLOAD_TIMEOUT", DEFAULT_TIMEOUT))
    except ValueError:
        return DEFAULT_TIMEOUT
    return value if value > 0 else DEFAULT_TIMEOUT


def offline() -> bool:
    """Whether the user set HF_HUB_OFFLINE (huggingface_hub's reading of it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def configure() -> None:
    """Gives huggingface_hub's shared client the time limit and the stop after a silent hub
    (see the module doc); once per process.

    Only the waits a call left without a limit get one: a limit a call sets itself stays.
    A client factory the user installed is kept (its clients get the same treatment).
    """
    global _configured
    if _configured:
        return
    _configured = True
    try:
        from huggingface_hub.utils import _http
    except ImportError:
        return
    if hasattr(_http, "set_client_factory"):  # huggingface_hub 1.x and later: httpx clients
        factory = getattr(_http, "_GLOBAL_CLIENT_FACTORY", None) or _http.default_client_factory

        def limited_client():
            client = factory()
            hooks = client.event_hooks
            client.event_hooks = {**hooks, "request": [*hooks.get("request", []), _limit_waits]}
            client.send = _stop_after_silence(client.send)  # Client.request and .stream go through send
            return client

        _http.set_client_factory(limited_client)  # also closes a client made before, without the limit
    elif hasattr(_http, "configure_http_backend"):  # huggingface_hub 0.x: requests sessions
        import requests

        class LimitedAdapter(requests.adapters.HTTPAdapter):
            def send(self, request, timeout=None, **kwargs):  # noqa: D401 - requests' signature
                return super().send(request, timeout=timeout or wait_limit(), **kwargs)

        def limited_session():
            session = requests.Session()
            session.mount("http://", LimitedAdapter())
            session.mount("https://", LimitedAdapter())
            return session

        _http.configure_http_backend(backend_factory=limited_session)


def _limit_waits(request) -> None:
    """httpx request hook: each wait the request was given no limit for gets `wait_limit()`."""
    waits = dict(request.extensions.get("timeout") or {})
    limit = wait_limit()
    for key in ("connect", "read", "write", "pool"):
        if waits.get(key) is None:
            waits[key] = limit
    request.extensions["timeout"] = waits


# Once the hub has failed so: [(its address, what happened)], which stops every later request.
_silent: list[tuple[str, str]] = []
# getaddrinfo's words for a name that does not resolve (glibc, musl, macOS, Windows).
_UNRESOLVED = ("name or service not known", "temporary failure in name resolution", "nodename nor servname",
               "no address associated with hostname", "getaddrinfo failed", "name does not resolve")


@functools.cache
def _hub_timeout_class():
    from huggingface_hub.errors import OfflineModeIsEnabled

    class HubTimeout(OfflineModeIsEnabled):
        """The hub did not answer in time earlier in this process: this request is not sent.
        An OfflineModeIsEnabled, so libraries fall back on their caches as when offline."""

    return HubTimeout


def _stop_after_silence(send):
    """`Client.send` that, once a request has timed out, fails every later one at once."""
    def send_or_stop(request, *args, **kwargs):
        if _silent:
            address, what = _silent[0]
            raise _hub_timeout_class()(f"not sent: {address} {what} earlier in this run, so it is treated as "
                                       "offline (HF_HUB_OFFLINE=1)")
        try:
            return send(request, *args, **kwargs)
        except Exception as err:
            # Only a wait as long as ours counts: a library's own quick probe (huggingface_hub asks
            # /api/agent-harnesses with 3 s) may time out where the real requests would not.
            waits = request.extensions.get("timeout") or {}
            waited = max((w for w in waits.values() if w is not None), default=0)
            address = f"{request.url.scheme}://{request.url.netloc.decode()}"
            if "Timeout" in type(err).__name__ and waited >= wait_limit():
                _silent.append((address, f"did not answer within {wait_limit():g} s"))
            elif unresolved(err):
                _silent.append((address, "could not be found (its name did not resolve: no network or DNS)"))
            raise

    return send_or_stop


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def unreachable(err: BaseException) -> bool:
    """Whether `err` (or what caused it) is the hub not answering in time or not being reached."""
    for e in _chain(err):
        name = type(e).__name__
        if isinstance(e, (TimeoutError, ConnectionError)) or "Timeout" in name or name in (
                "ConnectError", "ConnectionError", "NetworkError", "ReadError", "RemoteProtocolError"):
            return True
        if "LocalEntryNotFoundError" in name and ("connection" in str(e).lower() or "timed out" in str(e).lower()):
            return True
    return False


def unresolved(err: BaseException) -> bool:
    """Whether `err` (or what caused it) is a host name that did not resolve."""
    return any(word in str(e).lower() for e in _chain(err) for word in _UNRESOLVED)


def timed_out(err: BaseException) -> bool:
    return any("Timeout" in type(e).__name__ or isinstance(e, TimeoutError) for e in _chain(err))


def explain(err: BaseException, what: str, fix: str) -> HsdError:
    """One line for a hub failure while fetching `what`; `fix` says how to do without the hub
    (e.g. "pass a local folder as --model"). A hub that did not answer in time, or could not
    be reached, gets the offline advice: HF_HUB_OFFLINE=1 for files already in the cache."""
    first_line = (str(err).splitlines() or [""])[0]  # hub errors add paragraphs of advice: one line here
    if offline() and not _silent and any(type(e).__name__ in ("LocalEntryNotFoundError", "OfflineModeIsEnabled")
                                         or "OfflineModeIsEnabled" in str(e)  # datasets names it in its text
                                         for e in _chain(err)):  # the hub was not asked: the cache had no copy
        return HsdError(f"HF_HUB_OFFLINE is set and {what} is not in the hub cache ({type(err).__name__}: "
                        f"{first_line}); {fix}, or unset HF_HUB_OFFLINE to fetch it")
    if _silent or unreachable(err):
        failed = _silent[0][1] if _silent else f"did not answer within {wait_limit():g} s" if timed_out(err) \
            else "could not be reached"
        return HsdError(f"the Hugging Face hub ({endpoint()}) {failed} while fetching {what} ({type(err).__name__}: "
                        f"{first_line}); to work without it, set HF_HUB_OFFLINE=1 if the files are in the hub "
                        f"cache already, or {fix}")
    return HsdError(f"could not fetch {what} from the Hugging Face hub ({type(err).__name__}: {first_line}); "
                    f"check the id and your network, or {fix}")
