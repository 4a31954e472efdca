"""An OpenAI-compatible HTTP endpoint (a vLLM server, ``python -m distillery.serve``, a
hosted model): JSON requests with retries, backoff, a rate limit and an API key. The one
HTTP client of the project: the HTTP generator (``distillery.generate backend=http``) and
the remote teacher (``teacher=remote``) both talk through it.

* retried, up to ``max_retries`` times: 408, 429, 5xx, a refused, reset or dropped
  connection, a timeout (``timeout`` seconds per attempt), a body cut short or not JSON.
  Attempt ``k`` (from 0) is followed by a wait of ``backoff * 2**k`` seconds, or longer if
  the server's ``Retry-After`` (seconds or an HTTP date) asks for it. Then a
  :class:`ConnectionError` naming ``<key>.url`` and ``<key>.max_retries``. A
  ``Retry-After`` beyond :data:`MAX_RETRY_AFTER` seconds is not waited for: a training
  step would stall without a word, so the :class:`ConnectionError` comes at once, saying
  how long the server asked for;
* another 4xx is not retried: a :class:`ValueError` naming the status and ``<key>.url``;
* ``requests_per_second``: request starts (retries included, over every thread of the
  process) are at least ``1 / requests_per_second`` seconds apart;
* ``api_key_env``: the environment variable whose value is sent as
  ``Authorization: Bearer <key>`` (the key itself is never in the config, so never
  recorded); named but unset is an error.

``key`` is the config node the endpoint's settings live in (``http``, ``teacher``), so
every message names the key to change.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import os
import threading
import time
import urllib.error
import urllib.request


class Endpoint:
    def __init__(
        self,
        url: str,
        key: str = "http",
        api_key_env: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        requests_per_second: float | None = None,
    ):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"{key}.url: {url!r} is not an http:// or https:// URL")
        if (
            max_retries < 0
            or timeout <= 0
            or backoff < 0
            or (requests_per_second is not None and requests_per_second <= 0)
        ):
            raise ValueError(f"{key}: need max_retries >= 0, timeout > 0, backoff >= 0, requests_per_second > 0 or null")  # fmt: skip
        self.url, self.key = url.rstrip("/"), key
        self.timeout, self.max_retries, self.backoff = timeout, max_retries, backoff
        self.interval = 1.0 / requests_per_second if requests_per_second else 0.0
        self.api_key = None
        if api_key_env:
            self.api_key = os.environ.get(api_key_env)
            if not self.api_key:
                raise ValueError(f"{key}.api_key_env: ${api_key_env} is not set")
        self._next_start = 0.0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # picklable (trainer=ddp_spawn): a lock of its own
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _wait_for_slot(self) -> None:
        """Sleep until this request may start (the rate limit, shared by every thread)."""
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next_start)
            self._next_start = start + self.interval
        if start > now:
            time.sleep(start - now)

    @property
    def root(self) -> str:
        """The server's root (``url`` without a trailing ``/v1``): vLLM serves
        ``/tokenize`` there."""
        return self.url.removesuffix("/v1")

    def post(self, path: str, body: dict, at_root: bool = False) -> dict:
        return self.request(path, json.dumps(body).encode(), at_root)

    def get(self, path: str) -> dict:
        return self.request(path, None)

    def request(self, path: str, data: bytes | None, at_root: bool = False) -> dict:
        url = (self.root if at_root else self.url) + path
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        method = "POST" if data is not None else "GET"
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        for attempt in range(self.max_retries + 1):
            self._wait_for_slot()
            retry_after = 0.0
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 - configured URL
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:
                if e.code not in RETRIED and e.code < 500:  # the request itself is wrong: no retry
                    raise ValueError(
                        f"{self.key}.url: {url} answered {e.code}: {e.read()[:300]!r}"
                    ) from e
                error, retry_after = f"HTTP {e.code}", retry_after_seconds(e.headers.get("Retry-After"))  # fmt: skip
                if retry_after > MAX_RETRY_AFTER:
                    raise ConnectionError(
                        f"{self.key}.url: {url} answered {e.code} and asked to wait "
                        f"{retry_after:.0f} s (Retry-After), more than the {MAX_RETRY_AFTER:.0f} s "
                        "a run waits for: try later, or another server"
                    ) from e
            except (OSError, http.client.HTTPException, ValueError) as e:
                # refused, reset, dropped, timed out (URLError and TimeoutError are OSErrors),
                # a body cut short (IncompleteRead) or not JSON (JSON/UnicodeDecodeError)
                error = f"{type(e).__name__}: {e}"
            if attempt < self.max_retries:
                time.sleep(max(self.backoff * 2**attempt, retry_after))
        raise ConnectionError(
            f"{self.key}.url: {url} failed {self.max_retries + 1} times "
            f"({self.key}.max_retries={self.max_retries}), last: {error}"
        )


MAX_RETRY_AFTER = 300.0  # seconds: the longest Retry-After waited for
RETRIED = {408, 429}  # and every 5xx: the server's state, not the request, is at fault


def retry_after_seconds(value: str | None) -> float:
    """The seconds a ``Retry-After`` header asks to wait (delta-seconds or an HTTP date);
    0 when absent or unreadable."""
    if not value:
        return 0.0
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return 0.0
