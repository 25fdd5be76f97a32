"""Training-free pruners, one file per method family. Importing this package registers them."""

from . import fastv, ficoco, gprune, mustdrop, none, pool, random, tokencarve, tome  # noqa: F401
