"""Secrets stay out of messages, logs and MLflow: URLs are shown with their passwords hidden.

``hide_password`` is for display only (the URL it returns does not connect). Database URLs go
through SQLAlchemy's own renderer (``make_url(url).render_as_string(hide_password=True)``);
http(s) URLs (an MLflow server) and anything SQLAlchemy cannot parse have the password of their
``user:password@`` part replaced; query parameters that carry secrets (``?password=``,
``?token=`` ...) are hidden in every URL.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit, urlunsplit

MASK = "***"
_SECRET_PARAMS = re.compile(
    r"([?&;](?:password|passwd|pwd|pass|token|access_token|api_key|apikey|secret|sslpassword)=)"
    r"[^&;#]*",
    re.IGNORECASE,
)
_USERINFO = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")  # scheme://user:password@host


def hide_password(url: str) -> str:
    """``url`` with its password and secret query values replaced by ``***``."""
    if not url or "://" not in url:
        return _SECRET_PARAMS.sub(rf"\g<1>{MASK}", url or "")
    scheme = url.split("://", 1)[0].lower()
    hidden = _hide_http(url) if scheme in ("http", "https") else _hide_database(url)
    return _SECRET_PARAMS.sub(rf"\g<1>{MASK}", hidden)


def redact(text: str) -> str:
    """Free text (an error message, a log line, a YAML dump) with the password of every URL in
    it, and every secret query value, replaced by ``***``."""
    return _SECRET_PARAMS.sub(rf"\g<1>{MASK}", _USERINFO.sub(rf"\g<1>{MASK}@", text or ""))


def password_of(url: str) -> str | None:
    """The password in ``url``'s ``user:password@`` part, if any (to scrub it from messages)."""
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def scrub(text: str, url: str) -> str:
    """``text`` (an error message about ``url``) with ``url``'s password, if any, hidden (as
    written in the URL and percent-decoded)."""
    secret = password_of(url)
    for form in {secret, unquote(secret)} if secret else ():
        text = text.replace(form, MASK)
    return text


def _hide_http(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return _USERINFO.sub(rf"\g<1>{MASK}@", url)
    if parts.password is None:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{host}"))


def _hide_database(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a SQLAlchemy URL: hide what looks like user:password@
        return _USERINFO.sub(rf"\g<1>{MASK}@", url)
