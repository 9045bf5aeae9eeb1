"""Vendor adapters: one module per vendor integration, registered by entry point."""
