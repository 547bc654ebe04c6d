"""Watch an audio root; emit one Prefect event `audio.file.created` per new, completely written file.

The deployment's trigger (prefect.yaml) turns a burst of these events into a few flow runs of
`parallel-transcribe-tokenise` over the root; each run reuses what is done already.

Why not `prefect.events.emit_event`: it queues the event for a background worker that, when
the API cannot be reached, gives up after a few seconds and drops every queued event with one
log line (measured on Prefect 3.9.1). A file whose event is lost is only picked up by the next
event or a manual run, so the watcher keeps its own outbox on disk (`deployments.outbox`) and
posts it to `POST /api/events`, which answers once the server has accepted the batch: retried
with backoff while the API is down, kept across restarts, refused (4xx) events parked aside.

File names the pipeline would refuse as ids (not valid UTF-8, `..` segments, control
characters) are logged and skipped here too: one such name must not stop the watcher.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import watchfiles
from prefect.client.orchestration import get_client
from prefect.events import Event
from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, get_current_settings, temporary_settings
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from deployments.outbox import EventSink, Outbox, OutboxFile, WatcherConfigError
from deployments.recheck import PrefectRuns, Recheck, RunSource
from tasks.discover import is_candidate
from tasks.records import folder_of
from tasks.settings import DEFAULT_EXTENSIONS

logger = logging.getLogger(__name__)

EVENT_NAME = "audio.file.created"
_EVENT_NAMESPACE = uuid.UUID("6f1d3c2e-7a55-4c1e-9a0b-3e1f2d6c8b10")


class WatcherSettings(BaseSettings):
    """The watcher process's settings (`AUDIO_PIPELINE_WATCH_*`)."""

    model_config = SettingsConfigDict(env_prefix="AUDIO_PIPELINE_WATCH_", frozen=True, extra="ignore")

    state_dir: Path | None = Field(
        None, description="The outbox folder itself (outbox.jsonl, parked.jsonl); default "
        "$XDG_STATE_HOME/audio-pipeline/watch/<root>-<hash>. One per watched root."
    )
    recheck_seconds: float = Field(
        60.0, gt=0, description="How often to ask the API whether a run has covered the announced files."
    )
    retry_seconds: float = Field(
        60.0, ge=0, description="Wait after a failed run before announcing its files again; doubles per failure."
    )
    retries: int = Field(6, ge=0, description="Announce again at most this many times in a row, then give up.")


def default_state_dir(root: Path) -> Path:
    """One directory per watched root, so two watchers on two roots never share an outbox."""
    configured = WatcherSettings().state_dir
    if configured is not None:
        return configured
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    digest = hashlib.sha256(os.fsencode(root)).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", root.name)[:40] or "root"
    return base / "audio-pipeline" / "watch" / f"{slug}-{digest}"


class PrefectEventSink:
    """Posts events to the configured Prefect server's `POST /api/events`.

    Uses Prefect's client, so PREFECT_API_AUTH_STRING (or PREFECT_API_KEY) authenticates it.

    Raises:
        WatcherConfigError: PREFECT_API_URL is not set. Without it Prefect would start a
            private ephemeral server whose automations nobody has deployed.
    """

    def __init__(self, timeout_s: float = 10.0) -> None:
        if not get_current_settings().api.url:
            raise WatcherConfigError(
                "PREFECT_API_URL is not set: point it at the server the deployment lives on, "
                "e.g. `export PREFECT_API_URL=http://127.0.0.1:4200/api`"
            )
        self.timeout_s = timeout_s

    def send(self, events: Sequence[Event]) -> None:
        # One attempt per call: the outbox owns retries and backoff, so the watch loop keeps
        # noticing files (and a stop request) while the API is down.
        with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 0}):
            with get_client(sync_client=True, httpx_settings={"timeout": self.timeout_s}) as client:
                client.request("POST", "/events", json=[e.model_dump(mode="json") for e in events])


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def unsafe_id_reason(file_id: str) -> str | None:
    """Why `file_id` (a path relative to the root, as os.fsdecode gives it) cannot be an id, or None."""
    try:
        file_id.encode("utf-8")
    except UnicodeEncodeError:
        return "the name is not valid UTF-8"
    if _CONTROL.search(file_id):
        return "the name contains control characters"
    if file_id.startswith("/") or any(part in ("", ".", "..") for part in file_id.split("/")):
        return "the path has empty, '.' or '..' segments"
    return None


