"""A small HTTP client of the sweep service, for ``lorasweep ... --server URL``.

Standard library only (``urllib``): the CLI needs no HTTP dependency to talk to a server. The
token comes from ``LORASWEEP_TOKEN`` (never a flag: a command line is visible to every user of
the machine and kept in shell history). Every refusal comes out as a ``LorasweepError`` naming
what to fix, with the server's own message.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from orchestrator.errors import LorasweepError

__all__ = ["ServiceClient", "ServiceError", "FINAL_STATES"]

TOKEN_ENV = "LORASWEEP_TOKEN"
FINAL_STATES = ("completed", "failed", "cancelled", "interrupted")
TIMEOUT_S = 60.0  # one request (a submission validates the spec on the server: seconds)
EVENTS_READ_TIMEOUT_S = 120.0  # an events stream with nothing new for this long is reopened
RECONNECT_S = (1, 2, 5, 10)  # waits between reconnections of a dropped events stream


class ServiceError(LorasweepError):
    """The server refused a request: ``status`` is its HTTP status, ``code`` its error code."""

    def __init__(self, message: str, status: int = 0, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def _detail_text(detail: Any) -> str:
    """The server's error detail in one line (a message, a field and a fix, or pydantic's
    list of errors)."""
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):
        parts = []
        for e in detail[:3]:
            if isinstance(e, dict):
                loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body",))
                parts.append(f"{loc}: {e.get('msg', '')}" if loc else str(e.get("msg", e)))
            else:
                parts.append(str(e))
        return "; ".join(parts)
    if isinstance(detail, dict):
        message = detail.get("message") or detail.get("msg") or ""
        field = detail.get("field")
        text = (
            f"{field}: {message}" if field and not str(message).startswith(str(field)) else message
        )
        if detail.get("fix"):
            text = f"{text} ({detail['fix']})"
        return text or json.dumps(detail)
    return str(detail)


class ServiceClient:
    """Requests to one server with one tenant's token."""

    def __init__(self, server: str, token: str | None = None) -> None:
        self.server = server.rstrip("/")
        if not self.server.startswith(("http://", "https://")):
            raise LorasweepError(
                f"--server: {server!r} is not an http(s) URL, e.g. http://host:8321"
            )
        self.token = token if token is not None else os.environ.get(TOKEN_ENV)
        if not self.token:
            raise LorasweepError(
                f"{TOKEN_ENV}: not set; export the token `lorasweep tokens create --tenant T` "
                "printed on the server, e.g. export LORASWEEP_TOKEN=lsw_..."
            )

    # --- plumbing ------------------------------------------------------------------------------
    def _request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        content_type: str | None = None,
        headers: dict[str, str] | None = None,
        timeout_s: float = TIMEOUT_S,
    ):
        req = urllib.request.Request(self.server + path, data=body, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Accept", "application/json")
        if content_type:
            req.add_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            return urllib.request.urlopen(req, timeout=timeout_s)
        except urllib.error.HTTPError as exc:
            raise self._refusal(exc) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServiceError(
                f"--server: cannot reach {self.server} ({reason}); check the URL and that "
                "`lorasweep serve` runs there"
            ) from None

    def _refusal(self, exc: urllib.error.HTTPError) -> ServiceError:
        try:
            payload = json.loads(exc.read() or b"{}")
        except ValueError:
            payload = {}
        detail = payload.get("detail", payload) if isinstance(payload, dict) else payload
        code = detail.get("code") if isinstance(detail, dict) else None
        text = _detail_text(detail) or exc.reason
        if exc.code == 401:
            text = (
                f"{TOKEN_ENV}: the server refused the token ({text}); it may be wrong or "
                "revoked: ask for a new one (lorasweep tokens create on the server)"
            )
        elif exc.code == 404:
            text = f"SWEEP: {text}; list your sweeps with lorasweep status --server {self.server}"
        return ServiceError(f"server said {exc.code}: {text}", exc.code, code)

    def _json(self, method: str, path: str, **kwargs) -> Any:
        with self._request(method, path, **kwargs) as resp:
            data = resp.read()
        return json.loads(data) if data else None

    # --- routes --------------------------------------------------------------------------------
    def submit_yaml(self, text: str) -> dict:
        """``POST /v1/sweeps`` with the spec as YAML text: ``{"id", "state", ...}``."""
        return self._json(
            "POST", "/v1/sweeps", body=text.encode("utf-8"), content_type="application/yaml"
        )

    def sweeps(self) -> list[dict]:
        out = self._json("GET", "/v1/sweeps")
        if isinstance(out, dict):  # a page: {"sweeps": [...]} or {"items": [...]}
            out = out.get("sweeps", out.get("items", []))
        return list(out or [])

    def sweep(self, sweep_id: str) -> dict:
        return self._json("GET", f"/v1/sweeps/{_quote(sweep_id)}")

    def cancel(self, sweep_id: str) -> dict:
        return self._json("POST", f"/v1/sweeps/{_quote(sweep_id)}/cancel") or {}

    def promote(self, sweep_id: str) -> dict:
        # promotion scores the test split on the server: minutes on a real model
        return self._json("POST", f"/v1/sweeps/{_quote(sweep_id)}/promote", timeout_s=3600)

    def tenant(self) -> dict:
        return self._json("GET", "/v1/tenant")

    def events(self, sweep_id: str, last_event_id: int = 0) -> Iterator[tuple[int, dict]]:
        """The sweep's events (``GET /v1/sweeps/{id}/events``, Server-Sent Events) after
        ``last_event_id``, as ``(id, data)``, until the server ends the stream."""
        headers = {"Accept": "text/event-stream"}
        if last_event_id:
            headers["Last-Event-ID"] = str(last_event_id)
        resp = self._request(
            "GET",
            f"/v1/sweeps/{_quote(sweep_id)}/events",
            headers=headers,
            timeout_s=EVENTS_READ_TIMEOUT_S,
        )
        with resp:
            event_id, data = None, []
            for raw in resp:
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                if not line:  # the end of one event
                    if data:
                        yield _event(event_id, data)
                    event_id, data = None, []
                elif line.startswith(":"):
                    continue  # a keep-alive comment
                else:
                    name, _, value = line.partition(":")
                    value = value[1:] if value.startswith(" ") else value
                    if name == "id":
                        event_id = value
                    elif name == "data":
                        data.append(value)
            if data:
                yield _event(event_id, data)

    def follow(self, sweep_id: str, after_id: int = 0) -> Iterator[tuple[int, dict]]:
        """The sweep's events until it is finished, reconnecting (from the last event seen) when
        the stream drops, e.g. while the server restarts."""
        last, failures = after_id, 0
        while True:
            try:
                for event_id, data in self.events(sweep_id, last):
                    if event_id:
                        last = event_id
                    failures = 0
                    yield event_id, data
            except ServiceError as exc:
                if exc.status:  # the server answered and refused: no point in retrying
                    raise
                failures += 1
                if failures > len(RECONNECT_S):
                    raise
                time.sleep(RECONNECT_S[failures - 1])
                continue
            except (OSError, TimeoutError):  # a read timed out or the connection dropped
                failures += 1
                if failures > len(RECONNECT_S):
                    raise ServiceError(f"--server: lost the events stream of {sweep_id}") from None
                time.sleep(RECONNECT_S[failures - 1])
                continue
            if self.sweep(sweep_id).get("state") in FINAL_STATES:
                # the last lines may have come after the stream ended: one more read
                for event_id, data in self.events(sweep_id, last):
                    if event_id and event_id > last:
                        last = event_id
                        yield event_id, data
                return
            time.sleep(1)


def _event(event_id: str | None, data: list[str]) -> tuple[int, dict]:
    text = "\n".join(data)
    try:
        payload = json.loads(text)
    except ValueError:
        payload = {"line": text}
    if not isinstance(payload, dict):
        payload = {"line": str(payload)}
    try:
        number = int(event_id) if event_id is not None else 0
    except ValueError:
        number = 0
    return number, payload


def _quote(part: str) -> str:
    from urllib.parse import quote

    return quote(part, safe="")
