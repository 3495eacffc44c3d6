"""CL-DRD as the HetComp paper ran it: no sampling step (a registered method of its own, ``cl-drd-full``).

The same curriculum and LambdaMRR loss as :mod:`hetcomp.distill.cl_drd` (read its docstring for the label
groups), with every member of each group used instead of a sample: the ensemble's top-n_s unobserved items as
the finely ordered head, *all* its ranks (n_s, N] as hard items, and *every* other unobserved item of the user as
a negative; p is the student's rank among all the user's unobserved items:

    L_u = Σ_{(i,j): label_i > label_j} |1/p_i − 1/p_j| · softplus(f_j − f_i),
    L = L_own + weight · mean_u L_u

(:func:`hetcomp.distill.losses.lambda_mrr_rest_loss`, linear in n_items per user). It is the loss
:class:`~hetcomp.distill.cl_drd.CLDRD` computes with its sampling step off, registered apart so that it has its own
tuning study (its weight is on a per-user sum, four or more decades from the sampled form's pair mean, so one study
cannot serve both) and its own rows. It is Table 2's "CL-DRD" row, the form the paper ran; the sampled form is the
option row "CL-DRD (sampled)".

What it costs: an epoch ~12 s on one CPU thread for Foursquare's MF student (48 s before the rest term's rework
of 2026-12-05, 23 s before its row passes became numba kernels; ~17–25 s on a slower CPU, with the order's radix
sort; on a slow Intel Xeon ~19 s of CPU time since the batch's gradient is made in one tensor, 29 s before;
`experiments/results/bench.md`), ~12× a sampled CL-DRD epoch, so a study of 16 trials is most of a day of one
core: a long CPU lane or GPU work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from hetcomp.config import knob, validate
from hetcomp.distill.cl_drd import CLDRD, CLDRDConfig, CurriculumConfig


@dataclass
class CLDRDFullConfig(CurriculumConfig):
    owner = "cl-drd-full"
    #: on the per-user sum (HetComp's L_O weight, also a list against every unobserved item): a start, tuned below
    weight: float = knob(0.01, ge=0)
    #: the form, fixed: the sampled one is ``--method cl-drd``
    sampling: ClassVar[bool] = False

    #: what ``hetcomp tune`` searches on validation: the sampled study's curriculum choices, and the weight's five
    #: decades centred on the default, for a sum over every unobserved item
    search_space: ClassVar[dict] = {**CLDRDConfig.search_space, "weight": ("float_log", 1e-5, 1.0)}

    def __post_init__(self) -> None:
        validate(self)


class CLDRDFull(CLDRD):
    """CL-DRD without its sampling step: LambdaMRR of the ensemble's top-N against every unobserved item."""

    name = "cl-drd-full"
    config_class = CLDRDFullConfig