class StabilityTracker:
    """Files seen changing; a file is complete once its size and mtime stay put for `stable_s`.

    Empty files stay pending: a writer may create the file before writing to it.
    """

    def __init__(self, stable_s: float) -> None:
        self.stable_s = stable_s
        self._pending: dict[Path, tuple[tuple[int, int] | None, float]] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def touched(self, path: Path, now: float) -> None:
        self._pending[path] = (None, now)

    def removed(self, path: Path) -> None:
        self._pending.pop(path, None)

    def complete(self, now: float) -> list[tuple[Path, int, int]]:
        """(path, size, mtime_ns) of the files that became stable, in path order."""
        done = []
        for path, (seen, since) in sorted(self._pending.items()):
            try:
                st = path.stat()
            except FileNotFoundError:
                del self._pending[path]
                continue
            signature = (st.st_size, st.st_mtime_ns)
            if signature != seen:
                self._pending[path] = (signature, now)
            elif st.st_size > 0 and now - since >= self.stable_s:
                del self._pending[path]
                done.append((path, st.st_size, st.st_mtime_ns))
        return done


def file_event(root: Path, path: Path, size: int, mtime_ns: int, attempt: int = 0) -> Event:
    """The `audio.file.created` event of one file under `root` (an absolute, resolved path);
    `attempt` > 0: announced again after a failed run (`deployments.recheck`)."""
    file_id = path.relative_to(root).as_posix()
    resource_id = f"audio.file.{root.as_posix()}/{file_id}"
    payload = {"audio_root": root.as_posix(), "folder": folder_of(file_id), "id": file_id, "size": size}
    if attempt:
        payload["attempt"] = attempt
    return Event(
        event=EVENT_NAME,
        # The same file version always gets the same id: a batch resent after a lost answer is
        # stored once (the server's events table is keyed by id). An announcement again is new.
        id=uuid.uuid5(_EVENT_NAMESPACE, f"{resource_id}:{size}:{mtime_ns}" + (f":again{attempt}" if attempt else "")),
        resource={
            "prefect.resource.id": resource_id,
            "prefect.resource.name": file_id,
            "audio.root": root.as_posix(),
            "audio.folder": folder_of(file_id),
        },
        payload=payload,
    )


def _folder_in_decode_error(message: str, root: Path) -> Path:
    """The folder of the path named in watchfiles' 'Unable to decode path "..."' (root if unclear)."""
    match = re.search(r'path "(.*)"', message)
    if match is None:
        return root
    folder = Path(match.group(1)).parent
    return folder if folder.is_dir() and (folder == root or root in folder.parents) else root


