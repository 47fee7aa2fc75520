"""`qwen2-moe-hf serve`: transformers' own server in a process where the plugin is registered, tested on loopback with
the official `openai` client, as a user talks to it. For a full-precision and a GPTQ-Int4 checkpoint (made here, in
the hub's cache layout, loaded offline by hub id), with and without continuous batching (paged attention): greedy
answers equal `model.generate`'s tokens for the same prompt, streamed chunks concatenate to the same text, and
concurrent clients each get the answer to their own prompt. The server computes in float32 here: in bf16, batching
requests together (continuous batching) rounds differently from one request alone and flips near-tied tokens of a
random model, which says nothing about the serving path."""

import concurrent.futures
import json
import os
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from qwen2_moe_hf import cli, compat, serve
from qwen2_moe_hf.demo import write_tokenizer
from qwen2_moe_hf.gptq.quantize import quantize_checkpoint

import helpers

REPO_IDS = {"full": "qwen2-moe-hf-tests/tiny", "gptq": "qwen2-moe-hf-tests/tiny-gptq-int4"}
SYSTEM = "You are a helpful assistant."
QUESTIONS = ["Give me a short introduction to large language model.", "hello", "What is a mixture of experts?"]
MAX_TOKENS = 12


def test_serve_on_a_stack_without_transformers_serve_names_the_version(monkeypatch, capsys):
    if serve.serve_available() is None:  # 5.x: take `transformers serve` away, as on 4.x
        monkeypatch.setitem(sys.modules, "transformers.cli.serve", None)
    assert cli.main(["serve", "--model", "some/model", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "has no `transformers serve`" in err and serve.SERVE_TESTED_VERSION in err


needs_serve = pytest.mark.skipif(serve.serve_available() is not None,
                                 reason=f"no transformers serve here: {serve.serve_available()}")
openai = pytest.importorskip("openai", reason="the openai client is not installed (the newest stack installs it)") \
    if serve.serve_available() is None else None


@needs_serve
def test_options_go_to_transformers_serve(capsys):
    assert cli.main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    assert "qwen2-moe-hf serve --model" in out  # ours, then transformers serve's own options
    assert "--continuous-batching" in out and "--attn-implementation" in out
    assert cli.main(["serve", "--no-such-option"]) == 2
    assert "No such option" in capsys.readouterr().err


def _hub_cache_entry(cache: str, repo_id: str, source: str) -> None:
    """A folder laid out as huggingface_hub's cache holds a downloaded repo (one snapshot, refs/main)."""
    revision = "0" * 40
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", revision)
    os.makedirs(snapshot)
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(revision)
    for name in os.listdir(source):
        if not name.startswith("."):
            os.link(os.path.join(source, name), os.path.join(snapshot, name))


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    cache = str(root / "hub")
    src, gptq = str(root / "full"), str(root / "gptq")
    model = helpers.build_model("gqa", seed=3, vocab_size=272, pad_token_id=256, bos_token_id=256, eos_token_id=258)
    with torch.no_grad():  # greedy picks printable ASCII only: the answers are valid UTF-8 at every prefix
        printable = torch.zeros(272, dtype=torch.bool)
        printable[32:127] = True
        model.lm_head.weight[~printable] = 0
    helpers.save_checkpoint(model.to(torch.bfloat16), src)
    write_tokenizer(src)
    GenerationConfig(bos_token_id=256, pad_token_id=256, eos_token_id=[258, 256], do_sample=False).save_pretrained(src)
    quantize_checkpoint(src, gptq, group_size=32, progress=False)
    for name in ("generation_config.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        if not os.path.exists(os.path.join(gptq, name)):  # quantize writes the model; the tokenizer is the source's
            os.link(os.path.join(src, name), os.path.join(gptq, name))
    _hub_cache_entry(cache, REPO_IDS["full"], src)
    _hub_cache_entry(cache, REPO_IDS["gptq"], gptq)
    return cache


@pytest.fixture(scope="module", params=[("full", False), ("gptq", False), ("full", True), ("gptq", True)],
                ids=["full-precision", "gptq-int4", "full-precision-continuous-batching",
                     "gptq-int4-continuous-batching"])
def server(request, hub_cache, tmp_path_factory):
    if serve.serve_available() is not None:
        pytest.skip(f"no transformers serve here: {serve.serve_available()}")
    kind, batching = request.param
    env = dict(os.environ, HF_HUB_CACHE=hub_cache, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    args = ["--dtype", "float32"] + (["--continuous-batching"] if batching else [])
    log = tmp_path_factory.mktemp("log") / "serve.log"
    with helpers.running_server(REPO_IDS[kind], log, env=env, extra_args=args) as url:
        yield kind, openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120), log


@pytest.fixture(scope="module")
def references(hub_cache):
    """Each checkpoint loaded in this process as a user would, and its greedy tokens for each prompt."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cache = {}

    def answer(kind: str, messages=None, prompt=None):
        key = (kind, json.dumps(messages), prompt)
        if key not in cache:
            if kind not in cache:
                folder = _snapshot(hub_cache, REPO_IDS[kind])
                model = AutoModelForCausalLM.from_pretrained(folder, **compat.dtype_kwarg(torch.float32)).eval()
                cache[kind] = (model, AutoTokenizer.from_pretrained(folder))
            model, tokenizer = cache[kind]
            text = prompt if messages is None else tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True)
            inputs = tokenizer([text], return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
            new = out[0, inputs["input_ids"].shape[1]:]
            cache[key] = (tokenizer.decode(new, skip_special_tokens=True), len(new))
        return cache[key]

    return answer


def _snapshot(cache: str, repo_id: str) -> str:
    snapshots = os.path.join(cache, "models--" + repo_id.replace("/", "--"), "snapshots")
    return os.path.join(snapshots, os.listdir(snapshots)[0])


def _as_served(text: str) -> str:
    # transformers' server trims trailing whitespace from a non-streamed chat answer (its streamed chunks keep it).
    return text.rstrip()


def _chat(question):
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


@needs_serve
def test_chat_completion_equals_generate(server, references):
    kind, client, log = server
    reply = client.chat.completions.create(model=REPO_IDS[kind], messages=_chat(QUESTIONS[0]), max_tokens=MAX_TOKENS,
                                           temperature=0)
    text, count = references(kind, messages=_chat(QUESTIONS[0]))
    assert reply.choices[0].message.content == _as_served(text), log.read_text()[-2000:]
    assert reply.usage.completion_tokens == count


@needs_serve
def test_streamed_chunks_concatenate_to_the_answer(server, references):
    kind, client, log = server
    stream = client.chat.completions.create(model=REPO_IDS[kind], messages=_chat(QUESTIONS[0]),
                                            max_tokens=MAX_TOKENS, temperature=0, stream=True)
    chunks = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len([c for c in chunks if c]) > 1, chunks  # really streamed, not one block
    assert "".join(chunks) == references(kind, messages=_chat(QUESTIONS[0]))[0]


@needs_serve
def test_completions_endpoint_equals_generate(server, references):
    kind, client, log = server
    prompt = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    reply = client.completions.create(model=REPO_IDS[kind], prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    assert reply.choices[0].text == references(kind, prompt=prompt)[0]


@needs_serve
def test_concurrent_clients_each_get_their_own_answer(server, references):
    kind, client, log = server
    expected = [_as_served(references(kind, messages=_chat(q))[0]) for q in QUESTIONS]
    assert len(set(expected)) == len(QUESTIONS), "the prompts must have different answers for this test to mean it"

    def ask(question):
        reply = client.chat.completions.create(model=REPO_IDS[kind], messages=_chat(question),
                                               max_tokens=MAX_TOKENS, temperature=0)
        return reply.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(len(QUESTIONS)) as pool:
        answers = list(pool.map(ask, QUESTIONS * 2))
    assert answers == expected * 2


@needs_serve
def test_models_endpoint_lists_the_cached_checkpoints(server):
    kind, client, log = server
    ids = {m.id for m in client.models.list().data}
    assert set(REPO_IDS.values()) <= ids, ids
