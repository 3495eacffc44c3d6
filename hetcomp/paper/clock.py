"""The from-scratch clock: a table's whole cost measured by its own command, across interruptions.

A whole table (teachers and every run) can take longer than one sitting at the machine; ``reproduce`` resumes
from what finished, but a single call's wall time then measures only its part. The clock is a small file in the
results folder, opened by the call that found nothing to reuse. Every later training call of the *same* command
(same students, methods, seeds and dimension) adds a sitting; each sitting writes its elapsed time every
``BEAT_SECONDS``, so one killed at the end of a session loses at most that much from the count. The call that
finishes the last cell closes the clock: its measurement is the union of the sittings' intervals (calls side by
side count once), the time between sittings not counted, and it goes to the manifest's ``from_scratch_measured``.
A training call with another grid in the same folders ends the measurement (it is no longer one command's cost)
and says so."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from hetcomp.locks import exclusive_lock
from hetcomp.provenance import atomic_write_text, git_commit, machine, read_json

CLOCK_FILE = "from-scratch-clock.json"
#: its own lock, not the results folder's: the clock is closed while the results lock is held
CLOCK_LOCK = ".clock-lock"
BEAT_SECONDS = 30.0


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by ``(start, end)`` intervals, overlaps counted once."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def counted_seconds(sittings: list[dict]) -> float:
    """The wall time a clock's sittings cover, overlaps counted once."""
    return union_seconds([(s["start"], s["start"] + s["seconds"]) for s in sittings])


class FromScratchClock:
    """One sitting of a from-scratch measurement; ``stop`` it in a ``finally``, ``close`` it when every cell is
    done. Its beats run on a daemon thread so that a sitting killed mid-run has counted up to its last beat."""

    def __init__(self, out_dir: Path, started: float, jobs: int):
        self.out_dir, self.path = out_dir, out_dir / CLOCK_FILE
        self.started_wall, self.started = time.time(), started  # epoch for the union, perf_counter for the length
        self.sitting = {"pid": os.getpid(), "start": self.started_wall, "seconds": 0.0, "jobs": jobs,
                        "machine": machine(), "commit": git_commit()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat_until_stopped, daemon=True, name="from-scratch-clock")
        self.alive = True

    def start(self) -> FromScratchClock:
        self.beat()
        self._thread.start()
        return self

    def _beat_until_stopped(self) -> None:
        while not self._stop.wait(BEAT_SECONDS) and self.alive:
            self.beat()

    def beat(self, seconds: float | None = None) -> dict | None:
        """Write this sitting's elapsed time; the record, or None once another call has ended the measurement."""
        self.sitting["seconds"] = round(time.perf_counter() - self.started if seconds is None else seconds, 3)
        with exclusive_lock(self.out_dir / CLOCK_LOCK):
            record = read_clock(self.path)
            if record is None:
                self.alive = False
                return None
            others = [s for s in record["sittings"]
                      if (s["pid"], s["start"]) != (self.sitting["pid"], self.sitting["start"])]
            record["sittings"] = [*others, dict(self.sitting)]
            atomic_write_text(self.path, _dumps(record))
        return record

    def stop(self, seconds: float | None = None) -> dict | None:
        """End this sitting (its last beat); the record."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        return self.beat(seconds) if self.alive else None

    def close(self, seconds: float) -> dict | None:
        """End the measurement, every cell being done: the manifest's ``from_scratch_measured`` (None if another
        call ended it meanwhile). The clock file goes; its sittings are kept in the measurement."""
        record = self.stop(seconds)
        if record is None:
            return None
        sittings = record["sittings"]
        measured = {
            "command": record["command"],
            "wall_seconds": round(counted_seconds(sittings), 1),
            "sittings": len(sittings),
            "how": "the union of the wall times of this command's calls from empty teachers, runs and results "
                   "folders to its last cell; time between calls is not counted",
            "opened": record["opened"],
            "per_sitting": [{"started": _utc(s["start"]), "seconds": round(s["seconds"], 1), "jobs": s["jobs"],
                             "machine": s["machine"], "commit": s["commit"]} for s in sittings],
        }
        self.path.unlink(missing_ok=True)
        self.alive = False  # a later ``stop`` has nothing left to write
        return measured


def read_clock(path: Path) -> dict | None:
    return read_json(path, "from-scratch clock", "delete it: the table's from-scratch time is then not measured") \
        if path.is_file() else None


def open_clock(out_dir: Path, command: str, grid: dict, from_scratch: bool, train: bool, jobs: int,
               say: Callable[[str], None], started: float) -> FromScratchClock | None:
    """This call's sitting of a from-scratch measurement, or None when it is not part of one.

    ``from_scratch``: nothing exists to reuse, so a new measurement opens (a leftover clock is replaced). Otherwise
    an open clock of the same ``grid`` gains this call as a sitting; a training call of another grid ends it
    (said, with the time it had counted); a call that trains nothing leaves it alone."""
    path = out_dir / CLOCK_FILE
    clock = FromScratchClock(out_dir, started, jobs)
    with exclusive_lock(out_dir / CLOCK_LOCK):
        record = read_clock(path)
        if from_scratch:
            if record is not None:
                say(f"replacing {path}: a from-scratch measurement of `{record['command']}` with nothing of its "
                    "work left in these folders")
            atomic_write_text(path, _dumps({"command": command, "grid": grid, "opened": _utc(time.time()),
                                            "sittings": []}))
            say(f"from scratch: this table's whole wall time is measured (clock: {path}); if this call is "
                "stopped, rerun the same command and it goes on counting")
        elif record is None or not train:
            return None
        elif _canonical(record["grid"]) != _canonical(grid):
            path.unlink()
            counted = counted_seconds(record["sittings"])
            say(f"ended the from-scratch measurement of `{record['command']}` ({counted / 3600:.2f} h counted over "
                f"{len(record['sittings'])} call(s)): this call trains another grid into the same folders, so no "
                "single command's cost is measured there any more")
            return None
        else:
            counted = counted_seconds(record["sittings"])
            say(f"from-scratch clock: {counted / 3600:.2f} h counted over {len(record['sittings'])} earlier "
                f"call(s) of `{record['command']}`; this call's wall time is added")
    return clock.start()


def _canonical(grid: dict) -> dict:
    """A grid's cells, whatever order the command listed its students, methods or seeds in."""
    return {key: sorted(value) if isinstance(value, list) else value for key, value in grid.items()}


def _utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def _dumps(record: dict) -> str:
    return json.dumps(record, indent=1)
