"""The operations console under ``/ui/``: server-rendered pages, sign-in, sessions, CSRF."""
