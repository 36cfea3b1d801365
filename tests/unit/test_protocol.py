"""Request parsing refuses hostile bodies with a 400 naming the field (no server needed)."""
import json
import math

import pytest

from lorakit.serve import protocol as P

BASE = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
LIMITS = P.Limits(100, 64, 256, 49152)


def parse(body, kind="chat"):
    return P.parse_request(P.parse_json(json.dumps(body).encode() if not isinstance(body, bytes) else body),
                           kind, {"tiny", "base"}, LIMITS)


@pytest.mark.parametrize("raw,msg", [
    (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
    (b'{"a":' * 5000 + b"1" + b"}" * 5000, "nested too deeply"),
    (b'{"seed": ' + b"9" * 5000 + b"}", "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"),
    (b'"just a string"', "JSON object"),
])
def test_bodies_that_are_not_requests(raw, msg):
    with pytest.raises(P.APIError, match=msg) as e:
        P.parse_json(raw)
    assert e.value.status == 400


@pytest.mark.parametrize("model", ["a:3e38", "a:1e39", "a:NaN", "a:inf", "a:-Infinity", "a:10.001", "a:-11",
                                   "a:0.5+b:1e300", "a:x"])
def test_stack_weights_are_finite_and_bounded(model):
    with pytest.raises(P.APIError, match="weight") as e:
        parse({**BASE, "model": model})
    assert e.value.status == 400 and e.value.param == "model"


def test_weights_at_the_bound_are_accepted():
    assert parse({**BASE, "model": "a:10+b:-10"}).stack == [("a", 10.0), ("b", -10.0)]


@pytest.mark.parametrize("key,value", [("stream", "false"), ("stream", 0), ("return_token_ids", "true"),
                                       ("ignore_eos", 1), ("stream", None)])
def test_booleans_must_be_json_booleans(key, value):
    if value is None:
        assert parse({**BASE, key: value}).stream is False
        return
    with pytest.raises(P.APIError, match=f"'{key}' must be true or false"):
        parse({**BASE, key: value})
    with pytest.raises(P.APIError, match="'include_usage' must be true or false"):
        parse({**BASE, "stream_options": {"include_usage": "no"}})


@pytest.mark.parametrize("key,value", [("temperature", 2.5), ("temperature", -1e-300), ("top_p", 0),
                                       ("max_tokens", 10 ** 30), ("max_tokens", 1.5), ("seed", 2 ** 64),
                                       ("temperature", "0.5"), ("top_p", [1])])
def test_numbers_out_of_range_or_of_the_wrong_type(key, value):
    with pytest.raises(P.APIError) as e:
        parse({**BASE, key: value})
    assert e.value.status == 400 and e.value.param == key


def test_nan_and_infinity_in_numeric_fields():
    for key in ("temperature", "top_p", "max_tokens", "seed", "presence_penalty"):
        for word in ("NaN", "Infinity", "-Infinity", "1e999"):
            raw = json.dumps(BASE)[:-1].encode() + f', "{key}": {word}}}'.encode()
            with pytest.raises(P.APIError) as e:
                parse(raw)
            assert e.value.status == 400, (key, word)


def test_tiny_temperature_is_accepted():
    assert parse({**BASE, "temperature": 1e-45}).temperature == 1e-45


@pytest.mark.parametrize("key,value", [("logprobs", []), ("logprobs", 0), ("logprobs", True), ("echo", 1),
                                       ("tools", [{}]), ("suffix", "x"), ("n", []), ("presence_penalty", math.nan)])
def test_unsupported_fields_are_refused_by_name(key, value):
    with pytest.raises(P.APIError, match=f"'{key}'") as e:
        parse({**BASE, key: value})
    assert e.value.status == 400


@pytest.mark.parametrize("key,value", [("logprobs", False), ("logprobs", None), ("tools", []), ("echo", False),
                                       ("suffix", "")])
def test_unsupported_fields_left_empty_are_fine(key, value):
    assert parse({**BASE, key: value}).model == "a"
