"""Sources given as Hugging Face Hub ids: ``org/name`` or ``org/name@revision``.

A source that is not an existing path but reads as a Hub id is the directory of its snapshot in
the local Hugging Face cache (``HF_HUB_CACHE``, default ``$HF_HOME/hub``), found through
huggingface_hub's ``snapshot_download``: with the network allowed it downloads what the cache lacks
(the files an HF model or PEFT adapter directory holds, top level only), and with
``HF_HUB_OFFLINE=1`` it only looks in the cache.  In a snapshot every file is a symlink into the
cache's ``blobs/`` (``models--org--name/snapshots/<commit>/f -> ../../blobs/<hash>``):
:func:`is_cache_blob` tells such a link from one that leaves the checkpoint.
"""

from __future__ import annotations

import fnmatch
import os
import re

from ckpt_ir.errors import CkptIrError

# the weight files of an HF model or PEFT adapter (a snapshot without any holds no checkpoint)
WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "adapter_model.bin")
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")


def resolve(source: str, *, weights: bool = True) -> str:
    """``source`` itself when it exists or is not a Hub id; else the local directory of the Hub
    model it names, downloaded into the cache first where needed and allowed.  ``weights=False``
    (``--hf-config``): only the config and side files are needed, not the weights."""
    match = HUB_ID.match(source)
    if os.path.exists(source) or match is None:
        return source
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from ckpt_ir.io.side_files import HF_FILES

    repo, revision = match["repo"], match["revision"]
    cache, offline = constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE
    what = repo + (f" (revision {revision})" if revision else "")
    binaries = [p for p in HF_FILES if p.endswith(".bin")]  # downloaded only where no safetensors are
    weight_files = ("*.safetensors", "*.safetensors.index.json", "pytorch_model.bin.index.json", *binaries)
    wanted = [p for p in HF_FILES if p not in (binaries if weights else weight_files)]

    def snapshot(patterns: list[str]) -> str:
        return huggingface_hub.snapshot_download(
            repo,
            revision=revision,
            allow_patterns=patterns,
            ignore_patterns=["*/*"],  # a model's own folders (original/, figures/) are not read
            local_files_only=offline,
        )

    try:
        path = snapshot(wanted)
        if weights and not offline and not any(n.endswith(".safetensors") for n in os.listdir(path)):
            path = snapshot(binaries)  # an older model: pytorch_model*.bin weights
    except HFValidationError:  # not a valid id after all: the frontend says there is no such path
        return source
    except RevisionNotFoundError:
        raise CkptIrError(f"{source}: the Hugging Face Hub model {repo} has no revision {revision}") from None
    except GatedRepoError:
        raise CkptIrError(
            f"{source}: {repo} is gated on the Hugging Face Hub: accept its terms on its page, log in "
            f"(hf auth login), then run again"
        ) from None
    except RepositoryNotFoundError:
        raise CkptIrError(
            f"{source}: no such file or directory, and no model {repo} on the Hugging Face Hub (a "
            f"private one needs hf auth login)"
        ) from None
    except LocalEntryNotFoundError as e:
        if offline:
            raise CkptIrError(
                f"{source}: no such file or directory, and the Hugging Face cache {cache} has no "
                f"complete snapshot of {what}; HF_HUB_OFFLINE=1 forbids downloading it: download it "
                f"(hf download {repo}) or unset HF_HUB_OFFLINE"
            ) from None
        reason = str(e.__cause__ or e).splitlines()[0]
        raise CkptIrError(
            f"{source}: no such file or directory, not in the Hugging Face cache {cache}, and the Hub "
            f"could not be reached ({reason}); check the network, or download it where there is one"
        ) from None
    if weights and not any(fnmatch.fnmatch(n, p) for n in os.listdir(path) for p in WEIGHTS):
        raise CkptIrError(
            f"{source}: the cached snapshot {path} holds no weights (only "
            f"{', '.join(sorted(os.listdir(path))) or 'nothing'}); "
            + (
                f"HF_HUB_OFFLINE=1 forbids downloading them: unset it or download them (hf download {repo})"
                if offline
                else "the Hub model has none that ckpt-ir reads (*.safetensors, pytorch_model*.bin)"
            )
        )
    return path


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
