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
