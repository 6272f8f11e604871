"""Files: the pickle-free container, checkpoints, packed quantized guides and what they cost.

Every pyro_bq file is a :mod:`~pyro_bq.io.container`: magic bytes, format
version, JSON header, raw tensor bytes and a SHA-256 checksum, written
atomically and read without ever unpickling anything. A damaged, foreign or
newer-version file raises :class:`CorruptFileError` naming the file and the problem.

Usage::

    from pyro_bq.io import load_packed, memory_report, save_packed

    print(memory_report(qguide).bits_per_param)
    save_packed(qguide, "guide-jq4.bq")
    same = load_packed("guide-jq4.bq", model)
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
from .container import FORMAT_VERSION, SUPPORTED_DTYPES, CorruptFileError, atomic_write, atomic_write_bytes, read_container, write_container
from .memory import MemoryReport, SiteMemory, memory_report
from .packed import load_packed, pack_bits, save_packed, unpack_bits

__all__ = [
    "CorruptFileError",
    "FORMAT_VERSION",
    "SUPPORTED_DTYPES",
    "read_container",
    "write_container",
    "atomic_write",
    "atomic_write_bytes",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "checkpoint_path",
    "prune_checkpoints",
    "rng_state",
    "set_rng_state",
    "save_packed",
    "load_packed",
    "pack_bits",
    "unpack_bits",
    "memory_report",
    "MemoryReport",
    "SiteMemory",
]
