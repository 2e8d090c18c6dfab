"""runtime.tokenizer with the SmolLM2 tokenizer: encoding and chat template as in transformers,
streaming that never splits a UTF-8 character, stop strings."""
import json

import pytest

from runtime.tokenizer import REPLACEMENT, StopStrings, Tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}],
    [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Mango 🥭."},
     {"role": "user", "content": "用中文说一遍"}],
]

TEXTS = [
    "Emoji: 🥭🚀👩‍👩‍👧 done.",
    "中文字符和日本語のテキスト、한국어도。",
    "Ünïcödé àccents – “quotes” … and ∑ ∫ math",
    "plain ascii, then 🤖 and 漢字 mixed in the middle of words: a🥭b",
]


@pytest.fixture(scope="module")
def folder(smollm2_fp16):
    return smollm2_fp16


@pytest.fixture(scope="module")
def tok(folder):
    config = json.loads((folder / "tokenizer_config.json").read_text())
    template = (folder / "chat_template.jinja").read_text()
    return Tokenizer(folder / "tokenizer.json", config, template)


@pytest.fixture(scope="module")
def hf_tok(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers(tok, hf_tok, conv, gen):
    ours = tok.apply_chat_template(conv, add_generation_prompt=gen)
    ref = hf_tok.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False)
    assert ours == ref
    ref_ids = hf_tok.apply_chat_template(conv, add_generation_prompt=gen, tokenize=True, return_dict=True)["input_ids"]
    assert tok.encode_chat(conv, gen) == list(ref_ids)


@pytest.mark.parametrize("text", TEXTS + ["The capital of France is"])
def test_encode_decode_match_transformers(tok, hf_tok, text):
    assert tok.encode(text) == hf_tok(text)["input_ids"]
    assert tok.decode(tok.encode(text)) == hf_tok.decode(hf_tok(text)["input_ids"])


def test_eos_from_config(tok):
    assert tok.eos_token_ids == {tok.tok.token_to_id("<|im_end|>")}


@pytest.mark.parametrize("text", TEXTS)
def test_stream_never_splits_a_character(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    # the test only bites if some token ends inside a multi-byte character
    assert any(REPLACEMENT in tok.decode([i]) for i in ids) or text.isascii()
    dec = tok.stream_decoder()
    pieces = [dec.put(i) for i in ids]
    pieces.append(dec.flush())
    for p in pieces:
        assert REPLACEMENT not in p
        p.encode("utf-8")  # whole characters only
    assert "".join(pieces) == text


def test_stream_skips_special_tokens(tok):
    ids = tok.encode("Hello 🥭", add_special_tokens=False) + [tok.tok.token_to_id("<|im_end|>")]
    dec = tok.stream_decoder()
    out = "".join(dec.put(i) for i in ids) + dec.flush()
    assert out == "Hello 🥭"


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 7])
def test_stop_strings_across_pieces(cut):
    text = "Answer: Paris.\nUser: next question"
    pieces = [text[i:i + cut] for i in range(0, len(text), cut)]
    s = StopStrings(["\nUser:", "never"])
    out = "".join(s.feed(p) for p in pieces) + s.flush()
    assert out == "Answer: Paris."
    assert s.hit == "\nUser:"


def test_stop_strings_hold_back_only_possible_prefixes():
    s = StopStrings(["###"])
    assert s.feed("abc#") == "abc"
    assert s.feed("x") == "#x"
    assert s.feed("##") == ""
    assert s.flush() == "##"
    assert s.hit is None
