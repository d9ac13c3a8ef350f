"""Who may use the dashboard, and proof that a POST comes from one of its own pages.

- Without a token the dashboard only listens on a loopback address (config.check_config), and it
  answers only requests whose Host header names a loopback host, so a web page on another domain that
  resolves to 127.0.0.1 (DNS rebinding) cannot read it.
- With a token every request must carry it: ``Authorization: Bearer <token>``, or the session cookie
  that ``/login`` (or a first visit with ``?token=``) sets. The cookie is SameSite=Strict and HttpOnly
  and holds an HMAC of the token, not the token.
- Every form that changes something carries a CSRF field, an HMAC of the dashboard's secret (the
  token, else a random key of this process): another site can neither read nor guess it. A POST whose
  Origin header names another host is refused before its form is read.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from urllib.parse import urlsplit

from .config import is_local_host

COOKIE = "redflow_dashboard"
CSRF_FIELD = "csrf"


class Guard:
    def __init__(self, token: str | None) -> None:
        self.token = token
        secret = token.encode() if token else os.urandom(32)
        self.csrf_token = hmac.new(secret, b"redflow-dashboard-csrf", hashlib.sha256).hexdigest()
        self._session = hmac.new(secret, b"redflow-dashboard-session", hashlib.sha256).hexdigest()

    # --- authentication -------------------------------------------------------------------------------
    @property
    def session_value(self) -> str:
        return self._session

    def token_matches(self, candidate: str | None) -> bool:
        return self.token is not None and candidate is not None and hmac.compare_digest(
            candidate.encode(), self.token.encode())

    def authenticated(self, authorization: str | None, cookie: str | None) -> bool:
        if self.token is None:
            return True
        if authorization and authorization.lower().startswith("bearer "):
            return self.token_matches(authorization[7:].strip())
        return cookie is not None and hmac.compare_digest(cookie.encode(), self._session.encode())

    # --- request origin -----------------------------------------------------------------------------------
    def host_allowed(self, host_header: str | None) -> bool:
        """Without a token, only loopback Host headers (DNS rebinding); with one, any host."""
        if self.token is not None:
            return True
        return is_local_host(_hostname(host_header or ""))

    @staticmethod
    def same_origin(origin: str | None, host_header: str | None) -> bool:
        """A POST's Origin (when the browser sends one) must be this dashboard's own host."""
        if not origin or origin == "null":
            return origin is None
        try:
            netloc = urlsplit(origin).netloc
        except ValueError:
            return False
        return netloc.lower() == (host_header or "").lower()

    def csrf_matches(self, candidate: str | None) -> bool:
        return candidate is not None and hmac.compare_digest(candidate.encode(), self.csrf_token.encode())


def _hostname(host_header: str) -> str:
    """The host part of a Host header: 'localhost:8080' -> 'localhost', '[::1]:80' -> '::1'."""
    if host_header.startswith("["):
        return host_header[1:].split("]", 1)[0]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header
