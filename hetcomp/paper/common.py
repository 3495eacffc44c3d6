"""What every table shares: the run schedule, one dataset's reproduction, metric names and labels."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hetcomp.data import Split
from hetcomp.provenance import dataset_slug
from hetcomp.runs.grid import Inputs
from hetcomp.teachers import DEFAULT_TOP_M
from hetcomp.train import Callback

METRICS = ("recall@10", "ndcg@10", "recall@50", "ndcg@50")
HEADERS = ("R@10", "N@10", "R@50", "N@50")
#: Table 2's rows in the paper's order, with the paper's labels: the paper's CL-DRD is the unsampled form it ran
TABLE2_METHODS = {"none": "w/o KD", "rd": "RD", "rrd": "RRD", "mtd": "MTD", "cl-drd-full": "CL-DRD", "dcd": "DCD",
                  "hetcomp": "HetComp"}
#: every method's label in tables (kd is ours, not a paper row; cl-drd is CL-DRD's authors'-code form, an option)
LABELS = {**TABLE2_METHODS, "kd": "KD (loss menu)", "cl-drd": "CL-DRD (sampled)"}
#: the paper's students, in its tables' order (a page lists its students so, whatever order a call named them in)
TABLE2_STUDENTS = ("mf", "ml", "dnn")
#: what `reproduce --table 2` runs by default, in the tables' column order: the paper's rows and the KD menu
TABLE2_DEFAULT_METHODS = ("none", "rd", "rrd", "mtd", "cl-drd-full", "dcd", "kd", "hetcomp")
BASELINES = ("rd", "rrd", "mtd", "cl-drd-full", "cl-drd", "dcd", "kd")
#: rows whose method is the project's own construction or adaptation, marked in tables with their footnote
CONSTRUCTED = {"mtd": ("†", "MTD is this project's construction (hetcomp/distill/mtd.py): the HetComp paper describes "
                             "its MTD baseline but does not publish that implementation."),
               "kd": ("‡", "KD (loss menu) is this project's own baseline, not a row of the paper."),
               "cl-drd-full": ("§", "CL-DRD is the form the HetComp paper ran, without the sampling step: every "
                                    "unobserved item a negative, our reading of its groups, which the paper does not "
                                    "publish (hetcomp/distill/cl_drd_full.py, --method cl-drd-full)."),
               "cl-drd": ("¶", "CL-DRD (sampled) is an option row, not a row of the paper: CL-DRD with its authors' "
                               "sampled label groups (hetcomp/distill/cl_drd.py, --method cl-drd).")}
CURVE_METHODS = ("none", "dcd", "hetcomp")
#: the users ``--quick`` keeps (the first ones of the file)
QUICK_USERS = 300
#: Table 1: the MF teachers of different training seeds that form supervision (b)
MF_SEEDS = (0, 1, 2, 3, 4)
TABLE1_METHOD = "rrd"


@dataclass
class Schedule:
    """Training lengths: the paper's (default) or ``--quick``'s short ones."""

    teacher_dim: int = 64
    teacher_overrides: dict = field(default_factory=dict)
    max_epochs: int = 1000
    eval_every: int = 10
    method_options: dict = field(default_factory=dict)  # per method, e.g. HetComp's DKC period for --quick
    quick: bool = False

    def options(self, method: str) -> dict:
        """The method options this schedule sets (a fresh dict: callers may extend it)."""
        return dict(self.method_options.get(method, {}))

    @classmethod
    def short(cls) -> Schedule:
        """``--quick``: dim-16 teachers and 20-epoch runs, evaluated every 5 epochs."""
        return cls(teacher_dim=16, teacher_overrides={"max_epochs": 20, "eval_every": 5}, max_epochs=20,
                   eval_every=5, method_options={"hetcomp": {"period": 5, "deadline": 10}}, quick=True)


@dataclass
class Reproduction:
    """One dataset's inputs and where everything goes."""

    dataset: str
    split: Split
    teachers_dir: Path = Path("teachers")
    runs_dir: Path = Path("experiments/runs")
    results_dir: Path = Path("experiments/results")
    device: torch.device = torch.device("cpu")
    schedule: Schedule = field(default_factory=Schedule)
    command: str = ""
    train: bool = True  # False: tables from finished runs only; what is missing is listed, not trained
    progress: Callable[[str, int], Callback | None] = lambda label, total: None
    say: Callable[[str], None] = print
    #: how the command line names the data (``dataset`` and, for csv / recbole files, ``path`` and its columns)
    source: dict = field(default_factory=dict)
    #: how a Ray worker loads the same split and teachers (None: runs train in this process only)
    inputs: Inputs | None = None
    jobs: int = 1  # runs at once: > 1 (or ``ray_address``) trains the missing runs as Ray tasks
    ray_address: str | None = None
    teacher_top_m: int = DEFAULT_TOP_M  # items kept per user and state in a trained teacher's trajectory
    #: a table2.csv whose wall times order parallel runs longest first (None: this table's own ledger)
    durations_from: Path | None = None
    #: Table 2 may replace ledger rows that other teachers made (else that is an error naming the fix)
    replace_other_teachers: bool = False
    #: Table 2 trains the seeds of a run whose method stacks as one stacked model (``hetcomp.stacked``; a GPU):
    #: True for every method that stacks, or the names of the methods to stack
    stack_seeds: bool | frozenset[str] = False
    #: at most this many seeds a stack (None: a row's seeds in one)
    stack_size: int | None = None
    #: where the settings of ``hetcomp tune`` are read from (None: ``experiments/tuning``)
    tuning_dir: Path | None = None
    #: Table 2 may train cells that have no study while others of its grid have one (else that is an error)
    allow_untuned: bool = False
    #: Table 2 in this process (one job): runs another process is training now are left to it, this call ending
    #: once the free ones are done (else it waits for them, then reuses them)
    leave_busy: bool = False

    @property
    def label(self) -> str:
        return dataset_slug(self.split.meta["dataset"])

    @property
    def out_dir(self) -> Path:
        return self.results_dir / self.label
