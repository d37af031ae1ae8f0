"""What can go wrong when talking to MLflow, and which failures are worth waiting out."""

from __future__ import annotations

import requests
from mlflow.exceptions import MlflowException

from semiseg.errors import SemisegError


class TrackingUnavailable(SemisegError):
    """The tracking server cannot be reached."""


class TrackingWarning(UserWarning):
    """Records could not be sent to MLflow (yet); the message says which and where they wait."""


# Errors worth spooling: the server is down, restarting, overloaded or slow. A request the
# server rejects (bad value, unknown run) is a bug and raises as before. MLflow's REST client
# reports a refused connection as an MlflowException with INTERNAL_ERROR.
_TRANSIENT_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}


def is_transient(exc: BaseException) -> bool:
    """True when retrying later may succeed, i.e. the record belongs in the spool."""
    if isinstance(exc, (OSError, requests.RequestException)):
        return True
    return isinstance(exc, MlflowException) and exc.error_code in _TRANSIENT_CODES
