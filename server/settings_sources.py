"""Where a setting's value comes from, and how an error says so.

``moeserve serve`` reads its settings from three sources, lowest first: a TOML file
(``config/server.toml``, or the file ``--config`` or ``MOESERVE_CONFIG`` names), the
``MOESERVE_*`` environment, the command-line flags. This module knows their spellings
(``env_var``, ``cli_flag``), finds and reads the file, hands its values to pydantic-settings as
the lowest source (``FileSource``), and turns pydantic's errors into one ``SettingsError`` that
names each setting *and* where its value came from. It knows nothing of the settings
themselves: ``server/settings.py`` declares and checks them, and loads them through this.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, PydanticCustomError
from pydantic_settings import PydanticBaseSettingsSource

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ENV_PREFIX = "MOESERVE_"
CONFIG_ENV = "MOESERVE_CONFIG"  # names the TOML file; not a setting itself
# The MOESERVE_* variables that are not settings, and who reads them.
OTHER_ENV_VARS = (
    CONFIG_ENV,  # here
    "MOESERVE_CACHE_DIR",  # the demo model (devtools/demo.py) and the BLAS shim
    "MOESERVE_BLAS",  # which BLAS to load (models/backend/blas.py)
    "MOESERVE_BLAS_GEMV",  # the sgemv shim on or off (models/backend/blas.py)
)
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "config" / "server.toml"

# List settings take one value per flag occurrence, so their flags read in the singular.
_LIST_FLAGS = {
    "model_aliases": "--model-alias",
    "api_keys": "--api-key",
    "admin_api_keys": "--admin-api-key",
    "cors_origins": "--cors-origin",
}
# The TOML values of the load_settings call in progress, read by the lowest-priority source.
_FILE_VALUES: ContextVar[dict[str, Any]] = ContextVar("moeserve_file_values")


class SettingsError(ValueError):
    """A setting has a bad value; the message names the setting and where the value came from.

    Attributes:
        settings: The names of the settings at fault (empty for a file-level problem).
    """

    def __init__(self, message: str, settings: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.settings = settings


def cli_flag(name: str) -> str:
    """The command-line flag of a setting.

    Args:
        name: A ``Settings`` field name.

    Returns:
        The flag, e.g. ``--max-running`` or ``--api-key``.
    """
    return _LIST_FLAGS.get(name, "--" + name.replace("_", "-"))


def env_var(name: str) -> str:
    """The environment variable of a setting.

    Args:
        name: A ``Settings`` field name.

    Returns:
        The variable name, e.g. ``MOESERVE_PORT``.
    """
    return ENV_PREFIX + name.upper()


def unknown_env_vars(known: Collection[str]) -> list[str]:
    """Warnings for ``MOESERVE_*`` variables that nothing reads, such as a misspelled setting.

    Args:
        known: The setting names.

    Returns:
        One message per unknown variable, naming the closest known one when there is one.
    """
    # Compared without the prefix, which every name shares and would make all look alike.
    names = [n.upper() for n in known] + [v.removeprefix(ENV_PREFIX) for v in OTHER_ENV_VARS]
    warnings = []
    # pydantic-settings matches names case-blind, so MOESERVE_port is not unknown.
    for var in sorted(k for k in os.environ if k.upper().startswith(ENV_PREFIX)):
        name = var.upper().removeprefix(ENV_PREFIX)
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" (did you mean {ENV_PREFIX}{close[0]}?)" if close else ""
            warnings.append(f"ignoring unknown environment variable {var}{hint}")
    return warnings


def conflict(names: tuple[str, ...], message: str) -> PydanticCustomError:
    """A model-level validation error that remembers which settings it is about.

    Args:
        names: The settings at fault; the error message names each with its source.
        message: What is wrong.

    Returns:
        The error, to raise from a validator.
    """
    # The message travels as context, not as the template, so braces in it stay literal.
    return PydanticCustomError(
        "setting_conflict", "{detail}", {"detail": message, "settings": ",".join(names)}
    )


class FileSource(PydanticBaseSettingsSource):
    """The TOML file's values, below the environment (see ``file_values``)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """Unused: ``__call__`` hands over the whole table at once."""
        return _FILE_VALUES.get({}).get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        """The file's values, all at once (pydantic-settings calls this)."""
        return dict(_FILE_VALUES.get({}))