def _audio_under(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    """Candidate audio files anywhere below `folder` (the pipeline lists the same ones)."""
    found = []
    for dirpath, _, filenames in os.walk(folder):
        found.extend(Path(dirpath, f) for f in filenames if is_candidate(f, extensions))
    return found


def watch(
    audio_root: str | os.PathLike[str],
    *,
    stable_seconds: float = 1.0,
    extensions: Iterable[str] = DEFAULT_EXTENSIONS,
    stop_event: threading.Event | None = None,
    sink: EventSink | None = None,
    poll_ms: int = 250,
    state_dir: str | os.PathLike[str] | None = None,
    runs: RunSource | None = None,
) -> int:
    """Emit `audio.file.created` for every audio file written under `audio_root` until stopped.

    Files already there when the watcher starts get no event (start a run by hand for them).
    Hidden, temp (`.part`, `.tmp`, ...) and non-audio files are ignored; a temp file renamed
    to its final name counts as new; names that cannot be ids are logged and skipped. Events
    not yet delivered when the watcher stops (or dies) are sent by the next watcher of the root.
    Returns on `stop_event` or Ctrl-C, after one last try to send what is still queued.

    Args:
        audio_root: the directory to watch (recursively).
        stable_seconds: how long size and mtime must stay unchanged before a file counts as
            completely written.
        extensions: audio suffixes, as in the pipeline settings.
        stop_event: set it to stop the watcher (tests, embedding).
        sink: where events go; default the Prefect API from PREFECT_API_URL.
        poll_ms: how often pending files are checked when nothing else happens.
        state_dir: the outbox's directory; default `AUDIO_PIPELINE_WATCH_STATE_DIR`, else one
            per root under `$XDG_STATE_HOME/audio-pipeline/watch/`.
        runs: where to ask which runs covered the announced files (`deployments.recheck`);
            default the Prefect API with the default sink, none (no re-announcing) otherwise.

    Returns:
        The number of events delivered.

    Raises:
        FileNotFoundError: `audio_root` is not a directory.
        WatcherConfigError: no Prefect API is configured (default sink only), or another
            watcher holds the state directory.
    """
    root = Path(audio_root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"audio root not found or not a directory: {audio_root}")
    exts = tuple(e.lower() for e in extensions)
    if sink is None:
        sink, runs = PrefectEventSink(), runs if runs is not None else PrefectRuns()
    config = WatcherSettings()
    recheck = Recheck(root, runs, config.recheck_seconds, config.retry_seconds, config.retries) if runs else None
    store = OutboxFile(state_dir if state_dir is not None else default_state_dir(root))
    try:
        outbox = Outbox(sink, store)
        if recheck:
            recheck.confirmations.announced(outbox.queued())
        return _watch(root, exts, outbox, StabilityTracker(stable_seconds), stop_event, poll_ms, recheck)
    finally:
        store.close()


def _announce_again(root: Path, recheck: Recheck, file_id: str) -> Event | None:
    """A fresh event for `file_id`, or for the newest pending file still on disk."""
    candidates = [file_id, *(i for _, i in reversed(recheck.confirmations.pending) if i != file_id)]
    for candidate in candidates[:100]:
        path = root / candidate
        try:
            st = path.stat()
        except OSError:
            continue
        return file_event(root, path, st.st_size, st.st_mtime_ns, attempt=recheck.confirmations.failed_in_a_row)
    return None


def _watch(root: Path, exts: tuple[str, ...], outbox: Outbox, tracker: StabilityTracker,
           stop_event: threading.Event | None, poll_ms: int, recheck: Recheck | None = None) -> int:
    def audio_or_folder(change: watchfiles.Change, path: str) -> bool:
        if is_candidate(path, exts):
            return True
        # A folder moved in whole brings no event for the files inside it, and the files of a
        # new folder can be written before the watch on it starts: scan new folders.
        return change == watchfiles.Change.added

    skipped: set[Path] = set()  # logged once each

    def track(path: Path, now: float) -> None:
        reason = unsafe_id_reason(path.relative_to(root).as_posix())
        if reason is None:
            tracker.touched(path, now)
        elif path not in skipped:
            skipped.add(path)
            logger.warning("skipped %r: %s (the pipeline refuses it as an id; rename the file)", str(path), reason)

    def watching():
        """watchfiles' changes, restarted after a name it cannot decode.

        watchfiles (1.x) raises WatchfilesRustInternalError ("Unable to decode path") for a name
        that is not valid UTF-8 and its generator is then dead: the watcher would stop. Restart
        it and scan that name's folder for what landed meanwhile (the bad name is skipped there).
        """
        while True:
            changes_seen = watchfiles.watch(
                root, watch_filter=audio_or_folder, debounce=max(poll_ms, 100), step=50,
                rust_timeout=poll_ms, yield_on_timeout=True, stop_event=stop_event, raise_interrupt=False,
            )
            try:
                yield from changes_seen
                return
            except RuntimeError as e:
                if "decode path" not in str(e):
                    raise
                folder = _folder_in_decode_error(str(e), root)
                logger.warning("a file name is not valid UTF-8 (%s); skipped, watching again", e)
                yield {(watchfiles.Change.added, str(folder))}
            finally:
                changes_seen.close()

    changes_seen = watching()
    started = False
    try:
        for changes in changes_seen:
            if not started:  # the first yield comes once the OS watches are in place
                logger.info("watching %s for new audio files (%s); outbox in %s", root, ", ".join(exts),
                            outbox.store.dir)
                started = True
            now = time.monotonic()
            for change, raw in changes:
                path = Path(raw)
                if change == watchfiles.Change.deleted:
                    tracker.removed(path)
                elif path.is_dir():
                    for found in _audio_under(path, exts):
                        track(found, now)
                elif is_candidate(raw, exts):
                    track(path, now)
            events = []
            for path, size, mtime_ns in tracker.complete(now):
                event = file_event(root, path, size, mtime_ns)
                logger.info("new audio file %s (%d bytes)", event.payload["id"], size)
                events.append(event)
            outbox.add(events)
            if recheck:
                if (again := recheck.poll(now)) and (event := _announce_again(root, recheck, again)):
                    outbox.add([event])
                recheck.confirmations.announced(events)
            outbox.flush(now)
    except KeyboardInterrupt:  # Ctrl-C while sending rather than inside watchfiles
        pass
    finally:
        changes_seen.close()
        outbox.flush(time.monotonic(), force=True)
        if len(outbox):
            logger.warning("stopped with %d event(s) not delivered; kept in %s for the next start",
                           len(outbox), outbox.store.dir)
        logger.info("stopped watching %s (%d events sent, %d parked)", root, outbox.delivered, outbox.parked)
    return outbox.delivered
