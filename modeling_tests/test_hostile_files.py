"""Hostile checkpoint files: the safetensors header reader and the index reader, fuzzed with hypothesis (random
bytes, random JSON, nasty values in every field, overlapping and out-of-file offsets, duplicate names, deep
nesting, non-UTF-8), must raise CheckpointError naming the file, or read a valid file: never another exception,
never an allocation sized by an unchecked field. Index entries may not lead outside the checkpoint folder
(absolute paths, '..', symlinks), except the Hugging Face cache's own snapshot -> blobs links; config.json must be
a JSON object."""

import json
import os
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from qwen2_moe_hf import Qwen2MoeConfig, Qwen2MoeForCausalLM
from qwen2_moe_hf.files import INDEX_FILE, CheckpointError, SafetensorsFile, weight_files

from helpers import build_model, save_checkpoint

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.function_scoped_fixture])


def _file(tmp_path, data, name="x.safetensors"):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def _safetensors(header_text, data=b""):
    raw = header_text.encode("utf-8") if isinstance(header_text, str) else header_text
    return struct.pack("<Q", len(raw)) + raw + data


def _valid_header():
    """Three tensors covering 40 bytes of data exactly."""
    return {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
            "b": {"dtype": "I32", "shape": [4], "data_offsets": [24, 40]},
            "empty": {"dtype": "F16", "shape": [0, 5], "data_offsets": [40, 40]},
            "__metadata__": {"format": "pt"}}


def _open_or_refuse(path):
    """SafetensorsFile(path), which must either read (and then hold only consistent entries) or raise
    CheckpointError naming the file."""
    try:
        handle = SafetensorsFile(path)
    except CheckpointError as exc:
        assert os.path.basename(path) in str(exc), str(exc)
        return None
    available = os.path.getsize(path) - handle.data_start
    spans = sorted((begin, begin + torch.empty(shape, dtype=dtype).nbytes) for dtype, shape, begin in
                   handle.entries.values())
    covered = 0
    for begin, end in spans:
        assert begin == covered and end <= available
        covered = end
    assert covered == available
    for key in handle.keys():
        handle.read(key)
    return handle


def test_a_valid_file_reads_and_the_fuzz_base_is_valid(tmp_path):
    path = _file(tmp_path, _safetensors(json.dumps(_valid_header()), bytes(range(40))))
    handle = _open_or_refuse(path)
    assert handle is not None and sorted(handle.keys()) == ["a", "b", "empty"]
    assert handle.metadata == {"format": "pt"}


@FUZZ
@given(data=st.binary(max_size=200))
def test_random_bytes(tmp_path, data):
    _open_or_refuse(_file(tmp_path, data))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)


@FUZZ
@given(header=st.dictionaries(st.text(max_size=6), json_values, max_size=4), data=st.binary(max_size=64))
def test_random_json_headers(tmp_path, header, data):
    _open_or_refuse(_file(tmp_path, _safetensors(json.dumps(header), data)))


NASTY = [-1, 2**63, 2**64 + 5, 10**40, 2.5, 1e300, True, None, "3", [], {}, [1, 2, 3], [-5], [[1]], [2.0]]


@FUZZ
@given(key=st.sampled_from(["a", "b", "empty"]), field=st.sampled_from(["dtype", "shape", "data_offsets"]),
       value=st.sampled_from(NASTY) | json_values)
def test_one_nasty_field(tmp_path, key, field, value):
    header = _valid_header()
    header[key][field] = value
    _open_or_refuse(_file(tmp_path, _safetensors(json.dumps(header), bytes(40))))


