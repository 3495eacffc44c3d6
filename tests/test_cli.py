"""The command line: help, dataset commands on generated files, and clear errors instead of tracebacks."""

from __future__ import annotations

from typer.testing import CliRunner

from hetcomp.cli import app

runner = CliRunner()


def test_help_lists_every_command_with_one_line():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("datasets", "train-teachers", "evaluate", "distill", "import-teacher", "bench"):
        assert command in result.output


def test_datasets_list_and_info_on_a_csv(tmp_path):
    data = tmp_path / "toy.csv"
    data.write_text("u,i\n" + "\n".join(f"{u},{(u * 7 + k) % 13}" for u in range(20) for k in range(8)))
    listed = runner.invoke(app, ["datasets", "list", "--data-dir", str(tmp_path)])
    assert listed.exit_code == 0 and "citeulike" in listed.output
    info = runner.invoke(app, ["datasets", "info", "csv", "--path", str(data), "--user-col", "u", "--item-col", "i",
                               "--cache-dir", str(tmp_path / "cache")])
    assert info.exit_code == 0, info.output
    assert "train" in info.output and "file sha256" in info.output and "split sha256" in info.output


def test_errors_are_messages_not_tracebacks(tmp_path):
    unknown = runner.invoke(app, ["datasets", "info", "nope", "--data-dir", str(tmp_path)])
    assert unknown.exit_code == 1 and "Known datasets" in unknown.output and "Traceback" not in unknown.output
    missing = runner.invoke(app, ["evaluate", "--dataset", "csv"])
    assert missing.exit_code == 1 and "--path" in missing.output
    bad_method = runner.invoke(app, ["distill", "--method", "magic"])
    assert bad_method.exit_code == 1 and "known methods" in bad_method.output


