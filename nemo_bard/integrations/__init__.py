"""The seam to upstream libraries: every use of a NeMo AutoModel or transformers internal lives here.

* :mod:`nemo_bard.integrations.hf` — what the ``bard_vl`` model needs from transformers' internals
  (transformers only; importable without NeMo).
* :mod:`nemo_bard.integrations.nemo` — NeMo AutoModel: the training model class and its registry entry,
  the recipe adapter (training step, validation, logging), dataloader/loss wiring, teacher building.
* :mod:`nemo_bard.integrations.cpu` — the scoped CPU patches for NeMo AutoModel 0.7 on a host without CUDA.

Each module checks at import that the installed upstream version is the one it was written against
and fails with a message naming both versions; ``NEMO_BARD_ALLOW_VERSION_MISMATCH=1`` turns that
into a warning. This package itself imports nothing heavy.
"""

from __future__ import annotations

import importlib.metadata
import os
import warnings

ALLOW_MISMATCH_ENV = "NEMO_BARD_ALLOW_VERSION_MISMATCH"
PINNED_VERSIONS = {"nemo_automodel": "0.7.0", "transformers": "5.18"}


class UpstreamVersionError(ImportError):
    """The installed NeMo AutoModel / transformers is not the version nemo-bard's integration targets."""


def version_matches(installed: str, pinned: str) -> bool:
    """``installed`` equals ``pinned`` or is a patch release of it (``5.18`` matches ``5.18.0``, ``5.18.3``)."""
    return installed == pinned or installed.startswith(pinned + ".")


def check_version(distribution: str) -> None:
    """Fail (or warn, with ``NEMO_BARD_ALLOW_VERSION_MISMATCH=1``) unless ``distribution`` is the pinned version."""
    pinned = PINNED_VERSIONS[distribution]
    installed = importlib.metadata.version(distribution)
    if version_matches(installed, pinned):
        return
    wanted = pinned if pinned.count(".") == 2 else f"{pinned}.x"
    message = (
        f"nemo-bard's integration layer targets {distribution} {wanted}, but {distribution} {installed} is "
        f"installed; install {distribution}=={wanted.replace('.x', '.*')} or set {ALLOW_MISMATCH_ENV}=1 to run anyway"
    )
    if os.environ.get(ALLOW_MISMATCH_ENV, "") == "1":
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        return
    raise UpstreamVersionError(message)


__all__ = ["ALLOW_MISMATCH_ENV", "PINNED_VERSIONS", "UpstreamVersionError", "check_version", "version_matches"]
