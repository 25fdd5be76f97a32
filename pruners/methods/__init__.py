"""Training-free pruners, one file per method family. Importing this package registers them."""

from . import fastv, none, pool, random, tome  # noqa: F401
