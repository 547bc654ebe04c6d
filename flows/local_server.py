"""`python -m flows.local_server --port P --idle-s S --home H`: Prefect's temporary server, kept between runs.

The same app, settings and database as the server Prefect starts for a run when no API is
configured (`flows.prefect_api.SERVER_ENV`, `create_app`), served by uvicorn on 127.0.0.1, but
it outlives the CLI run that started it, so the next run within `--idle-s` seconds of the last
request finds it ready instead of spending ~12 s of CPU starting another. It stops itself after
that long with no request and no connection open: nothing is left running for good. A run that
holds it touches it meanwhile (`flows.prefect_api.keep_alive`).
"""

from __future__ import annotations

import argparse
import os
import threading
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--idle-s", type=float, required=True, help="Stop after this long without a request.")
    parser.add_argument("--home", required=True, help="The Prefect home it serves (also names it in `ps`).")
    args = parser.parse_args()

    from flows.prefect_api import SERVER_ENV

    os.environ.update(SERVER_ENV, PREFECT_HOME=args.home)  # before Prefect reads its settings
    import uvicorn
    from prefect.server.api.server import create_app

    app = create_app()
    last_request = [time.monotonic()]
    in_flight = [0]  # requests and websockets open now: a long one is not idleness

    async def tracked(scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            await app(scope, receive, send)
            return
        last_request[0] = time.monotonic()
        in_flight[0] += 1
        try:
            await app(scope, receive, send)
        finally:
            in_flight[0] -= 1
            last_request[0] = time.monotonic()

    server = uvicorn.Server(uvicorn.Config(tracked, host="127.0.0.1", port=args.port, log_level="error",
                                           lifespan="on"))

    def stop_when_idle() -> None:
        while not server.started and not server.should_exit:  # the idle clock starts once it serves
            time.sleep(0.5)
        last_request[0] = time.monotonic()
        while not server.should_exit:
            time.sleep(min(5.0, args.idle_s / 4))
            if not in_flight[0] and time.monotonic() - last_request[0] > args.idle_s:
                server.should_exit = True

    threading.Thread(target=stop_when_idle, daemon=True, name="idle-stop").start()
    server.run()


if __name__ == "__main__":
    main()
