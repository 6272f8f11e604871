"""Files: the pickle-free container, checkpoints and packed quantized guides.

Every pyro_bq file is a :mod:`~pyro_bq.io.container`: magic bytes, format
version, JSON header, raw tensor bytes and a SHA-256 checksum, written
atomically and read without ever unpickling anything. A damaged, foreign or
newer-version file raises :class:`CorruptFileError` naming the file and the problem.
"""

from .checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .container import FORMAT_VERSION, SUPPORTED_DTYPES, CorruptFileError, atomic_write_bytes, read_container, write_container

__all__ = [
    "CorruptFileError",
    "FORMAT_VERSION",
    "SUPPORTED_DTYPES",
    "read_container",
    "write_container",
    "atomic_write_bytes",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "checkpoint_path",
    "prune_checkpoints",
    "rng_state",
    "set_rng_state",
]
