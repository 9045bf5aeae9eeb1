"""gateway/ind01_file.py: locked, journalled, fsynced appends; crash recovery; the cron helper."""

from __future__ import annotations

import os
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from gateway import ind01_file
from gateway.ind01_file import (
    AppendResult,
    FileConflict,
    FileRun,
    JournalEntry,
    MemoryJournal,
    Outcome,
    next_run,
)

HEADER = "851 Test Kommune"


def line(tag: str, n: int) -> str:
    return f"DA6{tag:>4}{n:048d}"[:55].ljust(55, "0")


def lines(tag: str, count: int) -> list[str]:
    return [line(tag, n) for n in range(count)]


class CrashBeforeCommit(MemoryJournal):
    """A journal whose commit of the outcome never happens (the process dies first)."""

    def finish(self, entry: JournalEntry, result: AppendResult) -> None:
        raise SystemExit("crash between the write and the store's commit")


@pytest.fixture
def target(tmp_path: Path) -> Path:
    return tmp_path / "share" / "ind01_befordring.txt"


@pytest.fixture(autouse=True)
def share(target: Path) -> None:
    target.parent.mkdir()


def test_header_only_on_create_and_line_numbers(target: Path) -> None:
    run = FileRun(target, MemoryJournal(), header=HEADER)
    (first,) = run.append("run-1", lines("A", 3))
    (second,) = run.append("run-2", lines("B", 2))
    text = target.read_text().splitlines()
    assert text == [HEADER, *lines("A", 3), *lines("B", 2)]
    assert first.line_numbers == (2, 3, 4) and second.line_numbers == (5, 6)
    assert first.outcome is second.outcome is Outcome.WRITTEN
    assert second.references() == ["ind01_befordring.txt:5", "ind01_befordring.txt:6"]
    assert text.count(HEADER) == 1


def test_same_run_id_twice_writes_once(target: Path) -> None:
    journal = MemoryJournal()
    run = FileRun(target, journal, header=HEADER)
    run.append("run-1", lines("A", 2))
    with pytest.raises(ValueError, match="already began"):
        run.append("run-1", lines("A", 2))  # the store refuses a second begin of one run
    assert target.read_text().count("\n") == 3


def test_backup_copy_after_each_append(target: Path) -> None:
    times = iter(
        [datetime(2024, 11, 30, 16, 0, tzinfo=UTC), datetime(2024, 11, 30, 16, 15, tzinfo=UTC)]
    )
    run = FileRun(target, MemoryJournal(), header=HEADER, clock=lambda: next(times))
    run.append("run-1", lines("A", 1))
    run.append("run-2", lines("B", 1))
    backups = sorted((target.parent / "backup").iterdir())
    assert [b.name[:15] for b in backups] == ["20241130T160000", "20241130T161500"]
    assert backups[-1].read_bytes() == target.read_bytes()
    assert backups[0].read_text().count("\n") == 2


