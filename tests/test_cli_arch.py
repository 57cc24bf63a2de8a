"""`covidnet arch list|show|spec`, in process through `search.cli.main` and once as a program."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from covidnet_jax import presets
from covidnet_jax.cost import count_cost
from search.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_shows_every_preset_with_its_params(capsys):
    code, out, _ = run(capsys, "arch", "list")
    assert code == 0
    lines = out.splitlines()
    for name in presets.list_presets():
        (row,) = [line for line in lines if line.split()[0] == name]
        assert f"{count_cost(presets.get_preset(name)).params:,}" in row


def test_show_prints_layer_table_and_totals(capsys):
    code, out, _ = run(capsys, "arch", "show", "tiny")
    assert code == 0
    report = count_cost(presets.get_preset("tiny"))
    assert "stages.1.modules.0.depthwise  dwconv" in out
    (total,) = [line for line in out.splitlines() if line.startswith("total")]
    assert total.split()[1:] == [f"{report.params:,}", f"{report.macs:,}"]
    assert presets.get_preset("tiny").content_hash() in out
    assert "training activations at batch 1" in out


def test_show_json_has_integer_cost_and_the_spec(capsys):
    code, out, _ = run(
        capsys, "arch", "show", "resnet50", "--num-classes", "1000", "--input-size", "224", "--json"
    )
    assert code == 0
    data = json.loads(out)
    assert data["params"] == 25_557_032 and isinstance(data["params"], int)
    assert isinstance(data["macs"], int) and data["macs"] == pytest.approx(4.09e9, rel=0.03)
    assert data["spec"]["type"] == "resnet"
    assert len(data["spec"]["class_names"]) == 1000
    assert data["layers"][-1]["output_shape"] == [1000]


def test_show_json_of_covidnet_b_is_inside_the_cxr3_b_budget(capsys):
    code, out, _ = run(capsys, "arch", "show", "covidnet-b", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["params"] <= 11_750_000
    assert 0.7 * 7.5e9 <= data["macs"] <= 7.5e9
    assert data["spec"] == presets.get_preset("covidnet-b").to_dict()


def test_spec_file_round_trips_through_the_cli(capsys, tmp_path):
    code, out, _ = run(capsys, "arch", "spec", "covidnet-c", "--input-size", "224")
    assert code == 0
    path = tmp_path / "c224.json"
    path.write_text(out)
    code, out, _ = run(capsys, "arch", "show", str(path), "--json", "--batch-size", "8")
    data = json.loads(out)
    assert data["spec"]["input_size"] == 224
    assert (
        data["content_hash"] == presets.get_preset("covidnet-c").with_input_size(224).content_hash()
    )
    assert data["batch_size"] == 8 and data["activation_bytes"] > 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"type": "pepx", "input_size": 32}', "stem: required field is missing"),
        (
            "{not json",
            "invalid JSON at line 1 column 2: Expecting property name enclosed in double quotes",
        ),
    ],
)
def test_bad_spec_file_is_one_line_exit_2(capsys, tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    code, out, err = run(capsys, "arch", "show", str(path))
    assert code == 2
    assert out == ""
    assert err == f"covidnet arch: error: {path}: {message}\n"


def test_bad_field_in_spec_file_names_file_and_field(capsys, tmp_path):
    data = json.loads(presets.get_preset("tiny").to_json())
    data["stages"][1]["modules"][0]["kernel_size"] = 4
    path = tmp_path / "even_kernel.json"
    path.write_text(json.dumps(data))
    code, _, err = run(capsys, "arch", "show", str(path))
    assert code == 2
    assert err == (
        f"covidnet arch: error: {path}: stages[1].modules[0].kernel_size: "
        "expected an odd kernel size, got 4\n"
    )


def test_bad_options_are_one_line_errors(capsys):
    code, _, err = run(capsys, "arch", "show", "tiny", "--input-size", "0")
    assert (code, err.count("\n")) == (2, 1)
    assert "input_size: expected an int in [1, 4096], got 0" in err
    code, _, err = run(capsys, "arch", "show", "nonsense")
    assert code == 2 and "'nonsense' is neither a preset nor a spec file" in err


def test_help_teaches_with_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["arch", "show", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--num-classes K" in out and "covidnet arch show covidnet-b" in out


def test_installed_program_reports_bad_spec_without_traceback(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"type": "vgg", "input_size": 0}')
    program = Path(sys.executable).parent / "covidnet"
    result = subprocess.run(
        [str(program), "arch", "show", str(path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"covidnet arch: error: {path}: input_size: expected an int in [1, 4096], got 0"
    ]
