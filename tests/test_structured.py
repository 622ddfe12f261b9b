"""Structured output (chapter 12): the JSON and regex automata against json / re, masks against the brute-force
`allowed_tokens`, and generation on the real model that stays inside the grammar and stops by end-of-sequence."""

import json
import random
import re

import pytest
import torch

import minillm
from minillm import SamplingParams
from minillm.serve.structured import (
    GrammarLogitsProcessor,
    JsonObjectGrammar,
    RegexGrammar,
    TokenMasker,
    allowed_tokens,
    logits_processor_for,
    walk,
)


def accepts(grammar, text: str) -> bool:
    state = walk(grammar.step, grammar.start(), text)
    return state is not None and grammar.is_complete(state)


# ----------------------------------------------------------------------------------------------------------------
# JSON grammar

VALID_JSON = [
    "{}",
    '{"a": 1}',
    '{"a":1,"b":[]}',
    '{"a": [1, 2, 3], "b": {"c": null}}',
    '{"t": true, "f": false, "n": null}',
    '{"numbers": [0, -0, 7, -12, 1.5, -0.25, 10.0, 1e5, 1E+5, 2e-3, -1.5E-07, 0.0e0]}',
    '{"esc": "quote \\" slash \\\\ \\/ \\b \\f \\n \\r \\t \\u00e9 \\uD83D\\uDE00"}',
    '{"unicode": "héllo wörld ✓ 日本"}',
    '{"": ""}',
    '{"nested": [[[]]], "x": {"y": {}}}',
    '{"a": [{"b": [1]}, "s", 3.25]}',
    '{"spaces inside strings": "  a  b  "}',
]

INVALID_JSON = [
    '{"a": 1,}',  # trailing comma
    '{"a": [1, 2,]}',
    '{"a": 01}',  # leading zero
    '{"a": 1.}',
    '{"a": .5}',
    '{"a": -}',
    '{"a": 1e}',
    '{"a": +1}',
    '{"a": tru}',
    '{"a": nul}',
    '"just a string"',  # bare values and a top-level array
    "123",
    "true",
    "[1, 2]",
    '{"a": 1',  # unclosed
    '{"a": "b',
    '{"a": [1}',
    '{"a": 1}}',
    '{"a": 1} ',  # extra text after the object
    '{"a": 1}{}',
    ' {"a": 1}',  # whitespace where it is not allowed
    '{ "a": 1}',
    '{"a" : 1}',
    '{"a":  1}',
    '{"a": 1 }',
    '{"a": [ 1]}',
    '{"a": 1,  "b": 2}',
    '{"a":\n1}',
    '{"a": "line\nbreak"}',  # control characters in strings
    '{"a": "tab\there"}',
    '{"a": "\\x"}',  # bad escapes
    '{"a": "\\u12g4"}',
    "{'a': 1}",
    '{a: 1}',
    '{"a" 1}',
    '{"a": {"b": {"c": {"d": {}}}}}',  # depth 5 > max_depth 4
    '{"a": [[[[]]]]}',
]


@pytest.mark.parametrize("text", VALID_JSON)
def test_json_grammar_accepts_valid_objects(text):
    assert isinstance(json.loads(text), dict)
    assert accepts(JsonObjectGrammar(), text)


@pytest.mark.parametrize("text", INVALID_JSON)
def test_json_grammar_rejects_invalid_text(text):
    assert not accepts(JsonObjectGrammar(), text)


def test_json_depth_bound_counts_the_top_level_object():
    assert accepts(JsonObjectGrammar(max_depth=1), '{"a": 1}')
    assert not accepts(JsonObjectGrammar(max_depth=1), '{"a": []}')
    assert accepts(JsonObjectGrammar(max_depth=2), '{"a": []}')
    with pytest.raises(ValueError, match="max_depth"):
        JsonObjectGrammar(max_depth=0)


