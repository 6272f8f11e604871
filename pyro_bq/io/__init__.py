"""Files: the pickle-free container, checkpoints and (later) packed quantized guides."""

from .checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .container import CorruptFileError, FORMAT_VERSION, read_container, write_container

__all__ = [
    "CorruptFileError",
    "FORMAT_VERSION",
    "read_container",
    "write_container",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "rng_state",
    "set_rng_state",
]