@contextmanager
def file_values(values: dict[str, Any]) -> Iterator[None]:
    """Make ``values`` the file's settings for the ``Settings`` built inside this block.

    Args:
        values: Setting name -> value, from ``read_config_file``.

    Yields:
        Nothing; ``FileSource`` reads the values until the block ends.
    """
    token = _FILE_VALUES.set(values)
    try:
        yield
    finally:
        _FILE_VALUES.reset(token)


def resolve_config_path(explicit: Path | None = None) -> Path | None:
    """Which TOML file to read.

    A file the user names (``--config``, ``MOESERVE_CONFIG``) must exist; the repository's
    ``config/server.toml`` is optional, since an installed package does not ship it.

    Args:
        explicit: A path from ``--config``; it wins over ``MOESERVE_CONFIG``.

    Returns:
        The path, or None for no file.
    """
    if explicit is not None:
        return Path(explicit).expanduser()
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV]).expanduser()
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def read_config_file(path: Path, known: Collection[str]) -> dict[str, Any]:
    """Read a settings TOML file, refusing keys that are not settings.

    Args:
        path: The file.
        known: The setting names, in their documented order.

    Returns:
        Setting name -> value.

    Raises:
        SettingsError: Missing, unreadable, not TOML, or an unknown key.
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise SettingsError(f"cannot read config file {path}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SettingsError(f"config file {path} is not valid TOML: {e}") from None
    unknown = sorted(data.keys() - set(known))
    if unknown:
        raise SettingsError(
            f"config file {path}: unknown setting(s) {', '.join(unknown)}; "
            f"known: {', '.join(known)}",
            tuple(unknown),
        )
    return data


def settings_error(
    error: ValidationError, overrides: dict[str, Any], path: Path | None, file: dict[str, Any]
) -> SettingsError:
    """One ``SettingsError`` for all of pydantic's complaints, each naming its source.

    Args:
        error: From building ``Settings``.
        overrides: The command line's values.
        path: The TOML file read, if any.
        file: Its values.

    Returns:
        The error, its message one ``;``-separated clause per problem.
    """
    problems = [_describe(err, overrides, path, file) for err in error.errors()]
    names = tuple(dict.fromkeys(n for err in error.errors() for n in _names_of(err)))
    return SettingsError("; ".join(problems), names)


def _names_of(err: ErrorDetails) -> list[str]:
    """The settings a pydantic error is about (a field's, or those a conflict names)."""
    if err["loc"]:
        return [str(err["loc"][0])]
    return [n for n in err.get("ctx", {}).get("settings", "").split(",") if n]


def _source(name: str, overrides: dict[str, Any], path: Path | None, file: dict[str, Any]) -> str:
    """Where a setting's value came from, in the precedence order of ``load_settings``."""
    if name in overrides:
        return f"command line {cli_flag(name)}"
    wanted = env_var(name).lower()  # pydantic-settings matches environment names case-blind
    if any(k.lower() == wanted and v != "" for k, v in os.environ.items()):
        return f"environment variable {env_var(name)}"
    if name in file:
        return f"config file {path}"
    return "default"


def _describe(
    err: ErrorDetails, overrides: dict[str, Any], path: Path | None, file: dict[str, Any]
) -> str:
    """One line about one pydantic error: setting, value, source, reason."""
    message = str(err["msg"]).removeprefix("Value error, ").replace("\n", " ")
    names = _names_of(err)
    if err["loc"]:
        where = _source(names[0], overrides, path, file)
        return f"setting {names[0]}={err['input']!r} (from {where}): {message}"
    if len(names) == 1:
        return f"setting {names[0]} (from {_source(names[0], overrides, path, file)}): {message}"
    origins = ", ".join(f"{n} from {_source(n, overrides, path, file)}" for n in names)
    return f"settings {' / '.join(names)} ({origins}): {message}"
