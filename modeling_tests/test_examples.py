"""The README's main command and the post's snippet, run as a user runs them (subprocesses, no network)."""

import os
import subprocess
import sys

import pytest

from qwen2_moe_hf.demo import build_demo_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """A private cache, so the demo model is really built (trained) once here, as on a fresh machine."""
    cache = str(tmp_path_factory.mktemp("cache"))
    env = dict(os.environ, QWEN2_MOE_HF_CACHE=cache, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return cache, env


def _run(args, env):
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_chat_runs_with_no_arguments_on_the_embedded_model(demo_cache):
    cache, env = demo_cache
    out = _run(["examples/chat.py"], env)
    assert "you> Give me a short introduction to large language model." in out
    # The demo model was taught one answer; greedy decoding must reproduce it.
    assert "assistant> A large language model is a neural network" in out
    assert "tokens/s]" in out
    assert os.path.isfile(os.path.join(cache, "demo-v1", ".complete"))


def test_blog_snippet_runs_on_a_checkpoint_path(demo_cache):
    cache, env = demo_cache
    path = build_demo_checkpoint(os.path.join(cache, "demo-v1"))  # reuses the folder the chat test made
    out = _run(["examples/blog_snippet.py", path], env)
    assert out.startswith("A large language model is")


@pytest.mark.parametrize("script", sorted(f for f in os.listdir(os.path.join(ROOT, "benchmarks")) if f.endswith(".py")))
def test_benchmark_scripts_start(script):
    """Every benchmark imports what it needs and parses its arguments (they share helpers, and a renamed helper
    once broke one of them unseen). Running them is for a quiet machine, not for CI."""
    out = _run([os.path.join("benchmarks", script), "--help"], dict(os.environ))
    assert out.startswith(f"usage: {script}")
