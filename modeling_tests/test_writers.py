"""Writers never damage their source and never leave half a checkpoint: `quantize` (the library call and the CLI)
refuses a destination that is, lies inside or contains the source, and a non-empty one unless asked to overwrite;
it writes into a temporary folder beside the destination that takes its place at the end. Failed at several
points (an error while writing shards, the index, the config, the final rename; Ctrl-C), it leaves the destination
absent or as it was, the source byte for byte as it was, and no temporary folder behind."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from qwen2_moe_hf import files
from qwen2_moe_hf.gptq import quantize
from qwen2_moe_hf.gptq.quantize import quantize_checkpoint

from helpers import build_model, save_checkpoint


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save_checkpoint(build_model("gqa", seed=4), str(tmp_path_factory.mktemp("src") / "model"))


def snapshot(folder):
    """{relative path: sha256} of every file under folder (None when it does not exist)."""
    if not os.path.exists(folder):
        return None
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def leftovers(parent):
    return sorted(n for n in os.listdir(parent) if ".partial-" in n or ".old-" in n)


@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_destination_must_not_overlap_the_source(source, where, tmp_path):
    dst = {"same": source, "inside": os.path.join(source, "q"), "contains": os.path.dirname(source)}[where]
    before = snapshot(source)
    with pytest.raises(ValueError, match="must not be, lie inside or contain the source"):
        quantize_checkpoint(source, dst, group_size=32, progress=False, overwrite=True)
    assert snapshot(source) == before
    assert not leftovers(os.path.dirname(source))


def test_cli_refuses_src_as_dst_and_leaves_it_loadable(source):
    before = snapshot(source)
    result = subprocess.run([sys.executable, "-m", "qwen2_moe_hf.cli", "quantize", "--group-size", "32", source,
                             source], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "must not be, lie inside or contain the source" in result.stderr
    assert "Traceback" not in result.stderr  # a message, not a crash
    assert snapshot(source) == before
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(source)


def test_non_empty_destination_needs_overwrite(source, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not empty.*--overwrite"):
        quantize_checkpoint(source, str(dst), group_size=32, progress=False)
    assert (dst / "notes.txt").read_text() == "mine"
    quantize_checkpoint(source, str(dst), group_size=32, progress=False, overwrite=True)
    assert not (dst / "notes.txt").exists() and (dst / "config.json").exists()
    assert not leftovers(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    quantize_checkpoint(source, str(empty), group_size=32, progress=False)  # an empty folder is fine
    assert (empty / "config.json").exists()


class Boom(Exception):
    pass


def _fail_on_call(n, exc=Boom):
    calls = []

    def fail(*args, **kwargs):
        calls.append(1)
        if len(calls) >= n:
            raise exc("injected")
        return fail.real(*args, **kwargs)

    return fail


# Where the writer is stopped: (what to patch, after how many calls, the exception).
FAILURES = {
    "second_shard": (quantize, "_write_shard", 2, Boom),
    "index": (quantize, "_write_index", 1, Boom),
    "config": (quantize.json, "dump", 2, Boom),  # the index is the first json.dump, config.json the second
    "ctrl_c_while_quantizing": (quantize, "quantize_rtn", 5, KeyboardInterrupt),
    "final_rename": (files.os, "rename", 1, OSError),
}


@pytest.mark.parametrize("point", list(FAILURES))
@pytest.mark.parametrize("existing", [False, True])
def test_a_failure_at_any_point_leaves_nothing_half_written(source, tmp_path, monkeypatch, point, existing):
    dst = str(tmp_path / "out")
    if existing:  # an earlier good quantization, to be replaced (overwrite=True)
        quantize_checkpoint(source, dst, group_size=32, max_shard_size="100KB", progress=False)
    before_src, before_dst = snapshot(source), snapshot(dst)
    module, name, n, exc = FAILURES[point]
    fail = _fail_on_call(n, exc)
    fail.real = getattr(module, name)
    monkeypatch.setattr(module, name, fail)
    with pytest.raises(exc):
        quantize_checkpoint(source, dst, group_size=32, max_shard_size="100KB", progress=False, overwrite=True)
    monkeypatch.undo()
    assert snapshot(source) == before_src
    assert snapshot(dst) == before_dst  # absent, or the earlier checkpoint untouched
    assert not leftovers(str(tmp_path))


def test_a_finished_quantization_loads_and_replaces_atomically(source, tmp_path):
    dst = str(tmp_path / "out")
    quantize_checkpoint(source, dst, group_size=32, progress=False)
    quantize_checkpoint(source, dst, group_size=64, progress=False, overwrite=True)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dst)
    settings = model.config.quantization_config
    assert (settings if isinstance(settings, dict) else settings.to_dict())["group_size"] == 64
    assert oct(os.stat(dst).st_mode & 0o777) == oct(0o755)
    assert not leftovers(str(tmp_path))


def test_quantize_streams_and_holds_no_written_shard(source, tmp_path, monkeypatch):
    """quantize reads one tensor at a time and lets each output shard go once written: the real 14B checkpoint is
    28 GB in bf16 and its int4 output 8 GB, more than a 24 GiB machine holds beside each other. Every tensor
    handed to an earlier _write_shard must be freed by the time the next shard is written and at the end."""
    import gc
    import weakref

    written, alive_at_write = [], []
    real_write = quantize._write_shard

    def tracking_write(dst, index, tensors):
        gc.collect()
        alive_at_write.append(sum(ref() is not None for ref in written))
        real_write(dst, index, tensors)
        written.extend(weakref.ref(t) for t in tensors.values())

    monkeypatch.setattr(quantize, "_write_shard", tracking_write)
    dst = str(tmp_path / "out")
    quantize_checkpoint(source, dst, group_size=32, max_shard_size="20KB", progress=False)
    gc.collect()
    assert len(alive_at_write) >= 3, "the fixture should make several shards at 20KB"
    assert alive_at_write == [0] * len(alive_at_write)
    assert all(ref() is None for ref in written)
    with open(os.path.join(dst, files.INDEX_FILE)) as f:
        index = json.load(f)
    assert len(set(index["weight_map"].values())) == len(alive_at_write)
    sizes = sum(os.path.getsize(os.path.join(dst, n)) for n in set(index["weight_map"].values()))
    assert 0 < index["metadata"]["total_size"] < sizes  # the data bytes, without the shards' headers
