"""The bare aiohttp endpoint ``make bench`` compares intake with: ``POST /v1/reports`` reads
and parses the JSON body and answers 202, nothing else (no validation, no store).

``python -m bench.bare --port P``
"""

from __future__ import annotations

import argparse
import json

from aiohttp import web


async def accept(request: web.Request) -> web.Response:
    body = json.loads(await request.read())
    count = len(body["reports"]) if isinstance(body, dict) and "reports" in body else 1
    return web.json_response({"accepted": count}, status=202)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.router.add_post("/v1/reports", accept)
    print(f"bench bare endpoint on 127.0.0.1:{args.port}", flush=True)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
