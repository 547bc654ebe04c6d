"""`python -m whisper_service`: serve with settings from `WHISPER_*` env vars only.

The product CLI (`audio-pipeline serve --host --port ...`) maps its flags onto the same
settings and calls the same `serve`.
"""

from __future__ import annotations

import logging

from whisper_service.app import serve
from whisper_service.settings import WhisperServiceSettings


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    serve(WhisperServiceSettings())


if __name__ == "__main__":
    main()
