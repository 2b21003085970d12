"""The one error type a user sees for bad input: printed as one line, exit code 2."""


class ConfigError(ValueError):
    """Bad configuration or input data; the message names the key, the value and the fix."""
