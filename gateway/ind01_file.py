"""Crash-safe, idempotent appends to the IND01 file, and the cron schedule of the file runs.

A run is journalled (and committed by the caller's store) before a byte is written, so after
a crash the next run can tell from the file itself whether the lines are there, missing or
half-written, and never loses or duplicates a line.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from croniter import croniter

__all__ = [
    "AppendResult",
    "FileConflict",
    "FileRun",
    "Journal",
    "JournalEntry",
    "MemoryJournal",
    "Outcome",
    "next_run",
]


class FileConflict(RuntimeError):
    """The file does not hold what the journal says was (about to be) written: an operator
    must look before anything more is appended."""


class Outcome(StrEnum):
    WRITTEN = "written"  # appended now
    PRESENT = "present"  # found complete after a crash: not written again
    REWRITTEN = "rewritten"  # missing after a crash: written again
    REPAIRED = "repaired"  # half-written after a crash: truncated and written again


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """What a run is about to write, recorded durably before the write."""

    run_id: str
    file: str
    offset_before: int  # the file's size before the run
    data: bytes  # exactly the bytes the run appends (header included when it creates the file)
    first_line: int  # 1-based number of the first line in ``data``
    header_lines: int = 0  # 1 when ``data`` starts with the header (the run created the file)

    @property
    def line_count(self) -> int:
        return self.data.count(b"\n")


@dataclass(frozen=True, slots=True)
class AppendResult:
    run_id: str
    file: str
    line_numbers: tuple[int, ...]  # the records' lines (the header line is not among them)
    outcome: Outcome

    def references(self) -> list[str]:
        """Vendor references: "<file name>:<line>" per record, in order."""
        name = Path(self.file).name
        return [f"{name}:{n}" for n in self.line_numbers]


class Journal(Protocol):
    """Where runs are recorded; the lead keeps it in the store.

    ``begin`` must be durable (committed) when it returns; ``finish`` commits the run's
    outcome together with the deliveries it covers. A run that began and never finished is
    returned by ``unfinished`` until it is finished.
    """

    def begin(self, entry: JournalEntry) -> None: ...

    def unfinished(self, file: str) -> Sequence[JournalEntry]: ...

    def finish(self, entry: JournalEntry, result: AppendResult) -> None: ...


class MemoryJournal:
    """An in-memory :class:`Journal` for tests."""

    def __init__(self) -> None:
        self.entries: dict[str, JournalEntry] = {}
        self.finished: dict[str, AppendResult] = {}

    def begin(self, entry: JournalEntry) -> None:
        if entry.run_id in self.entries:
            raise ValueError(f"run {entry.run_id} already began")
        self.entries[entry.run_id] = entry

    def unfinished(self, file: str) -> list[JournalEntry]:
        return [
            e
            for run_id, e in self.entries.items()
            if e.file == file and run_id not in self.finished
        ]

    def finish(self, entry: JournalEntry, result: AppendResult) -> None:
        self.finished[entry.run_id] = result


# ---------------------------------------------------------------------------------------
# File primitives.
# ---------------------------------------------------------------------------------------


#: backups and the lock file are the gateway's own (CPR numbers in every record); the file
#: itself keeps 0640, so the pick-up (in the gateway's group) can read it
PRIVATE_MODE = 0o600


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_at(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(length)


def _count_lines(path: Path, end: int) -> int:
    count, done = 0, 0
    with path.open("rb") as f:
        while done < end:
            chunk = f.read(min(1 << 20, end - done))
            if not chunk:
                break
            count, done = count + chunk.count(b"\n"), done + len(chunk)
    return count


def _write_at(path: Path, offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` (cutting anything after it), then fsync file and folder."""
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o640)
    try:
        os.ftruncate(fd, offset)
        os.lseek(fd, offset, os.SEEK_SET)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        _fsync_dir(path.parent)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``<file>.lock``: two runs (threads or processes) never interleave."""
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, PRIVATE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


# ---------------------------------------------------------------------------------------
# The file run.
# ---------------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


class FileRun:
    """Appends record lines to one IND01 file, journalled so a crash is repaired next time."""

    def __init__(
        self,
        path: Path,
        journal: Journal,
        *,
        header: str | None = None,
        encoding: str = "ascii",
        line_end: str = "\n",
        backup: bool = True,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        if not line_end.endswith("\n"):  # recovery counts and checks lines by their b"\n"
            raise ValueError("line_end must end with a newline")
        self.path = Path(path)
        self.journal = journal
        self.header = header
        self.encoding = encoding
        self.line_end = line_end
        self.backup = backup
        self.clock = clock

    def append(self, run_id: str, lines: Sequence[str]) -> tuple[AppendResult, ...]:
        """Append ``lines`` as run ``run_id``.

        Returns the results of unfinished earlier runs it completed first, then its own.
        Running the same ``run_id`` again never writes its lines twice.
        """
        _check_lines(lines)
        with _locked(self.path):
            done = [self._recover_locked(e) for e in self.journal.unfinished(str(self.path))]
            if any(r.run_id == run_id for r in done):
                return tuple(done)
            return (*done, self._append_locked(run_id, lines))

    def recover(self, entry: JournalEntry) -> AppendResult:
        """Complete a run that began but did not finish (see :class:`Outcome`)."""
        with _locked(self.path):
            return self._recover_locked(entry)

    def _append_locked(self, run_id: str, lines: Sequence[str]) -> AppendResult:
        offset = _size(self.path)
        if offset and _read_at(self.path, offset - 1, 1) != b"\n":
            raise FileConflict(f"{self.path} does not end with a newline: not appending")
        prefix = [self.header] if offset == 0 and self.header is not None else []
        # UnicodeEncodeError (a header the encoding cannot write) before anything is journalled
        data = "".join(f"{line}{self.line_end}" for line in [*prefix, *lines]).encode(self.encoding)
        first = _count_lines(self.path, offset) + 1 if offset else 1
        entry = JournalEntry(run_id, str(self.path), offset, data, first, len(prefix))
        self.journal.begin(entry)  # durable before the first byte is written
        _write_at(self.path, offset, data)
        return self._finish(entry, Outcome.WRITTEN)

    def _recover_locked(self, entry: JournalEntry) -> AppendResult:
        size, end = _size(self.path), entry.offset_before + len(entry.data)
        if size < entry.offset_before:
            raise FileConflict(f"{self.path} is shorter than before run {entry.run_id}")
        found = _read_at(self.path, entry.offset_before, len(entry.data)) if size else b""
        if found == entry.data:
            if size != end:
                raise FileConflict(f"{self.path} has data after run {entry.run_id}")
            return self._finish(entry, Outcome.PRESENT, backup=False)
        if not entry.data.startswith(found):
            raise FileConflict(f"{self.path} holds other data where run {entry.run_id} wrote")
        _write_at(self.path, entry.offset_before, entry.data)
        return self._finish(entry, Outcome.REPAIRED if found else Outcome.REWRITTEN)

    def _finish(
        self, entry: JournalEntry, outcome: Outcome, *, backup: bool = True
    ) -> AppendResult:
        first = entry.first_line + entry.header_lines
        numbers = tuple(range(first, entry.first_line + entry.line_count))
        result = AppendResult(entry.run_id, entry.file, numbers, outcome)
        if self.backup and backup:
            self._backup(entry.run_id)
        self.journal.finish(entry, result)
        return result

    def _backup(self, run_id: str) -> Path:
        folder = self.path.parent / "backup"
        folder.mkdir(mode=0o700, exist_ok=True)
        stamp = self.clock().strftime("%Y%m%dT%H%M%S%fZ")
        target = folder / f"{stamp}_{_safe(run_id)}_{self.path.name}"
        # a copy for the gateway only: created 0600 before a byte of it is written
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE))
        shutil.copyfile(self.path, target)  # into the file made above: its mode stays
        source = self.path.stat()
        os.utime(target, ns=(source.st_atime_ns, source.st_mtime_ns))
        return target


def _safe(run_id: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in run_id)[:64]


def _check_lines(lines: Sequence[str]) -> None:
    for n, line in enumerate(lines, 1):
        if "\n" in line or "\r" in line or not line.isascii():
            raise ValueError(f"line {n} is not a single ASCII line")


# ---------------------------------------------------------------------------------------
# Schedule.
# ---------------------------------------------------------------------------------------


def next_run(cron: str, after: datetime) -> datetime:
    """The first time after ``after`` that ``cron`` (5 fields) fires, in ``after``'s zone."""
    if after.tzinfo is None or after.utcoffset() is None:
        raise ValueError("next_run needs a time-zone-aware datetime")
    if len(cron.split()) != 5 or not croniter.is_valid(cron):
        raise ValueError(f"invalid cron expression {cron!r}: expected 5 fields, e.g. '0 16 * * *'")
    result: datetime = croniter(cron, after).get_next(datetime)
    return result
