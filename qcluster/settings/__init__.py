"""Settings: the config model, parsed and validated once at the edge.

Import from the package (``from qcluster.settings import Settings, load_settings``), not
from its modules; inside the package, each module imports the modules it needs:

- ``loading.py``: which file (:func:`resolve_config_path`), the loaders, every problem as
  one ConfigError line, :func:`settings_to_public_dict`, :func:`config_keys`;
- ``model.py``: :class:`Settings` and its sections, frozen and validated, and
  ``validators.py``, the checks of single values they run;
- ``refs.py``: what a ``module:function`` job reference is, and the ``[jobs] allow`` list;
- ``urls.py``: :func:`redact_url`, the one redactor of URLs, and :class:`SecretURL`;
- ``files.py``: :func:`read_bounded`, the one reader of the files qcluster is given;
- ``private.py``: what makes a file private enough for a secret, the directory of an
  embedded database, files created 0600 (:func:`create_private`), the secret's length;
- ``text.py``: helpers for the messages.
"""

from qcluster.settings.files import read_bounded
from qcluster.settings.loading import (
    CONFIG_ENV,
    RPC_SECRET_ENV,
    config_keys,
    load_settings,
    load_settings_from_mapping,
    load_settings_from_text,
    resolve_config_path,
    settings_to_public_dict,
)
from qcluster.settings.model import DEFAULTS_SOURCE, NODE_ID_PATTERN, Settings
from qcluster.settings.private import (
    MIN_SECRET_BYTES,
    check_directory,
    check_planted,
    create_private,
    operator_file_problem,
    own_file_problem,
    secret_problem,
)
from qcluster.settings.refs import (
    MAX_REF_CHARS,
    NAMED_ONLY,
    is_allowed,
    is_func_ref,
    named_only,
    ref_problem,
)
from qcluster.settings.timeouts import SessionTimeouts, lease_seconds, session_timeouts
from qcluster.settings.urls import SecretURL, redact_text, redact_url, url_secrets

__all__ = [
    "CONFIG_ENV",
    "DEFAULTS_SOURCE",
    "MAX_REF_CHARS",
    "MIN_SECRET_BYTES",
    "NAMED_ONLY",
    "NODE_ID_PATTERN",
    "RPC_SECRET_ENV",
    "SecretURL",
    "SessionTimeouts",
    "Settings",
    "check_directory",
    "check_planted",
    "config_keys",
    "create_private",
    "is_allowed",
    "is_func_ref",
    "lease_seconds",
    "load_settings",
    "load_settings_from_mapping",
    "load_settings_from_text",
    "named_only",
    "operator_file_problem",
    "own_file_problem",
    "read_bounded",
    "redact_text",
    "redact_url",
    "ref_problem",
    "resolve_config_path",
    "secret_problem",
    "session_timeouts",
    "settings_to_public_dict",
    "url_secrets",
]
