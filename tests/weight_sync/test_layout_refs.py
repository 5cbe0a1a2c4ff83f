"""Requests that name their layout by id after sending it once: what crosses, what the receiver
rebuilds, and every way an id can be refused (nothing is applied then, and the sender sends in full)."""

from __future__ import annotations

import json

import pytest
from skyrl_backends.errors import WeightUpdateError
from skyrl_backends.types import WeightUpdateRequest
from skyrl_backends.weight_sync.layout_refs import LAYOUT_FIELD, ReceivedLayouts, SentLayouts, refused_layout


def _request(names=("a", "b"), strategy="shared_memory", payload=None, check_finite=False) -> WeightUpdateRequest:
    return WeightUpdateRequest(list(names), ["float32"] * len(names), [(2, 3)] * len(names), strategy,
                               payload if payload is not None else {"buckets": [{"segment": "x"}]},
                               check_finite=check_finite)


def _cross(obj):  # through text, as a pipe or HTTP carries it
    return json.loads(json.dumps(obj))


def test_a_layout_is_sent_in_full_until_taken_then_by_id_and_rebuilt_the_same():
    sent, received = SentLayouts(), ReceivedLayouts()
    first, layout_id = sent.to_json(_request())
    assert first["names"] == ["a", "b"] and first[LAYOUT_FIELD] == layout_id
    assert sent.to_json(_request())[0]["names"] == ["a", "b"]  # not taken yet: still in full
    received.from_json(_cross(first))
    sent.taken(layout_id)
    by_id, same_id = sent.to_json(_request(payload={"buckets": [{"segment": "y"}]}, check_finite=True))
    assert same_id == layout_id and not {"names", "dtypes", "shapes"} & by_id.keys()
    assert len(json.dumps(by_id)) < len(json.dumps(first))
    back = received.from_json(_cross(by_id))
    assert (back.names, back.dtypes, back.shapes) == (["a", "b"], ["float32"] * 2, [(2, 3), (2, 3)])
    assert back.payload == {"buckets": [{"segment": "y"}]} and back.check_finite is True
    assert back.strategy == "shared_memory"
    other, other_id = sent.to_json(_request(names=("a", "c")))  # another layout: its own id, in full
    assert other_id != layout_id and other["names"] == ["a", "c"]


def test_the_same_lists_changed_in_place_are_a_new_layout_and_a_layout_sent_again_keeps_its_id():
    sent = SentLayouts()
    request = _request()
    first, layout_id = sent.to_json(request)
    sent.taken(layout_id)
    assert sent.to_json(request)[1] == layout_id
    request.names[1] = "c"  # the very lists the last request named, changed since
    changed, changed_id = sent.to_json(request)
    assert changed_id != layout_id and changed["names"] == ["a", "c"]
    sent.taken(changed_id)
    again, again_id = sent.to_json(_request())  # the first layout once more: known, taken, by id
    assert again_id == layout_id and "names" not in again
    request.shapes[0] = (3, 2)
    assert sent.to_json(request)[0]["shapes"] == [[3, 2], [2, 3]]


def test_an_id_the_receiver_does_not_keep_is_refused_by_name_and_sent_in_full_again():
    sent = SentLayouts()
    body, layout_id = sent.to_json(_request())
    sent.taken(layout_id)  # taken by a receiver that then restarted
    restarted = ReceivedLayouts()
    with pytest.raises(WeightUpdateError) as info:
        restarted.from_json(_cross(sent.to_json(_request())[0]))
    assert LAYOUT_FIELD in info.value.problems and "send the request in full" in info.value.problems[LAYOUT_FIELD]
    assert refused_layout(info.value) and sent.refused(layout_id, info.value)
    again, _ = sent.to_json(_request())
    assert again["names"] == ["a", "b"]
    assert restarted.from_json(_cross(again)).names == ["a", "b"]
    assert not sent.refused(layout_id, WeightUpdateError({"names": "unknown"}))  # other refusals: left alone


def test_the_receiver_keeps_the_last_layouts_only():
    received = ReceivedLayouts(kept=2)
    senders = [SentLayouts() for _ in range(3)]
    ids = []
    for index, sender in enumerate(senders):
        body, layout_id = sender.to_json(_request(names=(f"t{index}",)))
        received.from_json(_cross(body))
        sender.taken(layout_id)
        ids.append(layout_id)
    with pytest.raises(WeightUpdateError, match="not a layout this engine keeps"):
        received.from_json(_cross(senders[0].to_json(_request(names=("t0",)))[0]))
    assert received.from_json(_cross(senders[2].to_json(_request(names=("t2",)))[0])).names == ["t2"]


@pytest.mark.parametrize("change, field", [
    ({LAYOUT_FIELD: "not-hex"}, LAYOUT_FIELD), ({LAYOUT_FIELD: 7}, LAYOUT_FIELD), ({"strategy": "pickle"}, "strategy"),
    ({"wire_version": 99}, "wire_version"), ({"check_finite": "yes"}, "check_finite"),
])
def test_a_request_by_id_is_checked_like_one_in_full(change, field):
    sent, received = SentLayouts(), ReceivedLayouts()
    body, layout_id = sent.to_json(_request())
    received.from_json(_cross(body))
    sent.taken(layout_id)
    by_id = _cross(sent.to_json(_request())[0]) | change
    with pytest.raises(WeightUpdateError) as info:
        received.from_json(by_id)
    assert field in info.value.problems


def test_a_full_request_with_a_bad_layout_is_refused_and_not_kept():
    received = ReceivedLayouts()
    body, layout_id = SentLayouts().to_json(_request())
    bad = _cross(body) | {"shapes": [[2, -3], [2, 3]]}
    with pytest.raises(WeightUpdateError) as info:
        received.from_json(bad)
    assert "shapes" in info.value.problems
    with pytest.raises(WeightUpdateError, match="not a layout this engine keeps"):
        received.from_json({k: v for k, v in _cross(body).items() if k not in ("names", "dtypes", "shapes")})


def test_requests_without_an_id_are_read_as_before():
    body = SentLayouts().to_json(_request())[0]
    del body[LAYOUT_FIELD]
    assert ReceivedLayouts().from_json(_cross(body)).names == ["a", "b"]