def random_json_value(rng: random.Random, depth: int):
    """A random JSON value whose containers nest at most `depth` deep."""
    kinds = ["string", "int", "float", "literal"] + (["list", "dict"] if depth > 0 else [])
    kind = rng.choice(kinds)
    if kind == "string":
        return "".join(rng.choice('ab Z"\\/\n\t\x01é✓日😀') for _ in range(rng.randrange(6)))
    if kind == "int":
        return rng.choice([0, -1, 7, 42, -1000, 10**12])
    if kind == "float":
        return rng.choice([0.5, -2.25, 1e-7, 3.5e20, -0.0, 123.456, 1e300])
    if kind == "literal":
        return rng.choice([True, False, None])
    if kind == "list":
        return [random_json_value(rng, depth - 1) for _ in range(rng.randrange(4))]
    return random_json_object(rng, depth)


def random_json_object(rng: random.Random, depth: int) -> dict:
    keys = ["".join(rng.choice('kq"\\ é') for _ in range(rng.randrange(4))) for _ in range(rng.randrange(4))]
    return {key: random_json_value(rng, depth - 1) for key in keys}


@pytest.mark.parametrize("separators", [(", ", ": "), (",", ":")])
@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_json_grammar_accepts_random_serialized_objects(separators, ensure_ascii):
    rng, grammar = random.Random(0), JsonObjectGrammar(max_depth=4)
    for _ in range(300):
        text = json.dumps(random_json_object(rng, depth=4), separators=separators, ensure_ascii=ensure_ascii)
        assert accepts(grammar, text), text
        cut = rng.randrange(len(text))  # every proper prefix is alive but not complete
        state = walk(grammar.step, grammar.start(), text[:cut])
        assert state is not None and not grammar.is_complete(state), text[:cut]


# ----------------------------------------------------------------------------------------------------------------
# Regex grammar

REGEX_PATTERNS = [
    "a*b",
    "(a|b)*abb",
    "[ab]+0?",
    "a{2}",
    "a{1,3}b",
    "(a|ba){2,}",
    r"\d+(\.\d+)?",
    "[^a]*",
    ".b.",
    "(a|)b",
    "[a-b0]{0,2}1",
    r"\w+-\w+",
    "(?:a|b0)+",
    r"(a\.)*b",
    "[-a]+[a-]",
    r"[\d.]+\s?",
]


@pytest.mark.parametrize("pattern", REGEX_PATTERNS)
def test_regex_grammar_matches_python_re(pattern):
    rng, grammar = random.Random(1), RegexGrammar(pattern)
    num_matches = 0
    for _ in range(600):
        alphabet = rng.choice(["ab", "ab.0-", "ab01-. \n"])  # small alphabets so that some texts match
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(8)))
        matches = bool(re.fullmatch(pattern, text, re.ASCII))
        assert accepts(grammar, text) == matches, (pattern, text)
        num_matches += matches
    assert num_matches >= 3, f"{pattern}: too few matching samples to test anything"


@pytest.mark.parametrize(
    "pattern, construct",
    [("(?=a)a", "group syntax"), ("(?!a)b", "group syntax"), ("(?<=a)b", "group syntax"), ("(?P<x>a)", "group"),
     (r"(a)\1", "backreference"), ("^a", "anchor"), ("a$", "anchor"), (r"\bfoo", r"\\b"), ("a*?", "quantifier")],
)
def test_regex_unsupported_constructs_raise(pattern, construct):
    with pytest.raises(ValueError, match=construct) as err:
        RegexGrammar(pattern)
    assert "Supported" in str(err.value)


@pytest.mark.parametrize("pattern", ["(a", "a)", "*a", "a{2", "a{x}", "[z-a]", "a{3,1}", "[ab"])
def test_regex_malformed_patterns_raise(pattern):
    with pytest.raises(ValueError, match="regex"):
        RegexGrammar(pattern)


# ----------------------------------------------------------------------------------------------------------------
# Masks on a tiny vocabulary

class TinyTokenizer:
    """decode / all_special_ids / len: all a TokenMasker needs."""

    vocab = ["<eos>", "<pad>", "\ufffd", "{", "}", "[", "]", '"', ":", ",", " ", "a", "b", "0", "1", "-", ".", "e",
             "t", "r", "u", "f", "n", "l", "s", "\\", '{"', '": ', '", "', '"}', "true", "12", "0.5", ' "', ', ',
             "}}", "]}", "\\n", "\\u00e9", "ab", "\n", "é", "null", "a-b", "11"]
    all_special_ids = [0, 1]

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids)

    def __len__(self):
        return len(self.vocab)


