"""One configuration story for every command and the dashboard.

A setting comes from, in this order: the command-line flag; the environment variable; the
``[defaults]`` table of the targets file (``--config``); the built-in default.  The names are
the same for the command line and the dashboard:

==============  ===============  ==========================================  ===============  ============
setting         flag             environment                                 ``[defaults]``   default
==============  ===============  ==========================================  ===============  ============
history folder  ``--history``    ``ROMA_HISTORY``                            ``history``      data/history
workers         ``--workers``                                                ``workers``      16
timeout (s)     ``--timeout``                                                ``timeout``      3.05 / 10
retries         ``--retries``                                                ``retries``      3
credentials     ``--token-env``  ``ROMA_AUTH_TOKEN``; ``ROMA_AK``/``ROMA_SK``   per endpoint     none
                                 (``ROMA_SECURITY_TOKEN``);                  ``auth``
                                 ``ROMA_IAM_USER``/``_PASSWORD``/``_DOMAIN``
==============  ===============  ==========================================  ===============  ============

The dashboard has no flags: its environment, then ``.streamlit/secrets.toml`` for credentials.
This module only decides; it never reads a file itself and imports nothing heavy.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = ["HISTORY_ENV", "DEFAULTS", "ENV_TOKEN", "ENV_AK", "ENV_SK", "ENV_SECURITY_TOKEN", "ENV_IAM",
           "resolve", "history", "auth_from_env"]

HISTORY_ENV = "ROMA_HISTORY"
#: Environment variables holding credentials (their values are never printed).
ENV_TOKEN = "ROMA_AUTH_TOKEN"
ENV_AK, ENV_SK, ENV_SECURITY_TOKEN = "ROMA_AK", "ROMA_SK", "ROMA_SECURITY_TOKEN"
ENV_IAM = ("ROMA_IAM_USER", "ROMA_IAM_PASSWORD", "ROMA_IAM_DOMAIN")

#: Built-in defaults, the last step of :func:`resolve`.
DEFAULTS: dict[str, object] = {
    "history": "data/history",
    "workers": 16,
    "timeout": (3.05, 10.0),
    "retries": 3,
    "rate_limit": None,
}
#: Settings that an environment variable can give.
_ENV_NAMES = {"history": HISTORY_ENV}


def resolve(name: str, flag=None, file_settings: Mapping | None = None,
            environ: Mapping[str, str] | None = None):
    """The value of setting ``name``: ``flag`` unless None, else its environment variable unless
    unset or blank, else ``file_settings[name]`` (the targets file's ``[defaults]``), else
    :data:`DEFAULTS`."""
    if flag is not None:
        return flag
    env_name = _ENV_NAMES.get(name)
    if env_name:
        value = (os.environ if environ is None else environ).get(env_name, "").strip()
        if value:
            return value
    if file_settings and file_settings.get(name) is not None:
        return file_settings[name]
    return DEFAULTS.get(name)


def history(flag=None, file_settings: Mapping | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The history folder: ``--history``, ``$ROMA_HISTORY``, ``[defaults] history``, ``data/history``."""
    return str(resolve("history", flag, file_settings, environ))


def auth_from_env(environ: Mapping[str, str] | None = None, *, region: str | None = None,
                  project_id: str | None = None):
    """``(auth, where)`` from the environment: ``ROMA_AUTH_TOKEN``; else ``ROMA_AK`` and ``ROMA_SK``
    (optional ``ROMA_SECURITY_TOKEN``); else ``ROMA_IAM_USER``, ``ROMA_IAM_PASSWORD`` and
    ``ROMA_IAM_DOMAIN``.  ``(None, "none")`` when none is set.  ``where`` names the variables,
    never a value."""
    from roma_analytics.auth import AkSkAuth, IamPasswordAuth, TokenAuth

    environ = os.environ if environ is None else environ
    env = {key: (environ.get(key) or "").strip() for key in (ENV_TOKEN, ENV_AK, ENV_SK, ENV_SECURITY_TOKEN, *ENV_IAM)}
    if env[ENV_TOKEN]:
        # from_env re-reads the variable when the token expires (a rotated token is picked up).
        token = TokenAuth.from_env(ENV_TOKEN) if environ is os.environ else TokenAuth(env[ENV_TOKEN])
        return token, f"token from ${ENV_TOKEN}"
    if env[ENV_AK] and env[ENV_SK]:
        return AkSkAuth(env[ENV_AK], env[ENV_SK], project_id=project_id,
                        security_token=env[ENV_SECURITY_TOKEN] or None), f"AK/SK from ${ENV_AK}/${ENV_SK}"
    if all(env[key] for key in ENV_IAM):
        return IamPasswordAuth(*(env[key] for key in ENV_IAM), project_id=project_id, region=region), \
            "IAM password from $ROMA_IAM_*"
    return None, "none"
