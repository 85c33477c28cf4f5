"""Error classes for mistakes a user can fix (entry points print them as one line, see `mtok_jax.cli`)."""


class UserError(Exception):
    """An expected error (bad input, missing path); the message names what is wrong and the fix."""


class ConfigError(UserError, ValueError):
    """A bad config value or key (a ValueError too, as `config_utils.validate` always raised)."""
