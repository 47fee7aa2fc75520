"""`qwen2-moe-hf chat`: sampling flags, the conversation (ChatML history, /reset, /exit), streaming and tokens/s,
on an untrained demo checkpoint (fast to make; the trained one is run end to end in test_examples.py)."""

import argparse
import io

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qwen2_moe_hf import chat
from qwen2_moe_hf.cli import main
from qwen2_moe_hf.demo import build_demo_checkpoint


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    path = build_demo_checkpoint(str(tmp_path_factory.mktemp("demo") / "ckpt"), train_steps=0)
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _args(*argv):
    parser = argparse.ArgumentParser()
    chat.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_sampling_flags_map_to_generate():
    assert chat.generation_kwargs(_args()) == dict(max_new_tokens=512, do_sample=False, temperature=None, top_p=None,
                                                   top_k=None)
    got = chat.generation_kwargs(_args("--temperature", "0.7", "--top-p", "0.8", "--top-k", "20",
                                       "--repetition-penalty", "1.05", "--max-new-tokens", "9"))
    assert got == dict(max_new_tokens=9, do_sample=True, temperature=0.7, top_p=0.8, top_k=20,
                       repetition_penalty=1.05)


@pytest.mark.parametrize("argv, flag", [
    (["--temperature", "-1"], "--temperature"), (["--top-p", "1.5", "--temperature", "1"], "--top-p"),
    (["--top-k", "0", "--temperature", "1"], "--top-k"), (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--repetition-penalty", "0"], "--repetition-penalty"), (["--top-p", "0.5"], "--top-p"),
])
def test_bad_flags_are_named(argv, flag, capsys):
    assert main(["chat", *argv]) == 2
    assert flag in capsys.readouterr().err


def test_a_conversation_keeps_chatml_history_and_resets(demo):
    model, tokenizer = demo
    out = io.StringIO()
    session = chat.Chat(model, tokenizer, "Be brief.", dict(max_new_tokens=5, do_sample=False), out=out)
    lines = iter(["hello", "", "again", "/reset", "third", "/exit", "never read"])
    session.loop(lambda prompt: next(lines))
    # After /reset only the system prompt and the third turn remain; the last line was never read.
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]
    assert session.messages[1]["content"] == "third"
    assert next(lines) == "never read"
    text = out.getvalue()
    assert text.count("assistant> ") == 3 and text.count(" tokens/s]") == 3 and "(conversation reset)" in text
    # What was streamed is what the history keeps, and what generate gives for the same ChatML prompt.
    prompt = tokenizer.apply_chat_template(session.messages[:2], tokenize=False, add_generation_prompt=True)
    ids = tokenizer([prompt], return_tensors="pt")
    expected = model.generate(**ids, max_new_tokens=5, do_sample=False)[0, ids["input_ids"].shape[1]:]
    answer = tokenizer.decode(expected, skip_special_tokens=True)
    assert session.messages[2]["content"] == answer
    assert f"assistant> {answer}" in text


def test_end_of_input_ends_the_chat(demo):
    model, tokenizer = demo
    session = chat.Chat(model, tokenizer, "", dict(max_new_tokens=2, do_sample=False), out=io.StringIO())

    def read(prompt):
        raise EOFError

    session.loop(read)
    assert session.messages == []


def test_a_seed_makes_sampling_reproducible(demo):
    model, tokenizer = demo
    kwargs = chat.generation_kwargs(_args("--temperature", "1.5", "--top-k", "50", "--max-new-tokens", "12"))
    answers = []
    for seed in (1, 1, 2):
        session = chat.Chat(model, tokenizer, "", kwargs, seed=seed, out=io.StringIO())
        answers.append(session.ask("hi"))
    assert answers[0] == answers[1] != answers[2]
    torch.manual_seed(0)  # leave the global generator as other tests expect it