@pytest.mark.parametrize("case,needle", [
    ("overlap", "overlaps the tensor before it"),
    ("hole", "belong to no tensor"),
    ("past_end", "truncated: tensor 'b' needs bytes up to"),
    ("trailing", "cover 40 bytes of data, the file holds 48"),
    ("negative_dim", "not a list of non-negative integers"),
    ("float_dim", "not a list of non-negative integers"),
    ("huge_dims", "claims 16 bytes, but dtype I32 and shape"),
    ("unknown_dtype", "unknown dtype 'Q7'"),
    ("extra_field", "malformed header entry"),
    ("bad_metadata", "__metadata__ must map strings to strings"),
    ("nan", "not valid JSON"),
])
def test_each_inconsistency_is_named(tmp_path, case, needle):
    header, data = _valid_header(), bytes(40)
    if case == "overlap":
        header["b"]["data_offsets"] = [20, 36]
        header["empty"]["data_offsets"] = [36, 36]
        data = bytes(36)
    elif case == "hole":
        header["b"]["data_offsets"] = [28, 44]
        header["empty"]["data_offsets"] = [44, 44]
        data = bytes(44)
    elif case == "past_end":
        data = bytes(30)
    elif case == "trailing":
        data = bytes(48)
    elif case == "negative_dim":
        header["a"]["shape"] = [-2, -3]  # numel 6, as many bytes as claimed: must still be refused
    elif case == "float_dim":
        header["a"]["shape"] = [2.0, 3]
    elif case == "huge_dims":
        header["b"]["shape"] = [2**40, 2**40]
    elif case == "unknown_dtype":
        header["a"]["dtype"] = "Q7"
    elif case == "extra_field":
        header["a"]["offsets"] = [0, 1]
    elif case == "bad_metadata":
        header["__metadata__"] = {"format": 3}
    text = json.dumps(header)
    if case == "nan":
        text = text.replace('"shape": [4]', '"shape": [NaN]')
    path = _file(tmp_path, _safetensors(text, data), "shard.safetensors")
    with pytest.raises(CheckpointError, match=r"shard\.safetensors") as info:
        SafetensorsFile(path)
    assert needle in str(info.value)


def test_duplicate_names_deep_nesting_non_utf8_and_bad_lengths_are_named(tmp_path):
    text = json.dumps(_valid_header())
    dup = text[:-1] + ', "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}'
    cases = {
        "the key 'a' appears twice": _safetensors(dup, bytes(40)),
        "nested too deeply": _safetensors("[" * 100000 + "]" * 100000),
        "not UTF-8": _safetensors(b'{"\xff\xfe": 1}'),
        "header of 0 bytes": struct.pack("<Q", 0),
        "header of 18446744073709551615 bytes": struct.pack("<Q", 2**64 - 1) + b"{}",
        "not even a safetensors header": b"\x01\x02",
        "expected a JSON object, got list": _safetensors("[1, 2]"),
    }
    for needle, data in cases.items():
        path = _file(tmp_path, data, "s.safetensors")
        with pytest.raises(CheckpointError, match=r"s\.safetensors") as info:
            SafetensorsFile(path)
        assert needle in str(info.value), (needle, str(info.value))


def test_no_allocation_is_sized_by_an_unchecked_field(tmp_path, monkeypatch):
    """A header that claims a tensor far larger than the file: refused from the header alone; the reader never
    asks torch for more memory than the file holds."""
    header = {"big": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 2**42]}}
    path = _file(tmp_path, _safetensors(json.dumps(header), bytes(16)))
    real_empty, sizes = torch.empty, []

    def spy(*shape, **kwargs):
        t = real_empty(*shape, **kwargs)
        sizes.append(t.nbytes)
        return t

    monkeypatch.setattr(torch, "empty", spy)
    with pytest.raises(CheckpointError, match="truncated"):
        SafetensorsFile(path)
    assert max(sizes, default=0) <= os.path.getsize(path)


# ----------------------------------------------------------------------------------------------- the index


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(build_model("gqa", seed=5), str(tmp_path_factory.mktemp("ckpt") / "model"),
                           max_shard_size="150KB")


def _with_index(tmp_path, checkpoint, edit=None, text=None):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(checkpoint, folder)
    index_path = folder / INDEX_FILE
    if text is None:
        index = json.loads(index_path.read_text())
        edit(index, folder)
        text = json.dumps(index)
    index_path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(folder)


@FUZZ
@given(weight_map=json_values, extra=st.dictionaries(st.text(max_size=5), json_values, max_size=2))
def test_random_index_contents(tmp_path, checkpoint, weight_map, extra):
    import shutil

    folder = _with_index(tmp_path, checkpoint, lambda index, _: index.update(weight_map=weight_map, **extra))
    try:
        files = weight_files(folder)
    except CheckpointError:
        pass
    else:  # accepted: then every tensor it lists is real and readable
        for key, handle in files.items():
            assert key in handle.entries
    finally:
        shutil.rmtree(folder)


def _point_first_shard_at(target):
    def edit(index, folder):
        key = sorted(index["weight_map"])[0]
        index["weight_map"][key] = target(folder) if callable(target) else target
    return edit