EOS = 0


def random_prefix_states(grammar, texts: list[str], rng: random.Random, count: int):
    states = [grammar.start()]
    while len(states) < count:
        text = rng.choice(texts)
        states.append(walk(grammar.step, grammar.start(), text[: rng.randrange(len(text) + 1)]))
    return states


@pytest.mark.parametrize("kind", ["json", "regex"])
def test_mask_equals_brute_force_allowed_tokens(kind):
    tokenizer, rng = TinyTokenizer(), random.Random(2)
    if kind == "json":
        grammar, texts = JsonObjectGrammar(max_depth=2), VALID_JSON + ['{"a": {"b": [1]}}']
    else:
        grammar, texts = RegexGrammar(r"(ab|a-b)+\.\d{2}"), ["ab.12", "a-bab.10", "ab"]
    masker = TokenMasker(grammar, tokenizer, [EOS], vocab_size=len(tokenizer) + 3)  # padded like a real checkpoint
    assert masker.token_strings[:3] == ["", "", ""]  # special tokens and a partial UTF-8 byte are never allowed
    for state in random_prefix_states(grammar, texts, rng, 40):
        if state is None:
            continue
        mask = masker.mask(state)
        expected = allowed_tokens(grammar.step, state, masker.token_strings)
        assert mask.shape == (len(tokenizer) + 3,) and mask.dtype == torch.bool
        assert mask[1 : len(tokenizer)].tolist() == expected[1:]
        assert not mask[len(tokenizer) :].any()  # padded ids
        assert bool(mask[EOS]) == (grammar.is_complete(state) or not any(expected))
        assert masker.mask(state) is mask  # cached


def test_dead_end_allows_only_eos():
    masker = TokenMasker(RegexGrammar("a~"), TinyTokenizer(), [EOS])  # no token spells '~'
    state = masker.advance(masker.grammar.start(), TinyTokenizer.vocab.index("a"))
    assert masker.mask(state).nonzero().flatten().tolist() == [EOS]
    assert masker.advance(state, EOS) is None  # end-of-sequence is not text


def test_processor_state_for_any_list_of_ids():
    tokenizer, rng = TinyTokenizer(), random.Random(3)
    masker = TokenMasker(JsonObjectGrammar(), tokenizer, [EOS])
    processor = GrammarLogitsProcessor(masker)
    grammar = masker.grammar
    lines: list[list[int]] = [[] for _ in range(3)]  # three completions of one request, called in turn
    for _ in range(60):
        ids = rng.choice(lines)
        logits = processor(ids, torch.zeros(len(tokenizer)))  # (V,)
        allowed = torch.isfinite(logits).nonzero().flatten().tolist()
        text = tokenizer.decode(ids)
        assert processor.state_for(ids) == walk(grammar.step, grammar.start(), text)
        token = rng.choice(allowed)
        if token == EOS or rng.random() < 0.05:  # finished, or preempted and recomputed from scratch
            ids.clear()
        else:
            ids.append(token)
    assert processor.state_for([TinyTokenizer.vocab.index("}")]) is None  # off the grammar: only EOS then
    only_eos = processor([TinyTokenizer.vocab.index("}")], torch.zeros(len(tokenizer)))
    assert torch.isfinite(only_eos).nonzero().flatten().tolist() == [EOS]
    with pytest.raises(ValueError, match="vocab_size"):
        processor([], torch.zeros(len(tokenizer) + 1))


def test_logits_processor_for_response_formats():
    tokenizer = TinyTokenizer()

    def make(response_format, regex=None):
        return logits_processor_for(response_format, regex, tokenizer, [EOS], len(tokenizer))

    assert make(None) is None and make({"type": "text"}) is None
    json_processor = make({"type": "json_object"})
    assert isinstance(json_processor.masker.grammar, JsonObjectGrammar)
    assert make({"type": "json_object"}).masker is json_processor.masker  # shared across requests
    assert isinstance(make(None, "a+").masker.grammar, RegexGrammar)
    assert make({"type": "text"}, "a+").masker is make(None, "a+").masker
    with pytest.raises(ValueError, match="not both"):
        make({"type": "json_object"}, "a+")
    with pytest.raises(ValueError, match="xgrammar"):
        make({"type": "json_schema", "json_schema": {"schema": {}}})
    with pytest.raises(ValueError, match="json_object"):
        make({"type": "yaml"})
    with pytest.raises(ValueError, match="must be a dict"):
        make("json_object")