def test_citeulike_info_from_shared_file(citeulike_dir, tmp_path):
    result = runner.invoke(app, ["datasets", "info", "citeulike", "--data-dir", str(citeulike_dir),
                                 "--cache-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "5,219" in result.output and "25,181" in result.output
    assert "02d5d429b2c0362e0ed79f6ef204666b4092563d21493abf4dfb521e8a7078bf" in result.output


def test_every_command_reads_a_csv_file(tmp_path):
    """train-teachers, import-teacher, distill, evaluate and summarize take --path / --user-col / --item-col /
    --sep like `datasets info`, and --name must be a plain folder name."""
    import numpy as np

    from hetcomp.data import load_dataset
    from hetcomp.experiments import committed_teacher_digests
    from hetcomp.provenance import dataset_slug
    from hetcomp.runs.spec import trajectory_digest
    from hetcomp.teachers import load_teachers
    from hetcomp.trajectory import required_top_m

    rng = np.random.default_rng(0)
    rows = [f"user{u};{item}" for u in range(40) for item in rng.choice(70, size=14, replace=False)]
    data = tmp_path / "toy.csv"
    data.write_text("who;what\n" + "\n".join(rows))
    source = ["--dataset", "csv", "--path", str(data), "--user-col", "who", "--item-col", "what", "--sep", ";",
              "--cache-dir", str(tmp_path / "cache"), "--teachers-dir", str(tmp_path / "teachers")]
    trained = runner.invoke(app, ["train-teachers", *source, "--teachers", "mf", "--dim", "4", "--top-m", "50",
                                  "--eval-every", "1", "--device", "cpu"])
    assert trained.exit_code == 0, trained.output

    split = load_dataset("csv", path=data, user_col="who", item_col="what", sep=";", cache_dir=tmp_path / "cache")
    scores = rng.random((split.n_users, split.n_items))
    scores[split.train.nonzero()] = -1
    top = np.argsort(-scores, axis=1)[:, :required_top_m(split)]
    lines = ["state,user,rank,item"] + [f"1,{split.user_ids[u]},{r + 1},{split.item_ids[i]}"
                                        for u in range(split.n_users) for r, i in enumerate(top[u])]
    rankings = tmp_path / "rankings.csv"
    rankings.write_text("\n".join(lines))
    escaping = runner.invoke(app, ["import-teacher", *source, "--file", str(rankings), "--name", "../../x"])
    assert escaping.exit_code == 1 and "plain folder name" in escaping.output
    assert not (tmp_path / "x").exists()
    imported = runner.invoke(app, ["import-teacher", *source, "--file", str(rankings), "--name", "ext"])
    assert imported.exit_code == 0, imported.output

    runs = ["--runs-dir", str(tmp_path / "runs")]
    distilled = runner.invoke(app, ["distill", *source, *runs, "--teachers", "mf,ext", "--method", "rd",
                                    "--dim", "4", "--max-epochs", "2", "--device", "cpu"])
    assert distilled.exit_code == 0, distilled.output
    assert "mf-rd dim 4" in distilled.output and list((tmp_path / "runs" / "csv-toy").iterdir())
    evaluated = runner.invoke(app, ["evaluate", *source, "--names", "mf,ext"])
    assert evaluated.exit_code == 0, evaluated.output
    assert "overlap of the converged teachers" in evaluated.output
    (tmp_path / "teachers-notes.md").write_text("Measured by hand: a rerun gave the same digests.\n")
    for _ in range(2):  # regenerating the page keeps the hand-written notes, once
        written = runner.invoke(app, ["evaluate", *source, "--names", "mf", "--write", str(tmp_path / "teachers.md")])
        assert written.exit_code == 0, written.output
    text = (tmp_path / "teachers.md").read_text()
    assert text.count("Measured by hand: a rerun gave the same digests.") == 1
    assert "written by hand in `teachers-notes.md`, kept when this page is regenerated" in text
    label = split.meta["dataset"]  # the page, read back as train-teachers reads the committed one
    (tmp_path / f"teachers-{dataset_slug(label)}.md").write_text(text)
    mf = load_teachers(split, tmp_path / "teachers", ["mf"])[0]
    assert committed_teacher_digests(label, tmp_path)[1] == {"mf": (trajectory_digest(mf)[:12],
                                                                    str(mf.meta.get("threads", "-")))}
    (tmp_path / f"teachers-{dataset_slug(label)}.md").write_text(  # a notes table names the studies' teachers
        text + "\n| teacher | threads | digest |\n|---|---|---|\n| mf | 2 | 0123456789ab |\n")
    assert committed_teacher_digests(label, tmp_path)[1] == {"mf": ("0123456789ab", "2")}
    page = tmp_path / "page.md"
    summarized = runner.invoke(app, ["summarize", *source, *runs, "--write", str(page)])
    assert summarized.exit_code == 0 and page.is_file(), summarized.output


def test_train_teachers_keeps_what_a_small_catalogue_allows(tmp_path):
    """The default top-M shrinks to the unobserved items a user has (a longer ranking could never be loaded);
    an explicit one that cannot fit is refused before any training."""
    import numpy as np

    from hetcomp.data import load_dataset
    from hetcomp.teachers import load_teachers

    rng = np.random.default_rng(2)
    data = tmp_path / "small.csv"
    data.write_text("user_id,item_id\n" + "\n".join(f"{u},{i}" for u in range(40)
                                                    for i in rng.choice(60, size=12, replace=False)))
    source = ["--dataset", "csv", "--path", str(data), "--cache-dir", str(tmp_path / "cache"),
              "--teachers-dir", str(tmp_path / "teachers"), "--teachers", "mf", "--dim", "4", "--device", "cpu"]
    too_long = runner.invoke(app, ["train-teachers", *source, "--top-m", "200"])
    assert too_long.exit_code == 1 and "--top-m 200" in too_long.output and "60 items" in too_long.output
    assert not list((tmp_path / "teachers").rglob("*.npz"))
    trained = runner.invoke(app, ["train-teachers", *source, "--eval-every", "50"])
    assert trained.exit_code == 0, trained.output
    split = load_dataset("csv", path=data, cache_dir=tmp_path / "cache")
    (teacher,) = load_teachers(split, tmp_path / "teachers", ["mf"])
    assert teacher.top_m == split.fewest_unobserved


def test_train_teachers_names_each_digest_and_warns_where_the_committed_page_lists_another(tmp_path, monkeypatch):
    """A teacher retrained on another CPU or thread count can rank a few items differently; train-teachers says so
    at once, against the committed teachers page, instead of leaving it to `tune` refusing the studies later."""
    import numpy as np

    from hetcomp.data import load_dataset
    from hetcomp.provenance import dataset_slug

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    rows = [f"{u},{item}" for u in range(40) for item in rng.choice(70, size=14, replace=False)]
    (tmp_path / "toy.csv").write_text("u,i\n" + "\n".join(rows))
    source = ["--dataset", "csv", "--path", "toy.csv", "--user-col", "u", "--item-col", "i", "--cache-dir", "cache",
              "--teachers-dir", "teachers", "--teachers", "mf", "--dim", "4", "--top-m", "50", "--eval-every", "1",
              "--device", "cpu"]
    split = load_dataset("csv", path=tmp_path / "toy.csv", user_col="u", item_col="i", cache_dir="cache")
    label = split.meta["dataset"]
    page = tmp_path / "experiments" / "results" / f"teachers-{dataset_slug(label)}.md"
    page.parent.mkdir(parents=True)
    page.write_text("| teacher | params | ... | threads | digest |\n|---|---|---|---|---|\n"
                    "| mf | 1,000 | [1, 2, 3, 4] | 1 | 0123456789ab |\n")
    trained = runner.invoke(app, ["train-teachers", *source])
    assert trained.exit_code == 0, trained.output
    text = " ".join(trained.output.split())
    digest = text.split("digest ")[1][:12]
    assert "differ from the committed teacher's" in text and "0123456789ab" in text and "--threads" in text
    assert "ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2" in text  # the way to another CPU's rankings
    for folder in ("teachers", "fresh"):  # skipped (already trained) or trained now: the same, now an error
        required = runner.invoke(app, ["train-teachers", *source, "--teachers-dir", folder, "--require-committed"])
        assert required.exit_code != 0 and "Traceback" not in required.output
        assert "--require-committed: mf's digest differs" in " ".join(required.output.split())
    assert (tmp_path / "fresh").is_dir()
    page.write_text(page.read_text().replace("0123456789ab", digest))
    skipped = runner.invoke(app, ["train-teachers", *source, "--require-committed"])
    assert skipped.exit_code == 0, skipped.output
    assert "skipped" in skipped.output and f"digest {digest}" in skipped.output
    assert "differ from the committed" not in " ".join(skipped.output.split())


def test_the_training_progress_shows_validation_only():
    """While a run trains, each evaluation's line names its validation R@50 and never the test split's: test
    numbers are reported once, at the end, where nothing is chosen from them."""
    from types import SimpleNamespace

    from rich.console import Console
    from rich.progress import Progress

    from hetcomp.cli.common import ProgressCallback

    console = Console(record=True, width=200)
    with Progress(console=console) as progress:
        callback = ProgressCallback(progress, "mf-rrd", 10)
        trainer = SimpleNamespace(config=SimpleNamespace(monitor="recall@50"),
                                  objective=SimpleNamespace(describe=lambda: "phase L_O"))
        callback.on_evaluate(trainer, 10, {"valid": {"recall@50": 0.1234}, "test": {"recall@50": 0.9876}}, True)
    text = console.export_text()
    assert "valid R@50 0.1234*" in text and "phase L_O" in text
    assert "0.9876" not in text and "test" not in text


def test_the_cli_starts_without_importing_every_method():
    """Building the commands (what every `hetcomp ...` call does first) imports no distillation method: an
    option's default that needs the method classes is resolved when its command runs."""
    import subprocess
    import sys

    code = ("import sys, hetcomp.cli; from hetcomp.distill import METHODS; "
            "print(sorted(m for m in sys.modules if m.startswith('hetcomp.distill.') and m.rsplit('.', 1)[1] in "
            "{v.split(':')[0].rsplit('.', 1)[1] for v in METHODS.values()}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
