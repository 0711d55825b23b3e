"""ranger_hvd: sparse top-k gradient compression with error feedback on Horovod."""
__version__ = "0.1.0"
