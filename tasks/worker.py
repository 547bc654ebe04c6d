"""Dask worker preload: `dask worker ADDRESS --preload tasks.worker`.

Imports everything a task needs (Prefect, the task modules, torch and openai-whisper through the
default tokeniser) when the worker starts. Unpickling a task runs on the worker's event loop; left
to the first task, these imports blocked it for over a minute on a loaded 2-core machine, and
the scheduler dropped the silent worker mid-run.
"""

import tasks.merge  # noqa: F401
import tasks.tokenise  # noqa: F401
import tasks.tokenisers.rpq  # noqa: F401  (torch, whisper.audio: the default tokeniser's weight)
import tasks.transcribe  # noqa: F401
