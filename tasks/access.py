"""Which roots a run may read and write: an explicit allow-list, checked before any work.

A deployment's trigger takes `audio_root` from an event payload, and the open-source Prefect
server accepts events without authentication unless configured; without this check anyone who
can post an event chooses which directory the worker lists and transcribes.
"""

from __future__ import annotations

import os

import fsspec
from fsspec.implementations.local import LocalFileSystem

from tasks.settings import PipelineSettings


class RootNotAllowedError(PermissionError):
    """A run's audio, results or export root lies outside `AUDIO_PIPELINE_ALLOWED_ROOTS`."""


def canonical_root(root: str) -> str:
    """Local paths resolved (symlinks, `..`); URLs as protocol://path without a trailing slash."""
    fs, path = fsspec.url_to_fs(root)
    if isinstance(fs, LocalFileSystem):
        return os.path.realpath(path)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return f"{protocol}://{path.rstrip('/')}"


def is_within(root: str, allowed: str) -> bool:
    child, parent = canonical_root(root), canonical_root(allowed)
    return child == parent or child.startswith(parent.rstrip("/") + "/")


def check_roots_allowed(settings: PipelineSettings) -> None:
    """Raise RootNotAllowedError unless every root the run reads or writes lies inside an allowed
    root (no list: all allowed)."""
    if not settings.allowed_roots:
        return
    roots = [("audio root", settings.audio_root), ("results root", settings.results_root)]
    if settings.export_formats:
        roots.append(("export root", settings.export_dir()))
    for label, root in roots:
        if not any(is_within(root, allowed) for allowed in settings.allowed_roots):
            raise RootNotAllowedError(
                f"{label} {root!r} is outside the allowed roots ({', '.join(settings.allowed_roots)}); "
                "add it to AUDIO_PIPELINE_ALLOWED_ROOTS (for a deployment: prefect.yaml's job_variables env, "
                "then `prefect --no-prompt deploy --all`) to permit it"
            )
