"""The run layer: one :class:`RunSpec` per student run (its one identity), run folders with locks, execution."""

from hetcomp.runs.execute import distill, train_run
from hetcomp.runs.spec import RunSpec, default_recipe, make_spec, teacher_digests, teachers_digest
from hetcomp.runs.store import RunStore

__all__ = ["RunSpec", "RunStore", "default_recipe", "distill", "make_spec", "teacher_digests", "teachers_digest",
           "train_run"]
