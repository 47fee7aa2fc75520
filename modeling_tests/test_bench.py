"""`qwen2-moe-hf bench`: --quick runs the whole command (block and decode, bf16 and int4, the built-in where
transformers has it) and prints every row; --json holds the raw numbers; --plot writes a PNG, and without
matplotlib fails before measuring, naming the extra; bad flags are named."""

import contextlib
import importlib.util
import io
import json
import re
import sys

import pytest

from qwen2_moe_hf import bench, cli, compat

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `bench --quick` for the module (a few seconds on 2 cores): (exit code, stdout, results, plot path)."""
    folder = tmp_path_factory.mktemp("bench")
    json_path, plot_path = folder / "bench.json", folder / "bench.png"
    argv = ["bench", "--quick", "--no-progress", "--json", str(json_path)]
    if HAVE_MATPLOTLIB:
        argv += ["--plot", str(plot_path)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(argv)
    results = json.loads(json_path.read_text()) if json_path.exists() else None
    return code, out.getvalue(), results, plot_path


def _table(text, first_cell):
    """The rows (lists of cells) of the markdown table whose header starts with `first_cell`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_cell} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return [c.strip() for c in lines[start].strip().strip("|").split("|")], rows


def test_quick_prints_every_row(quick_run):
    code, out, _, _ = quick_run
    assert code == 0, out
    assert "ISA: " in out and "threads" in out
    for flag in bench.ISA_FLAGS:  # each named flag is reported, present or absent
        assert flag in out
    backends = [name for name, state in bench.env_report().items() if state == "available"]
    header, rows = _table(out, "tokens")
    for kind in ("bf16", "int4"):
        for b in backends:
            assert f"ours {kind} [{b}] ms" in header
    assert "built-in bf16 ms" in header and "bf16 floor ms" in header and "int4 floor ms" in header
    assert [row[0] for row in rows] == ["1", "8"]
    builtin = bench.builtin_available()[0]
    for row in rows:
        cells = dict(zip(header, row))
        for b in backends:  # --quick leaves no variant out: every cell is a number
            assert float(cells[f"ours bf16 [{b}] ms"]) > 0 and float(cells[f"ours int4 [{b}] ms"]) > 0
        assert float(cells["bf16 floor ms"]) > 0 and float(cells["int4 floor ms"]) > 0
        if builtin:
            assert float(cells["built-in bf16 ms"].split()[0]) > 0
            assert cells["built-in / ours bf16"].endswith("x")
        else:
            assert cells["built-in bf16 ms"] == "n/a" and cells["built-in / ours bf16"] == "n/a"
    _, decode = _table(out, "model")
    names = [row[0] for row in decode]
    assert names[:2] == ["ours bf16", "ours int4"]
    assert names[2].startswith("built-in bf16")
    for row in decode[:2] + (decode[2:] if builtin else []):
        assert float(row[1]) > 0 and float(row[2]) > 0 and float(row[3]) > 0
    if not builtin:
        assert decode[2][1] == "n/a"


def test_builtin_comparison_present_exactly_with_transformers_5():
    assert bench.builtin_available()[0] == (compat.IS_V5 and compat.HAS_BUILTIN_QWEN2_MOE)


def test_json_holds_positive_numbers(quick_run):
    code, _, results, _ = quick_run
    assert code == 0 and results is not None
    assert results["settings"]["quick"] is True
    assert set(results["machine"]["isa"]) == set(bench.ISA_FLAGS)
    rows = results["block"]["rows"]
    assert [row["tokens"] for row in rows] == [1, 8]
    for row in rows:
        for key in ("read_bytes_per_s", "bf16_bytes", "int4_bytes", "bf16_floor_s", "int4_floor_s", "flops"):
            assert row[key] > 0, key
        assert row["int4_bytes"] < row["bf16_bytes"]
        assert len(row["read_samples"]) == results["settings"]["repeats"]
        for name, v in row["variants"].items():
            assert v["median_s"] > 0 and len(v["samples_s"]) == results["settings"]["repeats"], name
            assert all(t > 0 for t in v["samples_s"]), name
    decode = results["decode"]
    assert decode["read_bytes_per_s"] > 0
    expected = {"ours bf16", "ours int4"} | ({"built-in bf16"} if bench.builtin_available()[0] else set())
    assert set(decode["columns"]) == expected
    for name, c in decode["columns"].items():
        for key in ("median_s", "tokens_per_s", "bytes_per_token", "ceiling_tokens_per_s"):
            assert c[key] > 0, (name, key)
    assert decode["columns"]["ours int4"]["bytes_per_token"] < decode["columns"]["ours bf16"]["bytes_per_token"]
    if "builtin_logits_rel_err" in decode:  # the built-in got our weights: same logits up to bf16 rounding
        assert decode["builtin_logits_rel_err"] < 0.05


def test_plot_writes_a_png(quick_run):
    if not HAVE_MATPLOTLIB:
        pytest.skip("matplotlib is not installed here (pip install qwen2_moe_hf[plot]); --plot is checked by "
                    "test_plot_without_matplotlib_fails_up_front_naming_the_extra")
    code, out, _, plot_path = quick_run
    assert code == 0
    data = plot_path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(data) < 400_000
    assert f"wrote {plot_path}" in out


def _no_measuring(monkeypatch):
    def refuse(settings):
        raise AssertionError("measuring started although a flag was bad")

    monkeypatch.setattr(bench, "bench", refuse)


def test_plot_without_matplotlib_fails_up_front_naming_the_extra(monkeypatch, capsys, tmp_path):
    _no_measuring(monkeypatch)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    assert cli.main(["bench", "--quick", "--plot", str(tmp_path / "b.png")]) == 2
    err = capsys.readouterr().err
    assert "--plot" in err and "pip install qwen2_moe_hf[plot]" in err
    assert not (tmp_path / "b.png").exists()


@pytest.mark.parametrize("args, flag", [
    (["--tokens", "0"], "--tokens"),
    (["--layers", "0"], "--layers"),
    (["--repeats", "0"], "--repeats"),
    (["--new-tokens", "1"], "--new-tokens"),
    (["--vocab", "2"], "--vocab"),
    (["--threads", "0"], "--threads"),
    (["--plot", "bench.jpg"], "--plot"),
    (["--plot", "/no/such/folder/b.png"], "--plot"),
    (["--json", "/no/such/folder/b.json"], "--json"),
])
def test_bad_flags_are_named(monkeypatch, capsys, args, flag):
    _no_measuring(monkeypatch)
    assert cli.main(["bench", "--quick", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qwen2-moe-hf bench: error: ") and flag in err


def test_vs_llamacpp_takes_its_own_options(capsys):
    """`bench --vs-llamacpp` hands the rest of the command line to the llama.cpp comparison (bench_llamacpp.py),
    whose own options --help lists."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--vs-llamacpp", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: qwen2-moe-hf bench --vs-llamacpp") and "--workdir" in out and "--rows" in out


@pytest.mark.parametrize("missing, pip", [("llama_cpp", "llama-cpp-python"), ("gguf", "gguf")])
def test_vs_llamacpp_without_its_extras_names_them_before_any_work(monkeypatch, capsys, tmp_path, missing, pip):
    monkeypatch.setitem(sys.modules, missing, None)  # `import <missing>` now raises ImportError
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--vs-llamacpp", "--quick", "--workdir", str(tmp_path / "w")])
    assert exit_info.value.code == 2
    assert re.search(rf"pip install [^\n]*(?<![\w-]){re.escape(pip)}(?![\w-])", capsys.readouterr().err)
    assert not (tmp_path / "w").exists()
