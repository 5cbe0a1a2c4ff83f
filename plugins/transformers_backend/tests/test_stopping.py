"""Stop conditions with the canonical semantics (see skyrl_backends.sampling)."""

from conftest import run

PROMPT = [5, 6, 7]
GREEDY = {"max_generate_length": 16, "temperature": 0, "ignore_eos": True}


def reference(engine):
    return run(engine.generate([PROMPT], GREEDY))[0]


def test_max_length_is_exact(engine):
    for n in (1, 5, 16):
        out = run(engine.generate([PROMPT], {**GREEDY, "max_generate_length": n}))
        assert len(out[0].token_ids) == n and out[0].finish_reason == "length"


def test_stop_token_id_ends_with_that_token(engine):
    ref = reference(engine)
    stop_at = 4
    token = ref.token_ids[stop_at]
    first = ref.token_ids.index(token)
    out = run(engine.generate([PROMPT], {**GREEDY, "stop_token_ids": [token]}))[0]
    assert out.token_ids == ref.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == token


def test_eos_stops_unless_ignored(engine):
    ref = reference(engine)
    eos = ref.token_ids[3]
    engine.impl.eos_token_ids.add(eos)  # make an early token act as EOS for this check
    try:
        first = ref.token_ids.index(eos)
        stopped = run(engine.generate([PROMPT], {**GREEDY, "ignore_eos": False}))[0]
        assert stopped.token_ids == ref.token_ids[: first + 1] and stopped.finish_reason == "stop"
        assert stopped.stop_reason is None
        ignored = run(engine.generate([PROMPT], GREEDY))[0]
        assert ignored.token_ids == ref.token_ids
        # min_new_tokens suppresses EOS until reached: generation continues past it
        held = run(engine.generate([PROMPT], {**GREEDY, "ignore_eos": False, "min_new_tokens": first + 2}))[0]
        assert len(held.token_ids) >= first + 2
        assert eos not in held.token_ids[: first + 2]
    finally:
        engine.impl.eos_token_ids.discard(eos)


def test_stop_string_spanning_tokens_ends_text_where_string_ends(engine):
    ref = reference(engine)
    tokenizer = engine.impl.tokenizer
    pieces = [tokenizer.decode(ref.token_ids[: i + 1], skip_special_tokens=True) for i in range(len(ref.token_ids))]
    # a stop string made of the end of token 5's text and the start of token 6's: it spans a boundary
    text5, text6 = pieces[5], pieces[6]
    boundary = len(text5)
    stop = text6[max(0, boundary - 2): boundary + 2]
    assert len(stop) >= 3, "tiny model texts are long enough to span a boundary"
    out = run(engine.generate([PROMPT], {**GREEDY, "stop": [stop]}))[0]
    end = ref.text.find(stop) + len(stop)
    assert out.text == ref.text[:end]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    # the response ends with the token that completed the match
    n = len(out.token_ids)
    assert stop in tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert stop not in tokenizer.decode(out.token_ids[: n - 1], skip_special_tokens=True)


def test_stop_string_inside_a_longer_token_truncates_text(engine):
    ref = reference(engine)
    tokenizer = engine.impl.tokenizer
    # pick a response token whose text is at least 3 characters and stop on its first 2 characters
    for i, token in enumerate(ref.token_ids):
        piece = tokenizer.decode([token])
        prefix = tokenizer.decode(ref.token_ids[:i], skip_special_tokens=True)
        if len(piece) >= 3 and piece.isprintable() and piece[:2] not in prefix + piece[:1]:
            break
    else:
        raise AssertionError("no multi-character token in the reference output")
    stop = piece[:2]
    out = run(engine.generate([PROMPT], {**GREEDY, "stop": [stop]}))[0]
    assert out.token_ids == ref.token_ids[: i + 1]
    assert out.text == prefix + stop


def test_earliest_of_several_stop_strings_wins(engine):
    ref = reference(engine)
    first, later = ref.text[2:4], ref.text[8:11]
    out = run(engine.generate([PROMPT], {**GREEDY, "stop": [later, first]}))[0]
    assert out.stop_reason == first and out.text.endswith(first)
