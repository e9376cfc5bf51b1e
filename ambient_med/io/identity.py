"""Pseudonymous subject ids: HMAC-SHA256 of identifying keys under a site secret.

The secret never leaves the site: it is read from ``AMBIENT_MED_SITE_SECRET`` or from the file
named by ``AMBIENT_MED_SITE_SECRET_FILE`` (kept outside ``results/``). Demo cohorts, whose
"patients" are made up, use a fixed public key instead.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from ambient_med.errors import AmbientMedError

SECRET_ENV = "AMBIENT_MED_SITE_SECRET"
SECRET_FILE_ENV = "AMBIENT_MED_SITE_SECRET_FILE"
# Public by design: only ever used for the made-up demo patients.
DEMO_SECRET = b"ambient-med demo cohort: not a secret"


def site_secret(demo: bool) -> bytes:
    """The key for :func:`pseudonym`.

    Raises:
        AmbientMedError: for a real (non-demo) cohort when no secret is configured.
    """
    if demo:
        return DEMO_SECRET
    if os.environ.get(SECRET_ENV):
        return os.environ[SECRET_ENV].encode()
    secret_file = os.environ.get(SECRET_FILE_ENV)
    if secret_file:
        path = Path(secret_file)
        if not path.is_file():
            raise AmbientMedError(f"{SECRET_FILE_ENV} '{path}': no such file")
        secret = path.read_bytes().strip()
        if not secret:
            raise AmbientMedError(f"{SECRET_FILE_ENV} '{path}': the file is empty")
        return secret
    raise AmbientMedError(
        f"no site secret for pseudonymising a real cohort: set {SECRET_ENV} or "
        f"{SECRET_FILE_ENV} (a file outside results/)"
    )


def pseudonym(secret: bytes, *identifying: str) -> str:
    """``sub-`` + 16 hex digits of HMAC-SHA256(secret, identifying keys).

    Stable for the same patient and study across runs, unlinkable without the secret.
    """
    message = "\x1f".join(identifying).encode()
    return "sub-" + hmac.new(secret, message, hashlib.sha256).hexdigest()[:16]
