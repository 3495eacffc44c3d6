"""Which finished studies' start points have moved since they began (validation-free: reads summaries only).

A study's first trials are informed guesses read from other studies (w/o KD's recipe for the methods with an own
loss, RRD's choice for DCD, the MF study's options for the ML and DNN students). When one of those studies chose
again after this one began, `hetcomp tune` tries the moved point once the study goes on (a larger `--trials`);
this lists, per summary in a tuning folder, the start points it would try, without training anything:

    python experiments/plans/moved_start_points.py experiments/tuning/foursquare
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hetcomp.tune import moved_start_points
from hetcomp.tune_page import study_summaries


def moved_points(folder: Path) -> dict[str, list[dict]]:
    """Summary file name → the start points none of its trials tried (only summaries with some)."""
    moved = {name: moved_start_points(summary, folder.parent) for name, summary in study_summaries(folder)}
    return {name: points for name, points in moved.items() if points}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a tuning folder of one dataset, e.g. experiments/tuning/citeulike")
    for name, points in moved_points(parser.parse_args().folder).items():
        for point in points:
            shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items())
            print(f"{name}: {shown}")


if __name__ == "__main__":
    main()
