"""`report` never writes through a symlink in the store; `adjust` bounds its values."""

import os

import pytest

from evojax_nas import cli
from evojax_nas.config import EvolutionConfig
from evojax_nas.errors import EvojaxNasError
from evojax_nas.report import write_report
from evojax_nas.store import open_store


def test_report_refuses_a_symlinked_report_dir_in_the_store(tmp_path):
    store = open_store(str(tmp_path / "run"))
    store.write_config(EvolutionConfig(population=3).to_dict())
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "report.json").write_text("precious")
    os.symlink(outside, tmp_path / "run" / "report")
    with pytest.raises(EvojaxNasError, match="symlink"):
        write_report(store)
    assert (outside / "report.json").read_text() == "precious"
    assert cli.main(["report", store.url]) == 2


@pytest.mark.parametrize("value", ["0", "101", "1000000000"])
def test_adjust_bounds_mutations_per_child(tmp_path, value, capsys):
    store = open_store(str(tmp_path / "run"))
    store.write_config(EvolutionConfig(population=3).to_dict())
    assert cli.main(["adjust", store.url, "--mutations-per-child", value]) == 2
    assert "between 1 and 100" in capsys.readouterr().err
    assert cli.main(["adjust", store.url, "--mutations-per-child", "100"]) == 0
