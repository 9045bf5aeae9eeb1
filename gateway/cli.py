"""The ``payroll-gateway`` command line (DESIGN.md §5).

Every user error ends as one line on stderr and exit code 1; never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import importlib
import json
import secrets
import signal
import ssl
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn, cast

from aiohttp import web

from adapters.base import Adapter, DeliveryError, FileAdapter, Report, VendorSettings
from adapters.registry import RegistryError

from . import logs
from .errors import ConfigError, GatewayError
from .privacy import mask_cpr
from .settings import ROLES, Settings, hash_api_key, load, parse_listen, resolve_store_url
from .simulators import SimulatorOptions
from .store import StoreError

SIMULATORS = {
    "sd": "sd",
    "kmd": "kmd",
    "kmd-engangsydelser": "engangsydelser",
    "os2indberetning": "os2indberetning",
}


class CliError(Exception):
    """A user error: printed as one line, exit code 1."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CliError, ConfigError, RegistryError, StoreError) as exc:
        print(f"payroll-gateway: {mask_cpr(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line and exit code 1, like every other user error."""

    def error(self, message: str) -> NoReturn:
        self.exit(1, f"{self.prog}: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="payroll-gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway (intake API and dispatcher)")
    serve.add_argument("--config", required=True, type=Path)
    serve.add_argument("--listen", help="HOST:PORT, overrides the file")
    serve.add_argument("--port", type=_port, help="PORT only (the host as configured)")
    serve.add_argument("--store", help="store URL, overrides the file")
    serve.add_argument(
        "--role",
        choices=ROLES,
        help="intake: the intake and ops API only; dispatch: deliveries, file runs, "
        "pull sources and health only; all (the default): both; overrides the file",
    )
    serve.set_defaults(func=cmd_serve)

    sim = sub.add_parser("simulate", help="run a local stand-in for a vendor endpoint")
    sim.add_argument("vendor", choices=sorted(SIMULATORS))
    sim.add_argument("--port", type=int, required=True)
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--fail-rate", type=float, default=0.0)
    sim.add_argument("--latency-ms", type=int, default=0)
    sim.add_argument("--fault")
    sim.add_argument(
        "--fault-mix",
        type=_fault_mix,
        default=(),
        help="faults drawn per request, e.g. server=0.3,timeout=0.1,reset=0.05",
    )
    sim.add_argument("--seed", type=int)
    sim.add_argument("--username")
    sim.add_argument("--password-file", type=Path)
    sim.add_argument(
        "--tls-dir", type=Path, help="folder for generated dev certificates (KMD: mutual TLS)"
    )
    sim.add_argument("--api-key-file", type=Path, help="os2indberetning: the ApiKey it requires")
    sim.add_argument(
        "--records", type=Path, help="os2indberetning: a JSON array of export records to serve"
    )
    sim.set_defaults(func=cmd_simulate)

    render = sub.add_parser("render", help="dry run: write the payloads an adapter would send")
    render.add_argument("adapter")
    render.add_argument("file", type=Path)
    render.add_argument("--config", type=Path)
    render.add_argument("--out", type=Path)
    render.set_defaults(func=cmd_render)

    keys = sub.add_parser(
        "keys", help="API keys (the config file is where they live) and data keys"
    )
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser(
        "create", help="make a new API key and the line for the config file"
    )
    create.set_defaults(func=cmd_keys_create)
    listing = keys_sub.add_parser(
        "list", help="the key ids of each municipality, and the operators"
    )
    listing.add_argument("--config", type=Path, required=True)
    listing.set_defaults(func=cmd_keys_list)
    revoke = keys_sub.add_parser(
        "revoke", help="print the config line that revokes a key (edit the file, then restart)"
    )
    revoke.add_argument("--config", type=Path, required=True)
    revoke.add_argument("--id", required=True, dest="key_id", help="the key's id (pgw_<id>_…)")
    revoke.set_defaults(func=cmd_keys_revoke)
    data_key = keys_sub.add_parser(
        "create-data-key", help="print a new data key (for [privacy] data_key_file)"
    )
    data_key.set_defaults(func=cmd_keys_create_data_key)
    rotate = keys_sub.add_parser(
        "rotate-data-key",
        help="re-encrypt every stored CPR number and IND01 journal under the current data key",
    )
    rotate.add_argument("--config", type=Path, required=True)
    rotate.add_argument("--store", help="store URL, overrides the file")
    rotate.set_defaults(func=cmd_keys_rotate_data_key)

    hasher = sub.add_parser(
        "hash-password",
        help="hash a console password for [accounts.NAME] password_hash (read from stdin or a prompt)",
    )
    hasher.set_defaults(func=cmd_hash_password)

    migrate = sub.add_parser("migrate", help="apply the store's migrations and exit")
    migrate.add_argument("--config", type=Path)
    migrate.add_argument("--store")
    migrate.set_defaults(func=cmd_migrate)

    deliveries = sub.add_parser("deliveries", help="list deliveries (what is stuck, and why)")
    _add_filters(deliveries)
    deliveries.add_argument("--limit", type=int, default=200)
    deliveries.add_argument("--json", action="store_true", help="one JSON object per line")
    deliveries.set_defaults(func=cmd_deliveries)
    rejections = sub.add_parser(
        "rejections", help="list pulled records that were not accepted (not acknowledged)"
    )
    rejections.add_argument("--config", type=Path, required=True)
    rejections.add_argument("--store", help="store URL, overrides the file")
    rejections.add_argument("--municipality")
    rejections.add_argument("--source")
    rejections.add_argument("--kind", choices=("invalid", "conflict"))
    rejections.add_argument("--unresolved", action="store_true", help="only those not stored since")
    rejections.add_argument("--limit", type=int, default=200)
    rejections.add_argument("--json", action="store_true", help="one JSON object per line")
    rejections.set_defaults(func=cmd_rejections)
    for action, text in (
        ("replay", "send failed, in-doubt or cancelled deliveries again"),
        ("cancel", "cancel deliveries (they will not be sent)"),
        ("check", "ask the vendor what it holds (KMD read-back) and reconcile"),
        ("confirm", "an in-doubt delivery was found at the vendor: mark it delivered"),
    ):
        op = sub.add_parser(action, help=text)
        _add_filters(op)
        if action == "confirm":
            op.add_argument(
                "--vendor-reference", help="the vendor's id, e.g. SD's RegistreringIdentifikator"
            )
        op.add_argument("--reason", required=True, help="why (written to the audit trail)")
        op.add_argument("--operator", default=None, help="who (default: cli:<login name>)")
        op.set_defaults(func=cmd_operate, action=action)
    for action in ("pause", "resume"):
        ctl = sub.add_parser(action, help=f"{action} one tenant's vendor endpoint")
        ctl.add_argument("--config", type=Path, required=True)
        ctl.add_argument("--store")
        ctl.add_argument("--municipality", required=True)
        ctl.add_argument("--adapter", required=True)
        ctl.add_argument("--reason", required=True)
        ctl.add_argument("--operator", default=None)
        ctl.set_defaults(func=cmd_pause, action=action)

    audit = sub.add_parser("audit", help="audit trail")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser(
        "verify", help="check the audit trail's HMAC chain, attempts and anchor"
    )
    verify.add_argument("--config", type=Path)
    verify.add_argument("--store")
    verify.set_defaults(func=cmd_audit_verify)
    export = audit_sub.add_parser("export", help="write the audit events of a period as JSON lines")
    export.add_argument("--config", type=Path)
    export.add_argument("--store")
    export.add_argument("--from", dest="since", required=True, help="ISO date/time (inclusive)")
    export.add_argument("--to", dest="until", required=True, help="ISO date/time (exclusive)")
    export.add_argument("--out", type=Path, help="file to write (default: standard output)")
    export.set_defaults(func=cmd_audit_export)
    purge = sub.add_parser(
        "purge", help="drop bodies and CPR numbers past [retention] keep_months (audited)"
    )
    purge.add_argument("--config", type=Path, required=True)
    purge.add_argument("--store")
    purge.add_argument("--dry-run", action="store_true", help="count what would go, change nothing")
    purge.set_defaults(func=cmd_purge)
    return parser


# -- serve -------------------------------------------------------------------------------


def _port(text: str) -> int:
    """A TCP port, 1 to 65535 (argparse says which argument was wrong)."""
    if not (text.isascii() and text.isdecimal() and 0 < int(text) <= 65535):
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1 to 65535)")
    return int(text)


def _settings(args: argparse.Namespace) -> Settings:
    settings = load(args.config) if getattr(args, "config", None) else Settings()
    if getattr(args, "listen", None):
        host, port = parse_listen(args.listen, "--listen")
        settings = replace(settings, listen_host=host, listen_port=port)
    if getattr(args, "port", None):
        settings = replace(settings, listen_port=args.port)
    if getattr(args, "store", None):
        settings = replace(settings, store_url=resolve_store_url(args.store, Path.cwd()))
    if getattr(args, "role", None):
        settings = replace(settings, role=args.role)
    return settings


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    logs.configure(settings.log_level)
    from .app import create_app  # imported here: the adapters load at app creation

    try:
        app = create_app(settings)
    except ConfigError:
        raise
    except Exception as exc:
        raise CliError(f"cannot start: {exc}") from exc
    asyncio.run(_serve(app, settings))
    return 0


async def _serve(app: web.Application, settings: Settings) -> None:
    runners = [await _start_simulator(sim, settings) for sim in settings.simulators]
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    tls = server_ssl_context(settings)
    try:
        await web.TCPSite(
            runner, settings.listen_host, settings.listen_port, ssl_context=tls
        ).start()
    except OSError as exc:
        raise CliError(
            f"cannot listen on {settings.listen_host}:{settings.listen_port}: {exc.strerror}"
        ) from exc
    base = f"{'https' if tls else 'http'}://{settings.listen_host}:{settings.listen_port}"
    what = (
        f"health at {base}/healthz"
        if settings.role == "dispatch"
        else f"intake API at {base}/v1/reports"
    )
    print(
        f"payroll-gateway: {what} (role {settings.role}, store {settings.store_url.split('://')[0]}, "
        f"{len(settings.tenants)} tenant(s))",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("payroll-gateway: stopping (finishing in-flight deliveries)", flush=True)
    await runner.cleanup()
    for sim_runner in runners:
        await sim_runner.cleanup()


def server_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The listener's TLS context when ``[server] tls_cert_file``/``tls_key_file`` are set."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"server.tls_cert_file: cannot load the certificate and key: {exc}"
        ) from exc
    return context


async def _start_simulator(sim: Any, settings: Settings) -> web.AppRunner:
    module = importlib.import_module(f"gateway.simulators.{SIMULATORS[sim.vendor]}")
    options = SimulatorOptions(
        port=sim.port,
        username=sim.username,
        password=sim.password,
        fail_rate=sim.fail_rate,
        latency_ms=sim.latency_ms,
        api_key=sim.api_key,
        records_file=str(sim.records_file) if sim.records_file else None,
    )
    ssl_context = None
    if hasattr(module, "ssl_context"):
        from .devcerts import ensure_dev_certs

        certs = ensure_dev_certs(settings.data_dir / "dev-certs")
        options = replace(
            options,
            cert_file=str(certs.server_cert),
            key_file=str(certs.server_key),
            client_ca_file=str(certs.ca_file),
        )
        ssl_context = module.ssl_context(options)
    runner = web.AppRunner(module.build_app(options), handle_signals=False, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, options.host, options.port, ssl_context=ssl_context).start()
    except OSError as exc:
        await runner.cleanup()
        raise CliError(
            f"simulators.{sim.vendor}: cannot listen on {options.host}:{options.port}: "
            f"{exc.strerror}"
        ) from exc
    scheme = "https" if ssl_context else "http"
    print(
        f"payroll-gateway: simulator {sim.vendor} at {scheme}://{options.host}:{options.port}/",
        flush=True,
    )
    return runner


# -- simulate ----------------------------------------------------------------------------


def cmd_simulate(args: argparse.Namespace) -> int:
    if not 0.0 <= args.fail_rate <= 1.0:
        raise CliError("--fail-rate: must be between 0 and 1")
    module = importlib.import_module(f"gateway.simulators.{SIMULATORS[args.vendor]}")
    password = _read_secret(args.password_file, "--password-file")
    api_key = _read_secret(args.api_key_file, "--api-key-file")
    if args.vendor == "os2indberetning" and api_key is None:
        raise CliError("--api-key-file: the os2indberetning simulator needs the ApiKey it requires")
    if args.records is not None and not args.records.is_file():
        raise CliError(f"--records: no such file: {args.records}")
    options = SimulatorOptions(
        host=args.host,
        port=args.port,
        fail_rate=args.fail_rate,
        latency_ms=args.latency_ms,
        fault=args.fault,
        seed=args.seed,
        fault_mix=args.fault_mix,
        username=args.username,
        password=password,
        api_key=api_key,
        records_file=str(args.records) if args.records else None,
    )
    ssl_context = None
    if hasattr(module, "ssl_context"):
        if args.tls_dir is None:
            raise CliError(
                f"--tls-dir: the {args.vendor} simulator needs a folder for its certificates"
            )
        from .devcerts import ensure_dev_certs

        certs = ensure_dev_certs(args.tls_dir)
        options = replace(
            options,
            cert_file=str(certs.server_cert),
            key_file=str(certs.server_key),
            client_ca_file=str(certs.ca_file),
        )
        ssl_context = module.ssl_context(options)
    try:
        app = module.build_app(options)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    print(f"payroll-gateway: simulator {args.vendor} on {args.host}:{args.port}", flush=True)
    web.run_app(
        app, host=args.host, port=args.port, ssl_context=ssl_context, print=None, access_log=None
    )
    return 0


def _read_secret(path: Path | None, flag: str) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise CliError(f"{flag}: cannot read {path}: {exc.strerror}") from exc


def _fault_mix(text: str) -> tuple[tuple[str, float], ...]:
    mix = []
    for item in filter(None, text.split(",")):
        kind, _, share = item.partition("=")
        try:
            mix.append((kind.strip(), float(share)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected KIND=SHARE, got {item!r}") from None
    if sum(s for _, s in mix) > 1:
        raise argparse.ArgumentTypeError("the shares add up to more than 1")
    return tuple(mix)


# -- render ------------------------------------------------------------------------------


def cmd_render(args: argparse.Namespace) -> int:
    from adapters.registry import load_adapters

    from .validation import normalise, validate_report, vendor_fields

    settings = _settings(args)
    adapters = load_adapters()
    if args.adapter not in adapters:
        raise CliError(f"unknown adapter {args.adapter!r} (known: {', '.join(sorted(adapters))})")
    adapter = adapters[args.adapter]
    reports = _read_reports(args.file)
    problems = [
        f"{args.file}: {e.pointer}: {e.message}"
        for i, r in enumerate(reports)
        for e in validate_report(r, f"/{i}" if len(reports) > 1 else "")
        or vendor_fields(r, adapter, f"/{i}" if len(reports) > 1 else "")
    ]
    if problems:
        raise CliError("; ".join(problems))
    typed = [Report.from_dict(normalise(r)) for r in reports]
    wrong = [r.report_id for r in typed if r.kind not in adapter.kinds]
    if wrong:
        kinds = " and ".join(sorted(adapter.kinds))
        raise CliError(f"{args.adapter} delivers {kinds} reports only; not: {', '.join(wrong)}")
    outputs = _render_all(adapter, typed, settings)
    _write_outputs(outputs, args.out)
    return 0


def _read_reports(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CliError(f"{path}: {exc.strerror}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CliError(f"{path}: not valid JSON ({exc})") from exc
    return data if isinstance(data, list) else [data]


def _vendor(settings: Settings, report: Report, adapter: str) -> VendorSettings:
    tenant = settings.tenants.get(report.municipality)
    return tenant.vendors.get(adapter, VendorSettings()) if tenant else VendorSettings()


def _render_file(
    adapter: FileAdapter, reports: list[Report], settings: Settings
) -> list[tuple[str, bytes]]:
    vendor = _vendor(settings, reports[0], adapter.name)
    municipality = reports[0].municipality
    for key, problem in adapter.check_settings(vendor, municipality):
        raise CliError(f"tenants.{municipality}.vendors.{adapter.name}.options.{key}: {problem}")
    body, failures = adapter.render_file(reports, vendor)  # the bytes a file run writes
    for failure in failures:
        print(f"payroll-gateway: not written: {mask_cpr(str(failure))}", file=sys.stderr)
    return [("ind01.txt", body)]


def _render_all(
    adapter: Adapter, reports: list[Report], settings: Settings
) -> list[tuple[str, bytes]]:
    if adapter.file_based:  # file-based adapters write one file for all reports
        return _render_file(cast(FileAdapter, adapter), reports, settings)
    outputs: list[tuple[str, bytes]] = []
    for report in reports:
        vendor = _vendor(settings, report, adapter.name)
        plan = adapter.plan(report, (), vendor)
        if plan.not_applicable or plan.correction_required:
            print(
                f"payroll-gateway: {report.report_id}: nothing to send: "
                f"{plan.not_applicable or plan.correction_required}",
                file=sys.stderr,
            )
        for message in plan.messages:
            try:
                payload = adapter.render(report, message, vendor)
            except DeliveryError as exc:
                raise CliError(f"{report.report_id}: {exc.message}") from exc
            ext = (
                "xml"
                if "xml" in payload.content_type
                else "json"
                if "json" in payload.content_type
                else "txt"
            )
            outputs.append((f"{len(outputs) + 1:04d}.{ext}", payload.body))
    return outputs


def _write_outputs(outputs: list[tuple[str, bytes]], out: Path | None) -> None:
    if out is None:  # the console never shows a CPR number: --out writes the exact bytes
        for name, body in outputs:
            sys.stdout.write(
                f"--- {name} (CPR masked; --out DIR writes the exact payloads)\n"
                f"{mask_cpr(body.decode('utf-8', errors='replace'))}\n"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    for name, body in outputs:
        (out / name).write_bytes(body)
    print(f"payroll-gateway: wrote {len(outputs)} file(s) to {out}", file=sys.stderr)


# -- operations --------------------------------------------------------------------------


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--store", help="store URL, overrides the file")
    parser.add_argument(
        "--id", type=int, action="append", dest="ids", help="a delivery id (repeatable)"
    )
    parser.add_argument("--municipality")
    parser.add_argument("--adapter")
    parser.add_argument("--status")
    parser.add_argument("--report-id")
    parser.add_argument("--since", help="created at or after (ISO date/time)")
    parser.add_argument("--until", help="created before (ISO date/time)")
    parser.add_argument("--error", help="text the last error contains")
    parser.add_argument("--at-risk", action="store_true", default=None)


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    from .ops import parse_filters

    raw = {
        k: getattr(args, k)
        for k in (
            "ids",
            "municipality",
            "adapter",
            "status",
            "report_id",
            "since",
            "until",
            "error",
            "at_risk",
        )
    }
    try:
        return parse_filters({k: v for k, v in raw.items() if v is not None}, "")
    except GatewayError as exc:
        raise CliError(
            "; ".join(f"{e.pointer.lstrip('/')}: {e.message}" for e in exc.errors) or exc.detail
        ) from exc


def _open_store(settings: Settings, *, create_key: bool = True) -> Any:
    """The store with the audit key (read-only commands never generate one)."""
    from .audit import load_key
    from .store import open_store

    key = load_key(settings.audit, settings.data_dir, create=create_key)
    return open_store(settings.store_url, settings.store_pool_size, settings.data_keys, key)


def _with_store(args: argparse.Namespace, work: Any, *, create_key: bool = True) -> Any:
    settings = _settings(args)

    async def run() -> Any:
        store = _open_store(settings, create_key=create_key)
        await store.open()
        try:
            return await work(store, settings)
        finally:
            await store.aclose()

    return asyncio.run(run())


def _operator(args: argparse.Namespace) -> str:
    return args.operator or f"cli:{getpass.getuser()}"


def cmd_deliveries(args: argparse.Namespace) -> int:
    filters = _filters(args)
    rows = _with_store(args, lambda store, _: store.list_deliveries(filters, args.limit))
    if args.json:
        for row in rows:
            print(json.dumps(row, default=str))
        return 0
    print(
        f"{'id':>6}  {'municipality':<12} {'adapter':<19} {'report':<16} {'v':>2} {'status':<20} reason"
    )
    for r in rows:
        flag = " at_risk" if r["at_risk"] else ""
        reason = r.get("held_by", {}).get("reason") if r.get("held_by") else r["last_error"] or ""
        print(
            f"{r['id']:>6}  {r['municipality']:<12} {r['adapter']:<19} {r['report_id'][:16]:<16} "
            f"{r['version']:>2} {r['status'] + flag:<20} {mask_cpr(str(reason))[:100]}"
        )
    print(f"{len(rows)} deliveries")
    return 0


def cmd_rejections(args: argparse.Namespace) -> int:
    filters = {
        k: getattr(args, k)
        for k in ("municipality", "source", "kind")
        if getattr(args, k) is not None
    }
    filters["unresolved"] = args.unresolved
    rows = _with_store(args, lambda store, _: store.list_rejections(filters, args.limit))
    if args.json:
        for row in rows:
            print(mask_cpr(json.dumps(row, default=str)))
        return 0
    print(
        f"{'id':>6}  {'municipality':<12} {'source':<16} {'record':<12} {'kind':<9} {'seen':>5} "
        f"{'first seen (UTC)':<20} reason"
    )
    for r in rows:
        first = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["first_seen_at"]))
        kind = r["kind"] + ("*" if r["resolved_at"] else "")
        reason = "; ".join(f"{e['pointer']}: {e['message']}" for e in r["errors"])
        print(
            f"{r['id']:>6}  {r['municipality']:<12} {r['source']:<16} {r['record_id'][:12]:<12} {kind:<9} "
            f"{r['times_seen']:>5} {first:<20} {mask_cpr(reason)[:100]}"
        )
    print(f"{len(rows)} rejections (* = stored since)")
    return 0


def cmd_operate(args: argparse.Namespace) -> int:
    filters = _filters(args)
    if not filters:
        raise CliError("select deliveries with --id or at least one filter")
    if not args.reason.strip():
        raise CliError("--reason: say why")
    from adapters.registry import load_adapters

    readback = [n for n, a in load_adapters().items() if a.reads_back]

    async def work(store: Any, settings: Settings) -> Any:
        return await store.operate(
            args.action,
            filters,
            _operator(args),
            args.reason.strip(),
            time.time(),
            readback,
            getattr(args, "vendor_reference", None),
        )

    result = _with_store(args, work)
    print(
        f"payroll-gateway: {args.action}: {len(result['changed'])} changed "
        f"{result['changed'][:20]}, {len(result['skipped'])} not in a state for it {result['skipped'][:20]}"
    )
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    paused = args.action == "pause"

    async def work(store: Any, settings: Settings) -> None:
        tenant = settings.tenants.get(args.municipality)
        if tenant is None or args.adapter not in tenant.routes.values():
            raise CliError(f"no route {args.municipality} → {args.adapter} is configured")
        await store.set_paused(
            args.municipality, args.adapter, paused, args.reason, _operator(args), time.time()
        )
        if not paused:  # work deferred to an opening is planned again against the hours now
            await store.undefer(args.municipality, args.adapter, time.time())

    _with_store(args, work)
    print(
        f"payroll-gateway: {args.municipality}/{args.adapter} {'paused' if paused else 'resumed'} "
        "(a running gateway notices within a few seconds)"
    )
    return 0


# -- keys, migrate, audit ----------------------------------------------------------------


def cmd_keys_create(args: argparse.Namespace) -> int:
    key_id = secrets.token_hex(4)
    key = f"pgw_{key_id}_{secrets.token_urlsafe(32)}"
    print(f"API key (give it to the sending system; it is not stored): {key}")
    print(f'config line:  api_keys = [{{id = "{key_id}", hash = "{hash_api_key(key)}"}}]')
    print(
        "(add the {id, hash} entry to the municipality's api_keys list, or use the same hash as an operator's "
        "token_hash or as [server] metrics_token_hash)"
    )
    return 0


def cmd_hash_password(args: argparse.Namespace) -> int:
    """The password is never an argument (it would show in ps and the shell's history): a
    prompt on a terminal (asked twice), otherwise the first line of standard input."""
    from .console.passwords import MIN_LENGTH, hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            raise CliError("the two passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < MIN_LENGTH:
        raise CliError(f"a console password has at least {MIN_LENGTH} characters")
    print(hash_password(password))
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    """Ids only: a hash is shown by its first 8 digits, a secret never (it is not in the file)."""
    settings = load(args.config)
    for municipality, tenant in sorted(settings.tenants.items()):
        print(f"{municipality} {tenant.name}")
        for key in tenant.api_keys:
            print(f"  {key.id:<12} {'revoked' if key.id in tenant.revoked_key_ids else 'active'}")
        for digest in sorted(tenant.api_key_hashes):
            print(f"  {'(no id)':<12} active  api_key_hashes {digest[:15]}…")
        if not tenant.api_keys and not tenant.api_key_hashes:
            print("  (no keys)")
    for name, who in sorted(settings.operators.items()):
        print(f"operator {name}: {who.role} for {', '.join(sorted(who.municipalities))}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    """The config file is the source of truth: this says what to write there, and checks the id."""
    settings = load(args.config)
    found = [t for t in settings.tenants.values() if any(k.id == args.key_id for k in t.api_keys)]
    if not found:
        raise CliError(
            f"--id: no municipality in {args.config} has a key with id {args.key_id!r} "
            "(keys without an id are revoked by deleting their api_key_hashes entry)"
        )
    tenant = found[0]
    if args.key_id in tenant.revoked_key_ids:
        print(f"payroll-gateway: key {args.key_id} of {tenant.municipality} is already revoked")
        return 0
    revoked = ", ".join(f'"{k}"' for k in sorted({*tenant.revoked_key_ids, args.key_id}))
    print(f"In [tenants.{tenant.municipality}] of {args.config}, set:")
    print(f"revoked_key_ids = [{revoked}]")
    print(
        "then restart the gateway: from then on the key is answered 401 (you may also delete its api_keys entry)"
    )
    return 0


def cmd_keys_create_data_key(args: argparse.Namespace) -> int:
    from .privacy import new_data_key

    print(new_data_key())
    print(
        "(write it alone to a file readable only by the gateway (chmod 600) and name that file in "
        "[privacy] data_key_file; to rotate, move the old file to old_data_key_files, then run "
        "payroll-gateway keys rotate-data-key)",
        file=sys.stderr,
    )
    return 0


def cmd_keys_rotate_data_key(args: argparse.Namespace) -> int:
    """Re-seal every stored value under the current key; a second run changes nothing."""
    counts = _with_store(args, lambda store, _: store.reseal(rotate=True))
    settings = _settings(args)
    current = settings.data_keys.current_id if settings.data_keys is not None else "the default key"
    print(
        f"payroll-gateway: re-encrypted under data key {current}: "
        + ", ".join(f"{table} {count}" for table, count in counts.items())
    )
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = _settings(args)

    async def run() -> None:
        store = _open_store(settings)
        await store.open()
        await store.aclose()

    asyncio.run(run())
    print(f"payroll-gateway: store is up to date ({settings.store_url.split('://')[0]})")
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from .audit import anchor_path, load_key, read_anchors, verify

    async def work(store: Any, settings: Settings) -> tuple[int, Any]:
        events = await store.audit_chain()
        anchors = read_anchors(anchor_path(settings.audit, settings.data_dir))
        key = load_key(settings.audit, settings.data_dir, create=False)
        return len(events), verify(events, await store.audit_attempts(), key, anchors)

    count, problem = _with_store(args, work, create_key=False)
    if problem is not None:
        raise CliError(f"{problem} (of {count} events)")
    print(f"payroll-gateway: audit trail intact ({count} events)")
    return 0


def _instant(text: str, flag: str) -> float:
    from datetime import UTC, datetime

    try:
        when = datetime.fromisoformat(text)
    except ValueError as exc:
        raise CliError(f"{flag}: not an ISO date or date-time: {text!r}") from exc
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


EXPORT_FIELDS = {
    "id": "id",
    "time": "at",
    "event": "event",
    "actor": "actor",
    "delivery": "delivery_id",
    "report": "report_pk",
    "detail": "detail",
    "hmac": "hmac",
    "prev_hmac": "prev_hash",
}


def cmd_audit_export(args: argparse.Namespace) -> int:
    """JSON lines for an auditor: each event as stored, with its HMAC and the previous one."""
    from datetime import UTC, datetime

    since, until = _instant(args.since, "--from"), _instant(args.until, "--to")

    async def work(store: Any, settings: Settings) -> list[dict[str, Any]]:
        return list(await store.audit_chain(since, until))

    events = _with_store(args, work, create_key=False)
    lines = []
    for e in events:
        row = {name: e[col] for name, col in EXPORT_FIELDS.items()}
        row["time"] = datetime.fromtimestamp(e["at"], UTC).isoformat()
        row["at"] = e["at"]  # the exact value the HMAC covers
        row["detail"] = json.loads(e["detail"])
        lines.append(json.dumps(row, sort_keys=True, ensure_ascii=False))
    text = "".join(line + "\n" for line in lines)
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text, encoding="utf-8")
        print(f"payroll-gateway: {len(lines)} audit events written to {args.out}", file=sys.stderr)
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    from . import retention

    async def work(store: Any, settings: Settings) -> dict[str, Any]:
        return await retention.purge(store, settings, time.time(), dry_run=args.dry_run)

    counts = _with_store(args, work)
    what = "would purge" if args.dry_run else "purged"
    print(
        f"payroll-gateway: {what} {counts['versions']} report version(s), {counts['cprs']} CPR row(s), "
        f"{counts['attempt_bodies']} attempt(s) with bodies, {counts['backups']} IND01 backup(s)"
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
