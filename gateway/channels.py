"""One aiohttp session per tenant's vendor endpoint: its own TLS context, limits and timeouts."""

from __future__ import annotations

import ssl
from collections.abc import Mapping

import aiohttp

from adapters.base import Channel, VendorSettings

from .settings import Settings


def tls_context(vendor: VendorSettings) -> ssl.SSLContext | bool:
    """Client certificate (mutual TLS) and a private CA when configured; else the system's."""
    if not (vendor.cert_file or vendor.ca_file):
        return True
    ctx = ssl.create_default_context(cafile=vendor.ca_file)
    if vendor.cert_file:
        ctx.load_cert_chain(vendor.cert_file, vendor.key_file)
    return ctx


class Channels:
    """Lazily opened sessions, closed together at shutdown."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._channels: dict[tuple[str, str], Channel] = {}

    def vendor(self, municipality: str, adapter: str) -> VendorSettings:
        tenant = self._settings.tenants.get(municipality)
        vendors: Mapping[str, VendorSettings] = tenant.vendors if tenant else {}
        return vendors.get(adapter, VendorSettings())

    def get(self, municipality: str, adapter: str) -> Channel:
        key = (municipality, adapter)
        if key not in self._channels:
            vendor = self.vendor(municipality, adapter)
            limit = int(vendor.options.get("max_connections", 16))
            connector = aiohttp.TCPConnector(ssl=tls_context(vendor), limit=limit)
            session = aiohttp.ClientSession(connector=connector)
            self._channels[key] = Channel(session, vendor)
        return self._channels[key]

    async def aclose(self) -> None:
        for channel in self._channels.values():
            await channel.session.close()
        self._channels.clear()