def test_fsync_of_file_and_folder(target: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append("dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file")
        real(fd)

    monkeypatch.setattr(ind01_file.os, "fsync", spy)
    run = FileRun(target, MemoryJournal(), header=HEADER, backup=False)
    run.append("run-1", lines("A", 1))
    assert synced == ["file", "dir"]  # created: the folder entry is made durable too
    run.append("run-2", lines("B", 1))
    assert synced == ["file", "dir", "file"]


def test_concurrent_runs_never_interleave(target: Path) -> None:
    journal = MemoryJournal()
    barrier = threading.Barrier(4)
    results: dict[str, Any] = {}

    def worker(tag: str) -> None:
        run = FileRun(target, journal, header=HEADER, backup=False)
        barrier.wait()
        for k in range(5):
            results[f"{tag}{k}"] = run.append(f"{tag}-{k}", lines(tag, 40))[-1]

    threads = [threading.Thread(target=worker, args=(t,)) for t in "WXYZ"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    text = target.read_text().splitlines()
    assert text[0] == HEADER and len(text) == 1 + 4 * 5 * 40
    for key, result in results.items():
        got = [text[n - 1] for n in result.line_numbers]
        assert got == lines(key[0], 40), f"run {key} interleaved or misnumbered"


def test_crash_after_write_before_commit_neither_loses_nor_duplicates(target: Path) -> None:
    crashing = CrashBeforeCommit()
    with pytest.raises(SystemExit):
        FileRun(target, crashing, header=HEADER).append("run-1", lines("A", 3))
    journal = MemoryJournal()
    journal.entries = dict(crashing.entries)  # what the store had committed: only the begin
    done = FileRun(target, journal, header=HEADER).append("run-2", lines("B", 2))
    assert [(r.run_id, r.outcome, r.line_numbers) for r in done] == [
        ("run-1", Outcome.PRESENT, (2, 3, 4)),
        ("run-2", Outcome.WRITTEN, (5, 6)),
    ]
    assert target.read_text().splitlines() == [HEADER, *lines("A", 3), *lines("B", 2)]
    assert set(journal.finished) == {"run-1", "run-2"}


def test_crash_before_the_write_writes_again(target: Path) -> None:
    run = FileRun(target, MemoryJournal(), header=HEADER)
    run.append("run-1", lines("A", 1))
    entry = JournalEntry(
        "run-2",
        str(target),
        target.stat().st_size,
        "".join(f"{x}\n" for x in lines("B", 2)).encode(),
        3,
    )
    journal = MemoryJournal()
    journal.begin(entry)
    result = FileRun(target, journal, header=HEADER).recover(entry)
    assert result.outcome is Outcome.REWRITTEN and result.line_numbers == (3, 4)
    assert target.read_text().splitlines() == [HEADER, *lines("A", 1), *lines("B", 2)]


def test_partial_write_is_truncated_and_redone(target: Path) -> None:
    run = FileRun(target, MemoryJournal(), header=HEADER)
    run.append("run-1", lines("A", 1))
    data = "".join(f"{x}\n" for x in lines("B", 3)).encode()
    entry = JournalEntry("run-2", str(target), target.stat().st_size, data, 3)
    with target.open("ab") as f:
        f.write(data[:70])  # the crash cut the write in the middle of the second line
    journal = MemoryJournal()
    journal.begin(entry)
    (result, after) = FileRun(target, journal, header=HEADER).append("run-3", lines("C", 1))
    assert result.outcome is Outcome.REPAIRED and result.line_numbers == (3, 4, 5)
    assert after.line_numbers == (6,)
    assert target.read_text().splitlines() == [
        HEADER,
        *lines("A", 1),
        *lines("B", 3),
        *lines("C", 1),
    ]


def test_foreign_data_is_not_overwritten(target: Path) -> None:
    run = FileRun(target, MemoryJournal(), header=HEADER)
    run.append("run-1", lines("A", 1))
    entry = JournalEntry("run-2", str(target), target.stat().st_size, b"X" * 56, 3)
    with target.open("ab") as f:
        f.write(b"somebody else\n")
    with pytest.raises(FileConflict):
        run.recover(entry)
    assert target.read_text().endswith("somebody else\n")


def test_lines_must_be_single_ascii_lines(target: Path) -> None:
    with pytest.raises(ValueError):
        FileRun(target, MemoryJournal()).append("r", ["a\nb"])
    assert not target.exists()


@pytest.mark.parametrize(
    ("cron", "after", "expected"),
    [
        (
            "*/15 * * * *",
            datetime(2024, 11, 30, 10, 7, tzinfo=UTC),
            datetime(2024, 11, 30, 10, 15, tzinfo=UTC),
        ),
        (
            "0 16 * * *",
            datetime(2024, 11, 30, 16, 0, tzinfo=UTC),
            datetime(2024, 12, 1, 16, 0, tzinfo=UTC),
        ),
        (
            "0 16 * * *",
            datetime(2024, 3, 30, 17, 0, tzinfo=ZoneInfo("Europe/Copenhagen")),
            datetime(2024, 3, 31, 16, 0, tzinfo=ZoneInfo("Europe/Copenhagen")),
        ),
    ],
)
def test_next_run(cron: str, after: datetime, expected: datetime) -> None:
    got = next_run(cron, after)
    assert got == expected and got.utcoffset() == expected.utcoffset()


def test_next_run_across_dst_keeps_local_wall_time() -> None:
    cph = ZoneInfo("Europe/Copenhagen")
    got = next_run("0 16 * * *", datetime(2024, 3, 30, 17, 0, tzinfo=cph))
    assert got.utcoffset() == timedelta(hours=2) and got.hour == 16


@pytest.mark.parametrize("cron", ["", "bad cron", "61 * * * *", "* * * *", "0 0 0 * * * *"])
def test_invalid_cron_is_a_clear_value_error(cron: str) -> None:
    with pytest.raises(ValueError, match="invalid cron expression"):
        next_run(cron, datetime(2024, 1, 1, tzinfo=UTC))


def test_next_run_needs_an_aware_time() -> None:
    with pytest.raises(ValueError, match="time-zone-aware"):
        next_run("* * * * *", datetime(2024, 1, 1))  # noqa: DTZ001


def test_crlf_and_an_encoding_keep_line_numbers_and_recovery(target: Path) -> None:
    crashing = CrashBeforeCommit()
    with pytest.raises(SystemExit):
        FileRun(
            target, crashing, header="492 Ærø Kommune", encoding="iso-8859-1", line_end="\r\n"
        ).append("run-1", lines("A", 2))
    (entry,) = crashing.unfinished(str(target))
    assert entry.data.startswith(b"492 \xc6r\xf8 Kommune\r\n") and entry.line_count == 3
    journal = MemoryJournal()
    journal.begin(entry)
    run = FileRun(target, journal, header="492 Ærø Kommune", encoding="iso-8859-1", line_end="\r\n")
    recovered, own = run.append("run-2", lines("B", 1))
    assert recovered.outcome is Outcome.PRESENT and recovered.line_numbers == (2, 3)
    assert own.line_numbers == (4,)
    assert target.read_bytes() == entry.data + f"{line('B', 0)}\r\n".encode()


def test_a_header_the_encoding_cannot_write_is_refused_before_the_journal(target: Path) -> None:
    journal = MemoryJournal()
    with pytest.raises(UnicodeEncodeError):
        FileRun(target, journal, header="Ærø", encoding="ascii").append("r", lines("A", 1))
    assert journal.entries == {} and not target.exists()
    with pytest.raises(ValueError, match="newline"):
        FileRun(target, journal, line_end="\r")
