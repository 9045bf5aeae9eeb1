"""A vendor simulator in a process of its own, for ``make bench``: the gateway's SD or KMD
simulator app plus ``GET /_bench/count`` (how many requests it accepted), so the harness
can tell when a run is delivered without asking the gateway or its store.

``python -m bench.sim sd --port P --username U --password-file F``
``python -m bench.sim kmd --port P --tls-dir D``
"""

from __future__ import annotations

import argparse
from pathlib import Path

from aiohttp import web

from gateway.devcerts import ensure_dev_certs
from gateway.simulators import SimulatorOptions
from gateway.simulators import kmd as kmd_sim
from gateway.simulators import sd as sd_sim


def build(vendor: str, options: SimulatorOptions) -> web.Application:
    if vendor == "sd":
        app = sd_sim.build_app(options)

        def count() -> int:
            return len(app[sd_sim.STATE].accepted)
    else:
        app = kmd_sim.build_app(options)

        def count() -> int:
            return sum(r.outcome == "applied" for r in app[kmd_sim.STATE].received)

    async def counted(request: web.Request) -> web.Response:
        return web.json_response({"accepted": count()})

    app.router.add_get("/_bench/count", counted)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("vendor", choices=("sd", "kmd"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--username")
    parser.add_argument("--password-file", type=Path)
    parser.add_argument("--tls-dir", type=Path)
    args = parser.parse_args()
    options = SimulatorOptions(
        host="127.0.0.1",
        port=args.port,
        username=args.username,
        password=args.password_file.read_text().strip() if args.password_file else None,
    )
    ssl_context = None
    if args.vendor == "kmd":
        certs = ensure_dev_certs(args.tls_dir)
        ssl_context = certs.server_context()
    app = build(args.vendor, options)
    print(f"bench simulator {args.vendor} on 127.0.0.1:{args.port}", flush=True)
    web.run_app(
        app, host="127.0.0.1", port=args.port, ssl_context=ssl_context, print=None, access_log=None
    )


if __name__ == "__main__":
    main()
