"""The README's main command and every example, run as a user runs them (subprocesses, no network)."""

import json
import os
import re
import subprocess
import sys

import pytest

from qwen2_moe_hf import serve
from qwen2_moe_hf.demo import DEMO_VERSION, build_demo_checkpoint

import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """A private cache, so the demo model is really built (trained) once here, as on a fresh machine."""
    cache = str(tmp_path_factory.mktemp("cache"))
    env = dict(os.environ, QWEN2_MOE_HF_CACHE=cache, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return cache, env


def _demo_folder(cache):
    """Where `qwen2-moe-hf chat` makes the demo checkpoint in the private cache (demo.default_cache_dir)."""
    return os.path.join(cache, f"demo-v{DEMO_VERSION}")


def _complete(args, env):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
                          stdin=subprocess.DEVNULL)


def _run(args, env):
    result = _complete(args, env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_chat_runs_with_no_arguments_on_the_embedded_model(demo_cache):
    cache, env = demo_cache
    out = _run(["examples/chat.py"], env)
    assert "you> Give me a short introduction to large language model." in out
    # The demo model was taught one answer; greedy decoding must reproduce it.
    assert "assistant> A large language model is a neural network" in out
    assert "tokens/s]" in out
    assert os.path.isfile(os.path.join(_demo_folder(cache), ".complete"))


def test_blog_snippet_runs_on_a_checkpoint_path(demo_cache):
    cache, env = demo_cache
    path = build_demo_checkpoint(_demo_folder(cache))  # reuses the folder the chat test made
    out = _run(["examples/blog_snippet.py", path], env)
    assert out.startswith("A large language model is")


def test_streaming_example_streams_the_answer(demo_cache):
    cache, env = demo_cache
    result = _complete(["examples/streaming.py"], env)  # no argument: the demo model, from the cache
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("A large language model is a neural network")
    pieces = re.search(r"\[streamed in (\d+) pieces\]", result.stderr)
    assert pieces and int(pieces.group(1)) > 1, result.stderr[-2000:]  # really piece by piece, not one block


@pytest.fixture(scope="module")
def demo_gptq(demo_cache, tmp_path_factory):
    """The demo model quantized to GPTQ-Int4 (its tokenizer is copied beside it)."""
    from qwen2_moe_hf.gptq.quantize import quantize_checkpoint

    cache, env = demo_cache
    source = build_demo_checkpoint(_demo_folder(cache))
    return quantize_checkpoint(source, str(tmp_path_factory.mktemp("demo-gptq") / "gptq"), progress=False)


@pytest.mark.parametrize("kind", ["full-precision", "gptq-int4"])
def test_lora_trainer_example_lowers_the_loss_and_saves_adapters(kind, demo_cache, request, tmp_path):
    peft = pytest.importorskip("peft", reason="peft is not installed (both stacks of run_all.sh install it)")
    cache, env = demo_cache
    path = (build_demo_checkpoint(_demo_folder(cache)) if kind == "full-precision"
            else request.getfixturevalue("demo_gptq"))
    adapter = str(tmp_path / "adapter")
    result = _complete(["examples/lora_trainer.py", path, "--steps", "4", "--lr", "5e-3", "--output-dir", adapter],
                       env)
    if kind == "gptq-int4" and not hasattr(peft.LoraConfig, "_register_custom_module"):
        # peft < 0.12 (the blog-era stack's 0.9.0) cannot wrap GPTQ layers: the example says which peft it needs.
        assert result.returncode == 2 and "LoRA on GPTQ layers needs peft >=" in result.stderr, result.stderr[-2000:]
        return
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("GPTQ-Int4" if kind == "gptq-int4" else "full precision") in result.stdout
    before = float(re.search(r"loss before training: ([\d.]+)", result.stdout).group(1))
    after = float(re.search(r"loss after training: +([\d.]+)", result.stdout).group(1))
    assert after < 0.95 * before, result.stdout
    assert os.path.isfile(os.path.join(adapter, "adapter_model.safetensors"))


def test_serve_client_example_parses_its_arguments():
    out = _run(["examples/serve_client.py", "--help"], dict(os.environ))
    assert out.startswith("usage: serve_client.py") and "--base-url" in out


@pytest.mark.skipif(serve.serve_available() is not None,
                    reason=f"no transformers serve here: {serve.serve_available()}")
def test_serve_client_example_against_qwen2_moe_hf_serve(demo_cache, tmp_path):
    pytest.importorskip("openai", reason="the openai client is not installed (the newest stack installs it)")
    cache, env = demo_cache
    path = build_demo_checkpoint(_demo_folder(cache))
    with helpers.running_server(path, tmp_path / "serve.log", env=env, cwd=ROOT) as url:
        out = _run(["examples/serve_client.py", path, "--base-url", url, "--max-tokens", "64"], env)
    whole, _, streamed = out.partition("--- streamed:\n")
    assert whole.startswith("--- whole:\nA large language model is a neural network"), out
    assert streamed.startswith("A large language model is a neural network"), out
    assert "64 completion tokens" in whole, out


BENCHMARKS = sorted(f for f in os.listdir(os.path.join(ROOT, "benchmarks")) if f.endswith(".py"))

# Runs each script given as `python benchmarks/SCRIPT --help` would, in one interpreter: the directory of the
# scripts first on sys.path, each as __main__; prints one JSON line per script (its exit code and output).
_HELP_CHILD = r"""
import contextlib, io, json, os, runpy, sys, traceback
sys.path.insert(0, os.path.abspath("benchmarks"))
for script in sys.argv[1:]:
    out = io.StringIO()
    sys.argv = [os.path.join("benchmarks", script), "--help"]
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(sys.argv[0], run_name="__main__")
        code = 0
    except SystemExit as exit:
        code = exit.code
    except BaseException:
        code = traceback.format_exc()
    print(json.dumps([script, code, out.getvalue()]), flush=True)
"""
_HELP = {}


@pytest.mark.parametrize("script", BENCHMARKS)
def test_benchmark_scripts_start(script):
    """Every benchmark imports what it needs and parses its arguments (they share helpers, and a renamed helper
    once broke one of them unseen). Running them is for a quiet machine, not for CI. All of them start in one
    child process (one interpreter start instead of eight)."""
    if not _HELP:
        result = _complete(["-c", _HELP_CHILD, *BENCHMARKS], dict(os.environ))
        assert result.returncode == 0, result.stderr[-3000:]
        _HELP.update((name, (code, out)) for name, code, out in map(json.loads, result.stdout.splitlines()))
    code, out = _HELP[script]
    assert code in (0, None), code
    assert out.startswith(f"usage: {script}"), out[:500]
