"""One results root belongs to one audio root: `results/_owner.json`, written by the first run.

Two audio roots writing into one results root overwrite each other's `p225.jsonl` (issue 11:
the shipped prefect.yaml sends every triggered run to `results/`). The first run records its
audio root (resolved: `audio`, `./audio` and `/abs/audio` are one owner); a later run from
another audio root is refused before any work, saying which root owns it. To reuse a results
root for another corpus on purpose, delete `_owner.json` (and the old outputs) first.

The claim is an exclusive create (`Store.create_exclusive`: a hard link on a local disk, a
conditional PUT on S3), so of two first runs from different audio roots exactly one claims the
root; the other reads the winner's claim and is refused like any later run.
"""

from __future__ import annotations

import json
import time

from tasks.access import canonical_root
from tasks.storage import Store

OWNER_FILE = "_owner.json"


class ForeignResultsRootError(PermissionError):
    """The results root already holds another audio root's results."""


def owner_of(store: Store) -> str | None:
    """The audio root recorded in `_owner.json`, or None when the results root has no owner yet."""
    data = store.read_bytes(OWNER_FILE)
    if data is None:
        return None
    try:
        return str(json.loads(data)["audio_root"])
    except (ValueError, KeyError, TypeError) as e:
        raise ForeignResultsRootError(
            f"{store.display(OWNER_FILE)} is unreadable ({type(e).__name__}); fix or delete it"
        ) from e


def check_owner(results_root: str, audio_root: str, claim: bool = False) -> None:
    """Refuse a results root owned by another audio root; with `claim`, record this one if unowned.

    Raises:
        ForeignResultsRootError: naming both roots and what to do.
    """
    store = Store(results_root)
    mine = canonical_root(audio_root)
    owner = owner_of(store)
    _refuse_foreign(store, results_root, owner, mine)
    if owner is None and claim:
        record = {"audio_root": mine, "claimed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if not store.create_exclusive(OWNER_FILE, (json.dumps(record) + "\n").encode()):
            # Another run claimed it between our read and our create: its claim decides.
            _refuse_foreign(store, results_root, owner_of(store), mine)


def _refuse_foreign(store: Store, results_root: str, owner: str | None, mine: str) -> None:
    if owner is not None and owner != mine:
        raise ForeignResultsRootError(
            f"results root {results_root!r} holds the results of audio root {owner!r}, not {mine!r}; "
            f"use another --results, or delete {store.display(OWNER_FILE)} (and the old results) to reuse it"
        )
