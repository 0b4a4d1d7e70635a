"""Errors that carry a message meant for the user: what is wrong and where (config key, file, layer)."""


class MoeCompressError(Exception):
    """Base class: the message alone must tell the user what to fix."""


class ConfigError(MoeCompressError):
    """The config file is invalid (the message names the key)."""


class DataError(MoeCompressError):
    """An input data file is missing, malformed or too small."""


class ModelError(MoeCompressError):
    """The model path, type or weights are unusable."""


def check_finite(tensor, what: str) -> None:
    """Stop with ``what`` named when ``tensor`` holds a NaN or an inf (a torch tensor)."""
    import torch

    # min and max carry any NaN or inf: one pass, no full-size tensor of flags
    if tensor.numel() and not torch.isfinite(torch.stack(torch.aminmax(tensor.detach()))).all():
        raise ModelError(f"non-finite values (NaN or inf) in {what}")
