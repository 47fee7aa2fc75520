"""benchmarks/gpu_suite.py --dry-run: the whole GPU suite (parity, block speed, generate) on CPU at tiny shapes, as a
subprocess, the way CI runs it; and its parity phase failing (exit 1, naming the backend) on a wrong backend."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(ROOT, "benchmarks", "gpu_suite.py")

if torch.cuda.is_available():
    pytest.skip("the dry run is the CPU check; on a GPU run the suite itself", allow_module_level=True)


def _suite(tmp_path, *extra, interpret=True):
    out = str(tmp_path / "suite.json")
    env = dict(os.environ)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, SUITE, "--dry-run", "--json", out, *extra], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    data = None
    if os.path.exists(out):
        with open(out) as f:
            data = json.load(f)
    return result, data


def test_dry_run_runs_every_phase_and_fails_on_a_wrong_backend(tmp_path):
    """One run (the suite starts slowly): the cpu backend passes parity and is timed in every phase; the `faulty`
    backend that --inject-fault registers (the reference x 1.05) fails parity, is named, and makes the run exit 1
    after the speed phases ran. Triton runs interpreted only with TRITON_INTERPRET=1 (its kernels have their own
    tests): here it is listed as skipped, with the reason."""
    from qwen2_moe_hf.moe import env_report

    result, data = _suite(tmp_path, "--inject-fault", interpret=False)
    assert result.returncode == 1, result.stdout[-4000:] + result.stderr[-4000:]
    assert data is not None
    assert data["backends"]["triton"]  # skipped, with its reason
    cpu = sorted(n for n, s in env_report().items() if s == "available" and n != "torch")
    tested = sorted(n for n, skip in data["backends"].items() if not skip)
    assert tested == sorted(cpu + ["faulty"])
    assert data["failures"] and all("faulty" in f for f in data["failures"])
    assert "Parity FAILED" in result.stdout and "faulty" in result.stdout
    for name in cpu:
        rows = [r for r in data["parity_block"] if r["backend"] == name]
        assert {r["dtype"] for r in rows} >= {"fp16", "int4"}, rows
        assert all(r["ok"] and r["err"] <= r["tol"] for r in rows), rows
        ckpts = [r for r in data["parity_checkpoint"] if r["backend"] == name]
        assert {r["checkpoint"] for r in ckpts} == {"full", "gptq"}, ckpts
        assert all(r["ok"] and r["err"] <= r["tol"] and r["greedy_ok"] for r in ckpts), ckpts
    assert any(r["backend"] == "faulty" and not r["ok"] for r in data["parity_block"])
    assert [r["tokens"] for r in data["speed"]] == [1, 8]
    for row in data["speed"]:
        assert set(cpu) <= set(row["ours"]) and all(t > 0 for t in row["ours"].values())
        assert row["floor_s"] > 0
    gen = [r for r in data["generate"] if r.get("tokens_per_s")]
    assert {r["batch"] for r in gen} == {1, 16}
    assert {r["model"] for r in gen} >= {f"ours {kind} [{name}]" for kind in ("bf16", "int4") for name in cpu}
    assert "#### Parity: MoE block" in result.stdout
    assert not data["skipped"]