@pytest.mark.parametrize("name,target", [
    ("absolute", lambda folder: os.path.abspath(os.path.join(folder, "model-00001-of-00003.safetensors"))),
    ("dotdot", "../model/model-00001-of-00003.safetensors"),
    ("nested_dotdot", "sub/../../elsewhere/x.safetensors"),
    ("empty", ""),
    ("not_a_string", 7),
])
def test_index_entries_may_not_leave_the_folder(tmp_path, checkpoint, name, target):
    folder = _with_index(tmp_path, checkpoint, _point_first_shard_at(target))
    with pytest.raises(CheckpointError, match=INDEX_FILE.replace(".", r"\.")):
        weight_files(folder)
    with pytest.raises(CheckpointError):
        Qwen2MoeForCausalLM.from_pretrained(folder)


def test_a_symlink_out_of_the_folder_is_refused(tmp_path, checkpoint):
    outside = tmp_path / "elsewhere"
    outside.mkdir()

    def edit(index, folder):
        key = sorted(index["weight_map"])[0]
        shard = index["weight_map"][key]
        os.replace(folder / shard, outside / shard)
        os.symlink(outside / shard, folder / shard)

    folder = _with_index(tmp_path, checkpoint, edit)
    with pytest.raises(CheckpointError, match="leads outside the checkpoint folder"):
        weight_files(folder)


def test_the_hub_cache_layout_of_symlinks_into_blobs_loads(tmp_path, checkpoint):
    """models--org--name/snapshots/<rev>/<file> -> ../../blobs/<hash>: the links huggingface_hub itself makes."""
    repo = tmp_path / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, name in enumerate(sorted(os.listdir(checkpoint))):
        blob = blobs / f"blob{i}"
        blob.write_bytes((open(os.path.join(checkpoint, name), "rb")).read())
        os.symlink(os.path.join("..", "..", "blobs", blob.name), snapshot / name)
    model = Qwen2MoeForCausalLM.from_pretrained(str(snapshot))
    reference = Qwen2MoeForCausalLM.from_pretrained(checkpoint)
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)


@pytest.mark.parametrize("text,needle", [
    (b"\xff\xfe{}", "not UTF-8"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"weight_map": {"a": "x.safetensors", "a": "y.safetensors"}}', "the key 'a' appears twice"),
    ("[" * 50000 + "]" * 50000, "nested too deeply"),
    ('{"weight_map": ["x.safetensors"]}', "weight_map must map tensor names to shard file names"),
    ('{"weight_map": {"a": 1}}', "weight_map must map tensor names to shard file names"),
])
def test_malformed_index_files_are_named(tmp_path, checkpoint, text, needle):
    folder = _with_index(tmp_path, checkpoint, text=text)
    with pytest.raises(CheckpointError, match=INDEX_FILE.replace(".", r"\.")) as info:
        weight_files(folder)
    assert needle in str(info.value)


def test_a_tensor_in_two_shards_is_refused(tmp_path, checkpoint):
    def edit(index, folder):
        shards = sorted(set(index["weight_map"].values()))
        key = next(k for k, v in index["weight_map"].items() if v == shards[0])
        from safetensors.torch import load_file

        tensors = load_file(str(folder / shards[1]))
        tensors[key] = torch.zeros(1)
        save_file(tensors, str(folder / shards[1]), metadata={"format": "pt"})

    folder = _with_index(tmp_path, checkpoint, edit)
    with pytest.raises(CheckpointError, match="is in both"):
        weight_files(folder)


# ----------------------------------------------------------------------------------------------- config.json


@pytest.mark.parametrize("text,needle", [
    ("[1, 2]", "expected a JSON object, got list"),
    ('"qwen2_moe"', "expected a JSON object, got str"),
    ('{"model_type": "qwen2_moe", "num_experts": 4, "num_experts": 60}', "the key 'num_experts' appears twice"),
    (b"\xff", "not UTF-8"),
])
def test_config_json_must_be_a_json_object(tmp_path, checkpoint, text, needle):
    import shutil

    folder = tmp_path / "cfg"
    shutil.copytree(checkpoint, folder)
    (folder / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    for load in (Qwen2MoeConfig.from_pretrained, Qwen2MoeForCausalLM.from_pretrained):
        with pytest.raises(CheckpointError, match=r"config\.json") as info:
            load(str(folder))
        assert needle in str(info.value)
