"""The Hugging Face cache's layout: in a snapshot, ``models--org--name/snapshots/<commit>/``,
every file is a symlink into the repository's ``blobs/`` (``f -> ../../blobs/<hash>``);
:func:`is_cache_blob` tells such a link from one that leaves the checkpoint."""

from __future__ import annotations

import os


def is_cache_blob(link: str, root: str) -> bool:
    """Whether ``link``, a file of the directory whose real path is ``root``, is what a Hugging
    Face cache snapshot holds: ``root`` is ``models--*/snapshots/<commit>`` and ``link`` resolves
    into that repository's own ``blobs/``."""
    snapshots = os.path.dirname(root)
    repo = os.path.dirname(snapshots)
    return (
        os.path.basename(snapshots) == "snapshots"
        and os.path.basename(repo).startswith("models--")
        and os.path.dirname(os.path.realpath(link)) == os.path.join(repo, "blobs")
    )