# ----------------------------------------------------------------------------------------------------------------
# The real tokenizer and model (SmolLM2-135M-Instruct)


@pytest.fixture(scope="module")
def real_tokenizer(smollm):
    return smollm[1]


@pytest.fixture(scope="module")
def llm(smollm):
    model, tokenizer = smollm
    return minillm.LLM(model, tokenizer=tokenizer, max_num_seqs=2)


def processor_for(llm, response_format=None, regex=None) -> GrammarLogitsProcessor:
    return logits_processor_for(response_format, regex, llm.tokenizer, llm.eos_token_ids, llm.config.vocab_size)


def test_single_token_decode_keeps_leading_spaces(real_tokenizer):
    """Byte-level BPE: the texts of the tokens concatenate to the decoded text, so a mask can reason per token."""
    for text in [' {"name": "France", "capital": "Paris"}', "Hello world, it's 3.14!", "  two  spaces\nnew line"]:
        ids = real_tokenizer.encode(text, add_special_tokens=False)
        assert "".join(real_tokenizer.decode([i]) for i in ids) == real_tokenizer.decode(ids) == text


def random_walk(processor: GrammarLogitsProcessor, rng: random.Random, max_steps: int = 200) -> tuple[str, bool]:
    """Pick random allowed tokens (preferring ones that close things, so walks end) until EOS or `max_steps`."""
    masker, ids = processor.masker, []
    vocab_size = masker.vocab_size
    for _ in range(max_steps):
        allowed = torch.isfinite(processor(ids, torch.zeros(vocab_size))).nonzero().flatten().tolist()
        if set(allowed) & set(masker.eos_token_ids):
            return "".join(masker.token_strings[i] for i in ids), True
        closing = [i for i in allowed if any(c in masker.token_strings[i] for c in '"}],')]
        ids.append(rng.choice(closing if closing and rng.random() < 0.6 else allowed))
    return "".join(masker.token_strings[i] for i in ids), False


def test_random_walks_over_the_real_vocabulary_stay_valid(llm):
    rng = random.Random(4)
    json_processor = processor_for(llm, {"type": "json_object"})
    grammar = json_processor.masker.grammar
    num_complete = 0
    for _ in range(4):
        text, complete = random_walk(json_processor, rng)
        assert walk(grammar.step, grammar.start(), text) is not None
        if complete:
            assert isinstance(json.loads(text), dict), text
            num_complete += 1
    assert num_complete > 0
    for pattern in ["(yes|no)", "[0-9]{3}-[0-9]{4}"]:
        for _ in range(3):
            text, complete = random_walk(processor_for(llm, regex=pattern), rng)
            assert complete and re.fullmatch(pattern, text), (pattern, text)


def test_generation_is_json(llm):
    chat = [{"role": "user", "content": "Describe France as a JSON object with keys name, capital and population."}]
    processor = processor_for(llm, {"type": "json_object"})
    out = llm.generate([chat], SamplingParams(max_tokens=48, logits_processors=[processor]))[0]
    grammar = JsonObjectGrammar()
    assert out.text.startswith("{") and walk(grammar.step, grammar.start(), out.text) is not None, out.text
    if out.finish_reason == "stop":
        assert isinstance(json.loads(out.text), dict)


def test_generation_matches_a_regex_and_stops_by_eos(llm):
    chat = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    processor = processor_for(llm, regex="(Paris|London|Rome)")
    out = llm.generate([chat], SamplingParams(max_tokens=16, logits_processors=[processor]))[0]
    assert out.text in {"Paris", "London", "Rome"} and out.finish_reason == "stop", (out.text, out.finish_reason)
    assert out.token_ids[-1] in llm.eos_token_ids  # the grammar ended, so only end-of-sequence was left
