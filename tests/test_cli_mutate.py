import json
import os
import subprocess
import sys

import pytest

from evojax_nas import cli
from evojax_nas import dna as D
from evojax_nas import mutations as MU
from evojax_nas.cli_mutate import dna_changes, mutate_file
from evojax_nas.errors import DNAError, EvojaxNasError


def run_cli(*args, cwd):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "EVOJAX_NAS_XLA_CACHE": ""}
    return subprocess.run(
        [sys.executable, "-m", "evojax_nas.cli", "mutate", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_mutate_command_writes_the_child_and_prints_what_changed(tmp_path):
    out = tmp_path / "child.json"
    proc = run_cli(
        "--dna",
        "initial",
        "--seed",
        "3",
        "--mutation",
        "insert_convolution",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    child = D.load(str(out))
    parent = D.initial_dna()
    assert len(child.conv_edges()) == 1
    text = proc.stdout
    assert "mutation: insert_convolution" in text
    assert f"before: {D.describe(parent)}" in text and f"after:  {D.describe(child)}" in text
    assert D.architecture_key(parent) in text and D.architecture_key(child) in text
    conv = child.conv_edges()[0]
    assert f"+ edge {conv.id}: 0→" in text and "~ edge 2 src: 0 →" in text
    assert f"params/conv_e{conv.id}/kernel" in text
    # The same seed gives the same child, byte for byte, through the importable function.
    again = tmp_path / "again.json"
    mutate_file("initial", 3, str(again), mutation="insert_convolution")
    assert again.read_text() == out.read_text()


def test_mutate_command_reports_bad_input_in_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"vertices": [], "edges": [], "learning_rate": 0.1}))
    proc = run_cli(
        "--dna", str(bad), "--seed", "0", "--out", str(tmp_path / "x.json"), cwd=tmp_path
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evojax-nas: error:") and "bad.json" in lines[0]
    assert not (tmp_path / "x.json").exists()


def test_mutate_file_applies_the_named_or_a_random_mutation(tmp_path):
    parent_path = tmp_path / "parent.json"
    mutate_file("initial", 1, str(parent_path), mutation="insert_convolution")
    parent = D.load(str(parent_path))
    text = mutate_file(str(parent_path), 5, str(tmp_path / "c.json"), mutation="filter_size")
    child = D.load(str(tmp_path / "c.json"))
    (conv,) = child.conv_edges()
    assert "mutation: filter_size" in text and f"touched IDs: {conv.id}" in text
    assert "~ edge" in text and "filter_half_" in text
    names = set()
    for seed in range(12):
        text = mutate_file(str(parent_path), seed, str(tmp_path / f"r{seed}.json"))
        names.add(text.splitlines()[0].removeprefix("mutation: "))
    assert len(names) > 3 and names <= set(MU.MUTATIONS)
    assert dna_changes(parent, parent) == []


def test_mutate_file_errors_are_ours(tmp_path):
    with pytest.raises(DNAError, match="cannot read"):
        mutate_file(str(tmp_path / "missing.json"), 0, str(tmp_path / "o.json"))
    with pytest.raises(MU.MutationError, match="no skip"):
        mutate_file("initial", 0, str(tmp_path / "o.json"), mutation="remove_skip")
    with pytest.raises(MU.MutationError, match="unknown"):
        mutate_file("initial", 0, str(tmp_path / "o.json"), mutation="grow_wings")
    with pytest.raises(EvojaxNasError, match="cannot write"):
        mutate_file("initial", 0, str(tmp_path / "no" / "dir" / "o.json"))


def test_cli_main_runs_mutate_in_process(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EVOJAX_NAS_XLA_CACHE", "")  # leave this process's JAX config alone
    out = tmp_path / "c.json"
    assert (
        cli.main(
            [
                "mutate",
                "--dna",
                "initial",
                "--seed",
                "0",
                "--mutation",
                "identity",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "(same: no recompile)" in capsys.readouterr().out
    assert D.load(str(out)) == D.initial_dna()
    assert (
        cli.main(
            [
                "mutate",
                "--dna",
                "initial",
                "--seed",
                "0",
                "--mutation",
                "remove_skip",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "no skip" in capsys.readouterr().err
