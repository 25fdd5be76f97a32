"""Training-free pruners, one file per method family. Importing this package registers them."""

from . import (  # noqa: F401
    dart,
    fastv,
    ficoco,
    fitprune,
    gprune,
    mustdrop,
    none,
    pdrop,
    pool,
    prumerge,
    random,
    sparsevlm,
    tokencarve,
    tome,
    visionzip,
    vtw,
)
