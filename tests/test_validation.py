"""Every input is checked where it enters: command-line options and ``-o`` values give one clear line and a
non-zero exit (never a traceback, never a run on a wrong value); valid edge values pass; the parser's rules."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from typer.testing import CliRunner

from hetcomp.cli import app
from hetcomp.config import check_option, knob, parse_options, validate
from hetcomp.data import HetCompError
from hetcomp.distill import METHODS, EnsembleConfig, method_class
from hetcomp.distill.hetcomp import HetCompConfig
from hetcomp.distill.knowledge import DKCConfig
from hetcomp.models import MODELS, model_class, model_config
from hetcomp.train import TrainerConfig

runner = CliRunner()


def folders(tmp_path) -> list[str]:
    """Point every folder of a command into tmp_path: a check that let a value through must not touch the repo."""
    return ["--data-dir", str(tmp_path / "data"), "--cache-dir", str(tmp_path / "cache"),
            "--teachers-dir", str(tmp_path / "teachers")]


def fails_cleanly(args: list[str], *named: str) -> str:
    """The command ends with exit code 1 and one line ``error: …`` naming ``named``; no exception escaped."""
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not an uncaught error
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for text in named:
        assert text in lines[0], lines[0]
    return lines[0]


# ---- each bad input of the issue: one line, the value named, exit 1 -----------------------------------------

@pytest.mark.parametrize("args,named", [
    (["-o", "preset=Code"], ["preset=Code", "paper, code"]),
    (["--temperature", "0"], ["--temperature 0", "> 0"]),
    (["--weight-power", "nan"], ["--weight-power nan", "finite"]),
    (["--dim", "0"], ["--dim 0", "≥ 1"]),
    (["--dim", "-3"], ["--dim -3", "≥ 1"]),
    (["--batch-users", "0"], ["--batch-users 0", "≥ 1"]),
    (["--lr", "-1"], ["--lr -1", "> 0"]),
    (["--seed", "-1"], ["--seed -1", "≥ 0"]),
    (["-o", "period=abc"], ["-o period=abc: period of hetcomp must be an integer ≥ 1 (got 'abc')"]),
    (["-o", "k=0"], ["-o k=0", "k of hetcomp", "≥ 1"]),
    (["-o", "period=-1"], ["-o period=-1", "≥ 1"]),
    (["--max-epochs", "0"], ["--max-epochs 0", "≥ 1"]),
    (["-m", "n_negatives"], ["-m n_negatives: a student model setting must look like NAME=VALUE"]),
    (["-m", "n_negatives=0"], ["-m n_negatives=0", "≥ 1"]),
    (["-m", "lr=0.1"], ["-m lr", "--lr"]),
    (["--tuning-dir", "nowhere"], ["--tuning-dir nowhere: no such folder", "hetcomp tune"]),
], ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_distill_rejects_the_issues_inputs(tmp_path, args, named):
    fails_cleanly(["distill", *folders(tmp_path), "--runs-dir", str(tmp_path / "runs"), *args], *named)


@pytest.mark.parametrize("args,named", [
    (["--temperature", "0"], ["--temperature 0"]),
    (["--temperature", "inf"], ["--temperature inf"]),
    (["--weight-power", "nan"], ["--weight-power nan"]),
    (["--decay", "Exp"], ["--decay 'Exp'", "exp, power"]),
    (["--seed", "-1"], ["--seed -1"]),
])
def test_evaluate_rejects_a_bad_ensemble(tmp_path, args, named):
    fails_cleanly(["evaluate", *folders(tmp_path), *args], *named)


def test_reproduce_rejects_a_tuning_dir_that_does_not_exist(tmp_path):
    fails_cleanly(["reproduce", *folders(tmp_path), "--table", "2", "--tuning-dir", str(tmp_path / "nowhere")],
                  f"--tuning-dir {tmp_path / 'nowhere'}: no such folder")


@pytest.mark.parametrize("args,named", [
    (["--stack-methods", "rrd"], ["--stack-methods", "add --stack-seeds"]),
    (["--stack-size", "3"], ["--stack-size", "add --stack-seeds"]),
    (["--stack-seeds", "--stack-size", "0"], ["--stack-size"]),
    (["--stack-seeds", "--stack-methods", "rrd,magic"], ["unknown method in --stack-methods magic", "hetcomp"]),
    (["--leave-busy", "--jobs", "2"], ["--leave-busy", "--jobs 1"]),
])
def test_reproduce_rejects_stack_methods_it_cannot_apply(tmp_path, args, named):
    fails_cleanly(["reproduce", *folders(tmp_path), "--table", "2", *args], *named)


@pytest.mark.parametrize("args,named", [
    (["--dim", "-3"], ["--dim -3"]),
    (["--dim", "0"], ["--dim 0"]),
    (["--top-m", "0"], ["--top-m 0", "≥ 1"]),
    (["--seed", "-1"], ["--seed -1"]),
    (["--eval-every", "0"], ["--eval-every 0"]),
    (["--threads", "0"], ["--threads 0"]),
])
def test_train_teachers_rejects_bad_options(tmp_path, args, named):
    fails_cleanly(["train-teachers", *folders(tmp_path), *args], *named)


def test_distill_rejects_unknown_and_malformed_options(tmp_path):
    base = ["distill", *folders(tmp_path), "--runs-dir", str(tmp_path / "runs")]
    line = fails_cleanly([*base, "-o", "colour=red"], "-o colour=red", "hetcomp has no setting colour")
    assert "period (an integer ≥ 1)" in line and "preset (one of paper, code)" in line  # the method's knobs
    fails_cleanly([*base, "-o", "period"], "-o period", "NAME=VALUE")
    fails_cleanly([*base, "--method", "none", "-o", "k=1"], "method none has no setting k")
    fails_cleanly([*base, "--method", "kd", "--kd-loss", "kl:x"], "--kd-loss kl:x", "not a number")  # no emoji
    fails_cleanly([*base, "--method", "kd", "-o", "losses=kl:nan"], "-o losses=kl:nan", "finite")
    fails_cleanly([*base, "--method", "rrd", "-o", "sample=maybe"], "sample of rrd must be true or false")
    fails_cleanly([*base, "-o", "alpha=nan"], "alpha of hetcomp must be a finite number > 0 (got 'nan')")


def test_sep_is_one_character_and_backslash_t_means_tab(tmp_path):
    data = tmp_path / "toy.tsv"
    data.write_text("u\ti\n" + "\n".join(f"{u}\t{(u * 7 + k) % 13}" for u in range(20) for k in range(8)))
    args = ["datasets", "info", "csv", "--path", str(data), "--user-col", "u", "--item-col", "i",
            "--cache-dir", str(tmp_path / "cache")]
    result = runner.invoke(app, [*args, "--sep", "\\t"])  # what `--sep '\t'` gives in a shell
    assert result.exit_code == 0, result.output
    assert "file sha256" in result.output
    fails_cleanly([*args, "--sep", ";;"], "--sep ;;", "one character")
    fails_cleanly([*args, "--sep", ""], "one character")
    fails_cleanly(["reproduce", "--dataset", "csv", "--table", "2", "--path", str(data), "--sep", "\\t\\t"],
                  "--sep \\t\\t")
    fails_cleanly(["reproduce", "--table", "2", "--jobs", "0"], "--jobs 0")
    fails_cleanly(["reproduce", "--table", "2", "--jobs", "2", "--durations-from", str(tmp_path / "none.csv")],
                  "--durations-from", "no such file")


def test_reproduce_names_only_the_unknown_table_or_figure():
    """An unknown --table or --figure is named with what it accepts; the option not given is not mentioned."""
    assert "None" not in fails_cleanly(["reproduce", "--table", "7"], "unknown --table '7'", "1, 2, cost")
    assert "None" not in fails_cleanly(["reproduce", "--figure", "bars"], "unknown --figure 'bars'", "curves")


# ---- valid edge values are accepted ---------------------------------------------------------------------

@pytest.mark.parametrize("args", [["-o", "preset=code"], ["--weight-power", "0"], ["--weighting", "uniform"],
                                  ["--seed", "0", "--dim", "1", "--max-epochs", "1", "--batch-users", "1"],
                                  ["--lr", "1e-4", "--weight-decay", "0"], ["-o", "deadline=none"],
                                  ["--method", "cl-drd", "-o", "stages=7"], ["--method", "kd", "--kd-loss", "ce"]])
def test_distill_accepts_valid_edge_values(tmp_path, args):
    """The options pass their checks: the command goes on to look the dataset up (an unknown name here)."""
    result = runner.invoke(app, ["distill", "--dataset", "no-such-data", *folders(tmp_path), *args])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "no-such-data" in result.output and "must be" not in result.output


def test_library_configs_accept_their_edge_values():
    assert EnsembleConfig(weight_power=0).weight_power == 0
    assert EnsembleConfig(decay="power", beta=0.0, weighting="uniform").decay == "power"
    assert HetCompConfig(preset="code", clamp=0.0, deadline=None, dkc_form="paper").preset == "code"
    assert DKCConfig(k=1, period=1, deadline=None).k == 1
    assert TrainerConfig(lr=1e-2, max_epochs=1, top_m=None, ks=(1,)).max_epochs == 1
    assert model_config("ae", dropout=0.0).dropout == 0.0
    for name in METHODS:  # every default is valid
        validate(method_class(name).config_class())
    for name in MODELS:
        validate(model_class(name).config_class())


# ---- the library API is protected too ---------------------------------------------------------------------

@pytest.mark.parametrize("build,named", [
    (lambda: EnsembleConfig(temperature=0), "temperature of the ensemble must be a finite number > 0 (got 0)"),
    (lambda: EnsembleConfig(weight_power=math.nan), "weight_power of the ensemble"),
    (lambda: EnsembleConfig(decay="Exp"), "decay of the ensemble must be one of exp, power"),
    (lambda: HetCompConfig(preset="Code"), "preset of hetcomp must be one of paper, code (got 'Code')"),
    (lambda: HetCompConfig(k=0), "k of hetcomp"),
    (lambda: HetCompConfig(period="10"), "period of hetcomp must be an integer"),
    (lambda: DKCConfig(period=-1), "period of DKC"),
    (lambda: TrainerConfig(max_epochs=0), "max_epochs of the trainer"),
    (lambda: TrainerConfig(lr=-1.0), "lr of the trainer"),
    (lambda: model_config("mf", dim=0), "dim of model 'mf' must be an integer ≥ 1 (got 0)"),
    (lambda: model_config("ml", lr=math.inf), "lr of model 'ml'"),  # a subclass keeps its base's range
    (lambda: model_config("ae", dropout=1.0), "dropout of model 'ae' must be a finite number ≥ 0 and < 1"),
])
def test_configs_built_in_code_are_checked(build, named):
    with pytest.raises(HetCompError) as error:
        build()
    assert named in str(error.value)


# ---- the parser -------------------------------------------------------------------------------------------

@dataclass
class Toy:
    owner = "toy"
    count: int = knob(3, ge=1)
    rate: float = knob(0.5, gt=0, le=1)
    wild: float = knob(0.0, nonfinite=True)
    flag: bool = False
    limit: int | None = knob(None, ge=0)
    mode: str = knob("a", choices=("a", "b"))
    name: str = "x"
    sizes: tuple[int, ...] = knob((1, 2), ge=1)

    def __post_init__(self) -> None:
        validate(self)


def test_parse_options_converts_to_each_fields_type():
    parsed = parse_options(Toy, {"count": "7", "rate": "0.25", "wild": "-inf", "flag": "true", "limit": "none",
                                 "mode": "b", "name": "hello=world", "sizes": "3,4"})
    assert parsed == {"count": 7, "rate": 0.25, "wild": -math.inf, "flag": True, "limit": None, "mode": "b",
                      "name": "hello=world", "sizes": (3, 4)}
    assert Toy(**parsed).sizes == (3, 4)
    assert parse_options(Toy, {"flag": "No", "limit": "0", "mode": '"a"'}) == {"flag": False, "limit": 0, "mode": "a"}
    rate = parse_options(Toy, {"rate": "1"})["rate"]  # an integer stays one, as JSON read it (run names hash it)
    assert rate == 1 and isinstance(rate, int)
    assert parse_options(Toy, {"count": 5}) == {"count": 5}  # values already typed are checked as they are
    assert math.isnan(parse_options(Toy, {"wild": "nan"})["wild"])  # this field allows it


@pytest.mark.parametrize("options,message", [
    ({"count": "abc"}, "-o count=abc: count of toy must be an integer ≥ 1 (got 'abc')"),
    ({"count": "0"}, "-o count=0: count of toy must be an integer ≥ 1 (got '0')"),
    ({"count": "2.5"}, "count of toy must be an integer"),
    ({"rate": "0"}, "rate of toy must be a finite number > 0 and ≤ 1 (got '0')"),
    ({"rate": "nan"}, "rate of toy must be a finite number"),
    ({"rate": "inf"}, "rate of toy must be a finite number"),
    ({"flag": "maybe"}, "flag of toy must be true or false (got 'maybe')"),
    ({"limit": "-1"}, "limit of toy must be an integer ≥ 0 or none (got '-1')"),
    ({"mode": "A"}, "mode of toy must be one of a, b (got 'A')"),
    ({"sizes": "1,0"}, "sizes of toy must be comma-separated integers each ≥ 1"),
    ({"count": True}, "count of toy must be an integer"),
    ({"speed": "1"}, "-o speed=1: toy has no setting speed; its settings: count (an integer ≥ 1), rate ("),
])
def test_parse_options_rejects_with_one_line(options, message):
    with pytest.raises(HetCompError) as error:
        parse_options(Toy, options)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_check_option_names_the_option_and_an_example():
    check_option("--dim", 1, 6, ge=1)
    check_option("--lr", None, 0.01, gt=0)  # not given: the default applies
    for value, text in ((0, "--dim 0: must be an integer ≥ 1, e.g. --dim 6"), (math.nan, "--dim nan")):
        with pytest.raises(HetCompError, match=text):
            check_option("--dim", value, 6, ge=1)


def test_a_commands_warning_is_one_line_without_the_source(capsys):
    import warnings

    from hetcomp.cli.common import friendly_errors

    @friendly_errors
    def command() -> int:
        warnings.warn("these settings were chosen with other teachers", stacklevel=2)
        return 7

    assert command() == 7
    out = capsys.readouterr().out
    assert out.strip() == "warning: these settings were chosen with other teachers"
