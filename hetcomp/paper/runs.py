"""The student runs of a table: each a :class:`~hetcomp.runs.RunSpec` made from the reproduction's schedule,
trained in this process or as Ray tasks, and recorded in the ledger by this (driver) process alone."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from math import inf
from pathlib import Path

from hetcomp.ensemble import EnsembleConfig
from hetcomp.errors import HetCompError
from hetcomp.paper.common import METRICS, Reproduction
from hetcomp.paper.ledger import CURVE_COLUMNS, TABLE2_COLUMNS, locked, read_rows, write_rows
from hetcomp.runs import RunSpec, RunStore, make_spec, train_run
from hetcomp.runs.execute import train_stack
from hetcomp.runs.grid import run_grid, stack_units
from hetcomp.runs.spec import twin_spec
from hetcomp.runs.tuned import RECIPE, flat_settings, json_object_or_none, summary_path, trial_run_seconds


def run_spec(rep: Reproduction, trajectories: Sequence, student: str, method: str, seed: int, dim: int = 6,
             options: dict | None = None, ensemble: EnsembleConfig | None = None) -> RunSpec:
    """One student run of this reproduction (its schedule's limits and method options)."""
    options = dict(rep.schedule.options(method), **(options or {}))
    return make_spec(rep.split, trajectories, student, method, dim, seed, options, ensemble,
                     max_epochs=rep.schedule.max_epochs, eval_every=rep.schedule.eval_every,
                     source=rep.source or {"dataset": rep.dataset}, tuning_dir=rep.tuning_dir)


def rerun_command(rep: Reproduction, spec: RunSpec) -> str:
    """The command that reruns a run: its ``hetcomp distill`` line (a quick slice has none: this reproduce)."""
    return rep.command if rep.schedule.quick else spec.command()


@contextmanager
def progress_bars(rep: Reproduction, specs: Sequence[RunSpec]) -> Iterator[Callable[[RunSpec], list | None]]:
    """Each run's progress bar while training (none when ``rep.train`` is off), as the callbacks of its trainer;
    removed afterwards (a reproduce shows one per run: finished ones must not pile up)."""
    bars = {spec.seed: rep.progress(f"{spec.student}-{spec.method} seed {spec.seed}", spec.max_epochs)
            if rep.train else None for spec in specs}
    try:
        yield lambda spec: [bars[spec.seed]] if bars[spec.seed] else None
    finally:
        for bar in bars.values():
            if bar is not None and hasattr(bar, "close"):
                bar.close()


def student_run(rep: Reproduction, trajectories: Sequence, spec: RunSpec) -> dict | None:
    """Train (or reuse) one run in this process; None when it is not finished and ``rep.train`` is off."""
    with progress_bars(rep, [spec]) as callbacks:
        return train_run(spec, rep.split, trajectories, RunStore(rep.runs_dir), rep.device, callbacks(spec),
                         rep.train, rep.say)


def study_walls(root: Path | None = None) -> Callable[[RunSpec], float | None]:
    """A run's wall seconds as its tuning study measured them: the cost of the run of the trial whose settings the
    run uses (the study summary's chosen trial, or the other study's trial a ``chosen_from`` names;
    :func:`~hetcomp.runs.tuned.trial_run_seconds`), read from the summaries under ``root`` (None:
    ``experiments/tuning``); None where the run's lr, weight decay or options are not those settings, or there is
    no such summary or figure. A trial ran on the study's seed with the table's epoch limits, so it prices a run
    before any run of its student and method has finished."""
    # read once per call of study_walls: a grid asks for every spec left after each finished run, and a trial
    # recorded before ``run_seconds`` reads its trials record and run folder
    summary = functools.cache(json_object_or_none)
    costs: dict[tuple[Path, str], float | None] = {}

    def trial_seconds(path: Path, number: object) -> float | None:
        key = (path, repr(number))  # repr: a corrupt summary's number may be a list
        if key not in costs:
            costs[key] = trial_run_seconds(path, number, summary(path) or {})
        return costs[key]

    def expected(spec: RunSpec) -> float | None:
        try:
            path = summary_path(spec.dataset, spec.student, spec.method, spec.dim, root)
            chosen = summary(path)
            settings = flat_settings((chosen or {}).get("settings") or {})
            config = dict(spec.method_config)
            uses = (bool(settings) and settings.get("lr") == spec.lr
                    and settings.get("weight_decay", spec.weight_decay) == spec.weight_decay
                    and all(config.get(name) == value for name, value in settings.items() if name not in RECIPE))
        except (AttributeError, TypeError):
            return None
        if not uses:
            return None
        source = chosen.get("chosen_from")
        if isinstance(source, dict) and isinstance(source.get("method"), str):
            other = summary_path(spec.dataset, spec.student, source["method"], spec.dim, root)
            return trial_seconds(other, source.get("trial"))
        return trial_seconds(path, chosen.get("best_trial"))

    return expected


def expected_walls(rows: Sequence[dict], fallback: Callable[[RunSpec], float | None] | None = None
                   ) -> Callable[[RunSpec], float | None]:
    """A run's expected wall seconds: the mean ``wall_seconds`` of the ledger ``rows`` of its student and method
    (any seed); else ``fallback``'s figure (e.g. :func:`study_walls`); None where neither has one."""
    walls: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        try:
            walls.setdefault((row["student"], row["method"]), []).append(float(row["wall_seconds"]))
        except (KeyError, ValueError):
            continue

    def expected(spec: RunSpec) -> float | None:
        seen = walls.get((spec.student, spec.method))
        if seen:
            return sum(seen) / len(seen)
        return fallback(spec) if fallback is not None else None

    return expected


def longest_first(specs: Sequence[RunSpec], rows: Sequence[dict],
                  fallback: Callable[[RunSpec], float | None] | None = None) -> list[RunSpec]:
    """``specs`` ordered by expected wall time (:func:`expected_walls`), longest first, so that a grid's slowest
    runs do not start last and leave the other workers idle at its end. Runs with no estimate go first (they may
    be long), and the given order is kept among equals."""
    expected = expected_walls(rows, fallback)
    return sorted(specs, key=lambda spec: inf if (seconds := expected(spec)) is None else seconds, reverse=True)


class Pace:
    """How fast this call's runs go against what was expected of them when it started: the summed wall time of
    its finished runs over their summed expected time (:func:`expected_walls` of the ledger as it was then, so
    that rows this call adds do not expect themselves). A table trained on a faster or busier machine than its
    ledger's, or with fewer workers sharing the cores, then gets an estimate of what is left at its own speed."""

    def __init__(self, expected: Callable[[RunSpec], float | None]) -> None:
        self.expected = expected
        self.observed = self.planned = 0.0
        self.runs = 0

    def add(self, spec: RunSpec, wall_seconds: float) -> None:
        """Count a finished run (one without an estimate does not tell the pace)."""
        planned = self.expected(spec)
        if planned and wall_seconds > 0:
            self.observed += wall_seconds
            self.planned += planned
            self.runs += 1

    @property
    def ratio(self) -> float | None:
        """This call's wall time per second expected; None before a run with an estimate has finished."""
        return self.observed / self.planned if self.runs else None


def time_left(specs: Sequence[RunSpec], rows: Sequence[dict], jobs: int = 1,
              fallback: Callable[[RunSpec], float | None] | None = None, pace: Pace | None = None) -> str:
    """What is left of a table, for its log: the runs, and the hours they should take by the ledger ``rows``
    (:func:`expected_walls`, else ``fallback``, e.g. the studies' trials; shared among ``jobs`` workers, and no
    fewer than the longest of them), scaled by ``pace`` where this call's finished runs tell it, naming how many
    runs have no estimate yet."""
    if not specs:
        return "nothing left"
    now = expected_walls(rows, fallback)
    ratio = pace.ratio if pace is not None else None

    def expected(spec: RunSpec) -> float | None:
        # at this call's pace, from what was expected when it started (where the ledger is this table's own, the
        # rows it has added since went at that pace already); the rest as the ledger says now
        planned = pace.expected(spec) if ratio is not None else None
        return planned * ratio if planned else now(spec)

    known = [seconds for spec in specs if (seconds := expected(spec)) is not None]
    unknown = len(specs) - len(known)
    if not known:
        return f"{len(specs)} runs left (no finished run of their student and method to estimate from yet)"
    hours = max(sum(known) / max(1, jobs), max(known)) / 3600  # no fewer than the longest run takes
    estimate = f"~{hours:.1f} h" if hours >= 1 else f"~{hours * 60:.0f} min"
    workers = f" on {jobs} workers" if jobs > 1 else ""
    source = "the ledger's mean wall time of their student and method" + (
        ", or their study's trial at the same settings" if fallback is not None else "")
    if ratio is not None:
        source += (f", at this call's pace ({ratio:.2f}× that over its {pace.runs} finished "
                   f"run{'s' if pace.runs > 1 else ''})")
    guess = (f" for {len(known)} of them, by {source}; {unknown} not yet estimated" if unknown
             else f" by {source}")
    return f"{len(specs)} runs left, {estimate}{workers}{guess}"


def train_missing(rep: Reproduction, trajectories: Sequence, specs: Sequence[RunSpec],
                  record: Callable[[RunSpec, dict], None]) -> None:
    """Train ``specs`` (or reuse their finished folders), calling ``record`` for each result in this process.

    One job: one after the other, here, runs that another process trains now (a reproduce beside this one)
    last, or not at all with ``rep.leave_busy``. More (``rep.jobs`` or ``rep.ray_address``): Ray tasks (or local
    processes), queued longest first (:func:`longest_first`, by ``rep.durations_from`` or this table's own
    ledger); a failed run stops the table after the others finish, naming each failure."""
    if not specs:
        return
    if not (rep.jobs > 1 or rep.ray_address):
        durations = rep.durations_from or rep.out_dir / "table2.csv"
        priced = study_walls(rep.tuning_dir)
        pace = Pace(expected_walls(read_rows(durations), priced))
        position, finished, store = 0, set(), RunStore(rep.runs_dir)
        units, deferred = stack_units(specs, rep.stack_seeds, rep.stack_size), []
        while units:
            # a run another process trains now (a reproduce beside this one) waits until the free ones are done:
            # two calls side by side then share the table's runs instead of taking turns on each one
            unit = next((unit for unit in units if not any(store.busy(spec) for spec in unit)), None)
            if unit is None and rep.leave_busy:
                rep.say(f"{len(units)} run(s) left to the process(es) training them now (--leave-busy)")
                break
            unit = unit or units[0]
            if unit is not units[0] and units[0] not in deferred:
                deferred.append(units[0])
                rep.say(f"{units[0][0].folder_name} is being trained by another process: "
                        + ("left to it unless free once the free runs are done" if rep.leave_busy
                           else "it waits until the free runs are done"))
            units.remove(unit)
            for spec in unit:
                position += 1
                rep.say(f"[{position}/{len(specs)}] {rerun_command(rep, spec)}")
            if len(unit) == 1:
                results = [student_run(rep, trajectories, unit[0])]
            else:
                rep.say(f"seeds {', '.join(str(spec.seed) for spec in unit)} as one stacked model")
                with progress_bars(rep, unit) as callbacks:
                    results = train_stack(unit, rep.split, trajectories, RunStore(rep.runs_dir), rep.device,
                                          rep.say, callbacks)
            for spec, result in zip(unit, results, strict=True):
                record(spec, result)
                finished.add(spec.identity)
            if rep.train and all(result is not None for result in results):
                walls = ", ".join(f"{result['wall_seconds']:.0f} s" for result in results)
                left = [spec for spec in specs if spec.identity not in finished]
                for spec, result in zip(unit, results, strict=True):
                    pace.add(spec, float(result["wall_seconds"]))
                rep.say(f"  done ({walls}); {time_left(left, read_rows(durations), fallback=priced, pace=pace)}")
        return
    if rep.inputs is None:
        raise HetCompError("training runs as Ray tasks needs to know how workers load the data (Reproduction.inputs)")
    where = rep.ray_address or f"{rep.jobs} local workers (Ray, or processes where Ray is not installed)"
    durations = rep.durations_from or rep.out_dir / "table2.csv"
    priced = study_walls(rep.tuning_dir)
    ledger = read_rows(durations)
    specs = longest_first(specs, ledger, priced)
    pace = Pace(expected_walls(ledger, priced))
    rep.say(f"training {len(specs)} runs on {where}, longest first by the wall times in {durations}"
            if durations.exists() else f"training {len(specs)} runs on {where}")
    bar = rep.progress(f"{len(specs)} runs, {rep.jobs} at a time", len(specs))
    done: set[str] = set()  # the finished runs' identities

    def finished(spec: RunSpec, metrics: dict) -> None:
        done.add(spec.identity)
        record(spec, metrics)
        pace.add(spec, float(metrics["wall_seconds"]))
        left = [other for other in specs if other.identity not in done]
        rep.say(f"[{len(done)}/{len(specs)}] {spec.folder_name} done ({metrics['wall_seconds']:.0f} s); "
                f"{time_left(left, read_rows(durations), rep.jobs, priced, pace)}")
        if bar is not None:
            bar.on_epoch_end(None, len(done), 0.0)

    try:
        report = run_grid(specs, rep.inputs, RunStore(rep.runs_dir), rep.jobs, rep.ray_address, on_result=finished,
                          say=rep.say, gpus_per_run=0.25 if rep.device.type == "cuda" else 0.0,
                          stack_seeds=rep.stack_seeds, stack_size=rep.stack_size)
    finally:
        if bar is not None and hasattr(bar, "close"):
            bar.close()
    if report.failures:
        raise HetCompError(f"{len(report.failures)} run(s) failed: "
                           + "; ".join(f"{spec.folder_name}: {message}" for spec, message in report.failures)
                           + " (finished runs are kept: rerun the same command to retry the rest)")


def table2_row(rep: Reproduction, spec: RunSpec, result: dict) -> tuple[dict, list[dict]]:
    """The ledger row of a finished run and its curve points."""
    row = {"dataset": rep.label, "student": spec.student, "method": spec.method, "seed": str(spec.seed),
           **{m: f"{result['test'][m]:.6f}" for m in METRICS}, "best_epoch": result["best_epoch"],
           "epochs": result["epochs"], "wall_seconds": result["wall_seconds"], "command": rerun_command(rep, spec),
           "config": spec.identity, "teachers_digest": spec.teachers_digest, "commit": result.get("commit", ""),
           "code_digest": result.get("code_digest", ""), "machine": result.get("machine", ""),
           "packages": result.get("packages", ""), "trained_as": result.get("trained_as", {}).get("identity", ""),
           "cpu_seconds": "" if result.get("cpu_seconds") is None else result["cpu_seconds"]}
    curve = [{"dataset": rep.label, "student": spec.student, "method": spec.method, "seed": spec.seed,
              "config": spec.identity, "epoch": p["epoch"], "valid_recall@50": f"{p['valid_recall@50']:.6f}",
              "test_recall@50": f"{p['test_recall@50']:.6f}"} for p in result["curve"]]
    return row, curve


def record_table2_row(rep: Reproduction, spec: RunSpec, result: dict) -> None:
    """Merge one run into table2.csv and curves.csv under the results lock; it replaces the row of the same
    student, method and seed made under another specification (older defaults, other teachers)."""
    _merge(rep, spec, *table2_row(rep, spec, result))


def _merge(rep: Reproduction, spec: RunSpec, row: dict, curve: list[dict]) -> None:
    table_file, curves_file = rep.out_dir / "table2.csv", rep.out_dir / "curves.csv"
    same = (spec.student, spec.method, str(spec.seed))
    with locked(rep.out_dir):
        write_rows(table_file, [r for r in read_rows(table_file)
                                if (r["student"], r["method"], r["seed"]) != same] + [row], TABLE2_COLUMNS)
        write_rows(curves_file, [c for c in read_rows(curves_file)
                                 if (c["student"], c["method"], c["seed"]) != same] + curve, CURVE_COLUMNS)


def twins_after(specs: Sequence[RunSpec]) -> tuple[list[RunSpec], list[RunSpec]]:
    """(the specs to train first, those to train after them): a spec whose twin (:func:`twin_spec`) is among
    ``specs`` waits for it, so that parallel workers do not train both; once the twin has finished, its run
    folder serves the spec at once."""
    identities = {spec.identity for spec in specs}
    later = [spec for spec in specs if (twin := twin_spec(spec)) is not None and twin.identity in identities]
    return [spec for spec in specs if spec not in later], later


def rows_from_twins(rep: Reproduction, specs: Sequence[RunSpec]) -> list[RunSpec]:
    """The ledger's side of a twin (see ``hetcomp.runs.execute``): a spec that trains exactly as another method's
    run (DCD at ``dcd_weight=0`` as its RRD) whose row is in the ledger gets that row and its curve under its own
    identity and command, ``trained_as`` naming the twin, although the twin's run folder is gone (a fresh
    machine keeps the committed ledger, not the folders). Returns the specs still without a row."""
    rows = {r["config"]: r for r in read_rows(rep.out_dir / "table2.csv")}
    curves: list[dict] | None = None  # read once, when a twin serves
    left = []
    for spec in specs:
        twin = twin_spec(spec)
        row = rows.get(twin.identity) if twin is not None else None
        if row is None:
            left.append(spec)
            continue
        curves = read_rows(rep.out_dir / "curves.csv") if curves is None else curves
        curve = [{**c, "method": spec.method, "config": spec.identity} for c in curves if c["config"] == twin.identity]
        _merge(rep, spec, {**row, "method": spec.method, "command": rerun_command(rep, spec),
                           "config": spec.identity, "trained_as": twin.identity}, curve)
        rep.say(f"{spec.student}-{spec.method} seed {spec.seed}: served by the finished {twin.method} run in the "
                f"ledger ({twin.identity}), which it trains exactly as")
    return left
