"""Errors that carry a message meant for the user: what is wrong and where (config key, file, layer)."""


class MoeCompressError(Exception):
    """Base class: the message alone must tell the user what to fix."""


class ConfigError(MoeCompressError):
    """The config file is invalid (the message names the key)."""


class DataError(MoeCompressError):
    """An input data file is missing, malformed or too small."""


class ModelError(MoeCompressError):
    """The model path, type or weights are unusable."""
