"""Horovod, imported on first use.

The compressor's math (and its unit tests) needs no Horovod; only the exchanges do. Importing
``horovod.tensorflow`` lazily keeps ``import ranger_hvd.tensorflow`` cheap and usable without it.
"""

from __future__ import annotations


def module():
    import horovod.tensorflow as hvd

    return hvd


def ensure_init():
    """Horovod, initialised (a single process without horovodrun is a world of one)."""
    hvd = module()
    if not hvd.is_initialized():
        hvd.init()
    return hvd
