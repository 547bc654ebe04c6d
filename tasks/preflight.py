"""Everything that can stop a run, checked before any work is scheduled (exit code 2).

A run that cannot succeed must say so in one line before it lists a million files, starts a
cluster or sends a request (issue 13: an unwritable results root was found only after every file
had gone to the service). The checks, cheapest first: settings, allowed roots, the audio root,
the results root (a probe file written and removed), the export root, the results root's owner,
the tokeniser, the service.
"""

from __future__ import annotations

import os
import re
import uuid
from typing import Any

import fsspec
from pydantic import ValidationError

from tasks.access import RootNotAllowedError, check_roots_allowed, is_within
from tasks.ownership import OWNER_FILE, ForeignResultsRootError, check_owner
from tasks.plan import tokeniser_settings
from tasks.records import Provenance, Record
from tasks.settings import PipelineSettings
from tasks.storage import Store


class RunNotStartedError(RuntimeError):
    """The run could not start; nothing was scheduled. The message is one line saying why.

    `transient` is False: the same run will be refused again until someone changes the setup
    (a deployment's run is tagged `refused`, and the watcher does not announce its files again).
    """

    transient = False


class ServiceNotReadyError(RunNotStartedError):
    """The Whisper service could not be reached or was not ready: the same run may work later."""

    transient = True


# The CLI's flags as a flow run's caller names them (deployment parameters, `--param NAME=...`).
PARAMETER_OF_FLAG = {
    "--results": "results_root", "--service-url": "service_url", "--tokenizer": "tokenizer",
    "--batch-size": "batch_size", "--workers": "n_workers", "--dask-address": "dask_address",
    "--extensions": "extensions", "--export-root": "export_root", "--export": "export_formats",
    "--max-failed-fraction": "max_failed_fraction",
}
_FLAG = re.compile(r"(?<![\w/.-])(--[a-z][a-z-]*)(?![\w-])")


def in_parameter_terms(message: str) -> str:
    """A refusal's hint as a deployment's user reads it: `--results` becomes `results_root`, ..."""
    return _FLAG.sub(lambda m: PARAMETER_OF_FLAG.get(m.group(1), m.group(1)), message)


class Checked(Record):
    """What the checks learnt that the run needs: the service's health and this run's provenance."""

    health: dict[str, Any]
    model: str | None
    provenance: Provenance


def settings_or_error(**values: Any) -> PipelineSettings:
    """PipelineSettings from values (None: not given), a one-line RunNotStartedError if invalid."""
    try:
        return PipelineSettings(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg']}" for err in e.errors())
        raise RunNotStartedError(f"bad settings: {problems}") from e


def check_roots(settings: PipelineSettings, claim: bool = False) -> None:
    """Allowed roots, the audio root listable, the results root writable and ours."""
    try:
        check_roots_allowed(settings)
    except RootNotAllowedError as e:
        raise RunNotStartedError(str(e)) from e
    try:
        fs, path = fsspec.url_to_fs(settings.audio_root)
        ok = fs.isdir(path)
    except (OSError, ValueError, ImportError) as e:
        raise RunNotStartedError(f"audio root {settings.audio_root!r} cannot be read: {e}") from e
    if not ok:
        raise RunNotStartedError(f"audio root not found or not a directory: {settings.audio_root}")
    probe_results_root(settings.results_root)
    check_not_nested(settings.results_root)
    check_export_dir(settings)
    try:
        check_owner(settings.results_root, settings.audio_root, claim=claim)
    except ForeignResultsRootError as e:
        raise RunNotStartedError(str(e)) from e


def check_not_nested(results_root: str) -> None:
    """A local results root must not lie inside another one (a folder above it with `_owner.json`):
    the outer root's runs would take the inner one's JSONL for their own folders."""
    store = Store(results_root)
    if not store.is_local:
        return
    path = store.canonical
    while (parent := os.path.dirname(path)) != path:
        path = parent
        if os.path.exists(os.path.join(path, OWNER_FILE)):
            raise RunNotStartedError(
                f"results root {results_root!r} lies inside {path!r}, the results root of another run "
                f"({OWNER_FILE} there); choose one outside it (--results, or a results_base outside it)"
            )


def check_export_dir(settings: PipelineSettings) -> None:
    """End-of-run exports go to a local directory outside the results root (tools that glob the
    results for `*.jsonl` must not meet the exports' files)."""
    if not settings.export_formats:
        return
    out = settings.export_dir()
    if "://" in out:
        raise RunNotStartedError(f"export root {out!r} must be a local directory (set export_root / --export-root)")
    if Store(settings.results_root).is_local and is_within(out, settings.results_root):
        raise RunNotStartedError(
            f"export root {out!r} is inside the results root {settings.results_root!r}; choose one beside it"
        )


def probe_results_root(results_root: str) -> None:
    """Write and remove a small file under the results root; RunNotStartedError if that fails.

    Leaves no trace: on a local disk, folders the probe had to create are removed again, so a
    run that cannot start for another reason creates nothing.
    """
    try:
        store = Store(results_root)
        created = _first_missing(store.root) if store.is_local else None
        probe = f".probe-{uuid.uuid4().hex}"
        try:
            store.write_bytes(probe, b"probe\n")
            store.remove(probe)
        finally:
            if created:
                _remove_empty_dirs(store.root, up_to=created)
    except (OSError, ValueError, ImportError) as e:
        raise RunNotStartedError(
            f"results root {results_root!r} is not writable: {getattr(e, 'strerror', None) or e}"
        ) from e


def _remove_empty_dirs(path: str, up_to: str) -> None:
    """Remove `path` and its parents up to `up_to` while they are empty: never what another run
    started at the same moment has written there meanwhile (a folder with a file stays)."""
    path, up_to = os.path.abspath(path), os.path.abspath(up_to)
    while True:
        try:
            os.rmdir(path)
        except OSError:  # not empty (another run's files), or gone already
            return
        if path == up_to or os.path.dirname(path) == path:
            return
        path = os.path.dirname(path)


def _first_missing(path: str) -> str | None:
    """The outermost folder of `path` that does not exist yet (what writing there would create)."""
    path = os.path.abspath(path)
    missing = None
    while not os.path.exists(path):
        missing, parent = path, os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def check_tokeniser(settings: PipelineSettings) -> dict[str, Any]:
    try:
        return tokeniser_settings(settings)
    except (ValueError, TypeError, ImportError, OSError) as e:
        raise RunNotStartedError(f"bad tokeniser settings ({settings.tokenizer!r}): {e}") from e


def check_service_ready(settings: PipelineSettings) -> dict[str, Any]:
    from tasks.transcribe import ServiceUnavailableError, check_service

    try:
        return check_service(settings)
    except ServiceUnavailableError as e:
        raise ServiceNotReadyError(str(e)) from e


def preflight(settings: PipelineSettings, claim: bool = False) -> Checked:
    """Every check, in order; with `claim`, an unowned results root is recorded as this audio root's.

    Raises:
        RunNotStartedError: the first check that failed, as one line.
    """
    check_roots(settings, claim=False)
    tokenizer_settings = check_tokeniser(settings)
    health = check_service_ready(settings)
    if claim:  # only once every check passed: a run that cannot start claims nothing
        try:
            check_owner(settings.results_root, settings.audio_root, claim=True)
        except ForeignResultsRootError as e:
            raise RunNotStartedError(str(e)) from e
    provenance = Provenance(
        decode_fingerprint=health.get("fingerprint") or None, language=settings.language,
        tokenizer_settings=tokenizer_settings,
    )
    return Checked(health=health, model=health.get("model"), provenance=provenance)
