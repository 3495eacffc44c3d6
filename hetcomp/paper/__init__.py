"""The paper layer: `hetcomp reproduce`'s tables and figures regenerated from real data.

Every table is built from runs: teachers (``train_teacher``) and students (``distill``), each reused when it is
already finished, so an interrupted reproduce resumes. The CSV files under ``experiments/results/<dataset>/``
are the source of truth (:mod:`~hetcomp.paper.ledger`): one row per run, with the command that reruns it, its seed
and the identity of its configuration (:mod:`~hetcomp.paper.identity`: a hash of the dataset split, the teachers'
settings and the run's settings). A row whose configuration hash matches is reused even when its run folder is
gone (run folders are not committed), so a long table accumulates over several sessions; each row also records
the digest of the teachers' rankings it was trained from, and the Markdown table says when rows came from
differently-trained (but identically configured) teachers.

``--quick`` runs the same pipeline on the first users of the dataset with short schedules (a few minutes);
its numbers only show that the pipeline works.

Modules: common (schedule, reproduction, labels), teachers, identity, ledger, scheduler, pages (renderers),
manifest, and one per table or figure: table2, table1, cost, curves. Nothing below this layer imports it.
"""
