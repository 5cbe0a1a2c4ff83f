"""Packing a model into buckets and the strict validation of the wire format (no engine involved)."""

from __future__ import annotations

import json

import pytest
import torch
from skyrl_backends.errors import WeightUpdateError
from skyrl_backends.types import WeightUpdateRequest
from skyrl_backends.weight_sync import iter_weight_chunks, request_from_json, request_to_json
from skyrl_backends.weight_sync.chunks import CopyPlan, _lanes, copy_all, plan
from skyrl_backends.weight_sync.manifest import ALIGNMENT, parse_buckets, plan_buckets, spelled_out


def _state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(10, 8, generator=g),
        "layer.0.weight": torch.randn(8, 8, generator=g),
        "layer.0.bias": torch.randn(8, generator=g),
        "layer.1.weight": torch.randn(8, 8, generator=g),
        "big.weight": torch.randn(64, 64, generator=g),
        "step": torch.tensor([3], dtype=torch.int64),
    }


def test_chunks_round_trip_values_and_respect_bucket_size():
    sd = _state_dict()
    chunks = list(iter_weight_chunks(sd, bucket_bytes=1024))
    assert [n for c in chunks for n in c.names] == list(sd)
    for chunk in chunks:
        # A bucket exceeds the limit only when it holds one tensor larger than the limit.
        assert chunk.manifest.nbytes <= 1024 or len(chunk.manifest.tensors) == 1
        assert chunk.buffer.dtype == torch.uint8 and chunk.buffer.numel() == chunk.manifest.nbytes
        for entry in chunk.manifest.tensors:
            assert entry.offset % ALIGNMENT == 0
        for name, tensor in chunk.views():
            assert torch.equal(tensor, sd[name])
    assert len(chunks) >= 3


def test_chunks_convert_to_the_requested_dtype_and_module_input():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    chunks = list(iter_weight_chunks(model, dtype_for="bfloat16"))
    assert len(chunks) == 1
    got = dict(chunks[0].views())
    assert set(got) == set(model.state_dict())
    for name, ref in model.state_dict().items():
        assert got[name].dtype == torch.bfloat16
        assert torch.equal(got[name], ref.to(torch.bfloat16))


def test_dtype_for_mapping_converts_only_named_tensors():
    sd = _state_dict()
    layout = plan(sd, dtype_for={"embed.weight": "float16"})
    dtypes = dict(zip(layout.names, layout.dtypes, strict=False))
    assert dtypes["embed.weight"] == "float16" and dtypes["layer.0.weight"] == "float32" and dtypes["step"] == "int64"


def test_dtype_for_mapping_takes_dtypes_or_their_names_and_names_a_bad_one():
    sd = _state_dict()
    layout = plan(sd, dtype_for={"embed.weight": torch.bfloat16, "layer.0.weight": "float16", "nothing": "float32"})
    dtypes = dict(zip(layout.names, layout.dtypes, strict=True))
    assert dtypes == {"embed.weight": "bfloat16", "layer.0.weight": "float16", "layer.0.bias": "float32",
                      "layer.1.weight": "float32", "big.weight": "float32", "step": "int64"}
    with pytest.raises(WeightUpdateError) as info:
        plan(sd, dtype_for={"embed.weight": "float64x"})
    assert "float64x" in info.value.problems["dtype"]


def test_bad_bucket_size_and_dtype_are_rejected():
    with pytest.raises(WeightUpdateError, match="bucket_bytes"):
        plan_buckets([("a", "float32", (2,))], 0)
    with pytest.raises(WeightUpdateError, match="complex64"):
        plan_buckets([("a", "complex64", (2,))], 1024)


def _request(buckets, names=("a", "b"), dtypes=("float32", "float32"), shapes=((2, 2), (3,)), strategy="broadcast"):
    return WeightUpdateRequest(list(names), list(dtypes), [tuple(s) for s in shapes], strategy, {"buckets": buckets})


def _good_bucket():
    return {"nbytes": 256 + 12, "tensors": [{"name": "a", "dtype": "float32", "shape": [2, 2], "offset": 0},
                                            {"name": "b", "dtype": "float32", "shape": [3], "offset": 256}]}


@pytest.mark.parametrize("alone_bytes", [None, 1, 64, 1 << 40])
def test_copy_all_copies_and_converts_every_tensor_whichever_way_it_groups_them(alone_bytes):
    # Large tensors get a copy each, the rest one fused copy: every destination must end up holding
    # its source, converted to its dtype, and strided destinations (a slice of a fused parameter) too.
    g = torch.Generator().manual_seed(0)
    sources = [torch.randn(s, generator=g) for s in [(4, 8), (3,), (16, 16), (1,), (5, 7)]]
    fused = torch.zeros(10, 7, dtype=torch.bfloat16)
    destinations = [torch.zeros(4, 8), torch.zeros(3, dtype=torch.float64), torch.zeros(16, 16, dtype=torch.bfloat16),
                    torch.zeros(1), fused[::2]]
    copy_all(destinations, sources, alone_bytes)
    for destination, source in zip(destinations, sources, strict=True):
        assert torch.equal(destination, source.to(destination.dtype))
    assert fused[1::2].eq(0).all()  # the rows between the slice's stay untouched


def test_copy_plan_deals_large_copies_into_lanes_of_about_equal_bytes_in_their_own_order():
    pairs = [(torch.zeros(n), torch.zeros(n)) for n in (100, 10, 60, 50, 40, 5)]
    lanes = _lanes(pairs, 3)
    assert sorted(id(pair) for lane in lanes for pair in lane) == sorted(map(id, pairs))  # each pair once
    assert [sum(d.numel() for d, _ in lane) for lane in lanes] == [100, 75, 90]  # largest first, to the lightest
    position = {id(pair): i for i, pair in enumerate(pairs)}
    for lane in lanes:  # kept in the pairs' order, as they were listed
        assert [position[id(pair)] for pair in lane] == sorted(position[id(pair)] for pair in lane)
    assert len(_lanes(pairs, 10)) == 6  # no empty lane
    assert _lanes([], 4) == [[]]


def test_copy_plan_on_a_cpu_ignores_streams_and_graph_and_copies_every_run():
    sources = [torch.randn(300), torch.randn(3)]
    destinations = [torch.zeros(300), torch.zeros(3, dtype=torch.float64)]
    copies = CopyPlan(destinations, sources, alone_bytes=64, streams=4, graph=True)
    assert len(copies.lanes) == 1 and not copies.graph
    for _ in range(2):  # the plan is made once and run at every update, on the values of that moment
        copies.run()
        assert all(torch.equal(d, s.to(d.dtype)) for d, s in zip(destinations, sources, strict=True))
        for source in sources:
            source.add_(1)
    with pytest.raises(ValueError, match="streams"):
        CopyPlan(destinations, sources, streams=0)


def test_copy_plan_whose_graph_cannot_be_captured_queues_its_copies_from_python(caplog):
    # On this CPU build a CUDA graph cannot even be made: the capture fails as one would on a GPU
    # that refuses it, and the copies must still all happen, now and at every later run.
    sources = [torch.randn(300), torch.randn(3)]
    destinations = [torch.zeros(300), torch.zeros(3)]
    copies = CopyPlan(destinations, sources, alone_bytes=64)
    copies.graph, copies.device = True, None  # as a GPU plan would be
    with caplog.at_level("WARNING"):
        copies.run()
    assert "could not be captured in a CUDA graph" in caplog.text and not copies.graph
    assert all(torch.equal(d, s) for d, s in zip(destinations, sources, strict=True))
    for source in sources:
        source.add_(1)
    copies.run()
    assert all(torch.equal(d, s) for d, s in zip(destinations, sources, strict=True))


def test_parse_buckets_accepts_a_consistent_payload():
    [(manifest, raw)] = parse_buckets(_request([_good_bucket()]))
    assert [e.name for e in manifest.tensors] == ["a", "b"] and manifest.nbytes == 268


@pytest.mark.parametrize("mutate, offender, words", [
    (lambda b: b["tensors"][1].update(offset=260), "b", "outside its bucket"),
    (lambda b: b["tensors"][1].update(offset=8), "b", "overlaps"),
    (lambda b: b["tensors"][1].update(offset=2), "b", "multiple"),
    (lambda b: b["tensors"][1].update(offset=-4), "b", "non-negative"),
    (lambda b: b["tensors"][1].update(dtype="object"), "b", "not allowed"),
    (lambda b: b["tensors"][1].update(shape=[-3]), "b", "non-negative"),
    (lambda b: b["tensors"][1].update(shape=[1]), "b", "request declares"),
    (lambda b: b["tensors"][1].update(dtype="int32"), "b", "request declares"),
    (lambda b: b["tensors"].pop(), "b", "missing from the payload"),
    (lambda b: (b.update(nbytes=513), b["tensors"].append({"name": "c", "dtype": "uint8", "shape": [1],
                                                           "offset": 512})), "c",
     "not among the request's names"),
    (lambda b: b["tensors"].append(dict(b["tensors"][0])), "a", "more than once"),
    (lambda b: b.update(nbytes="268"), "payload.buckets[0].nbytes", "integer"),
    (lambda b: b["tensors"][0].update(name=7), "payload.buckets[0].tensors[0]", "non-empty string"),
])
def test_parse_buckets_names_every_problem(mutate, offender, words):
    bucket = _good_bucket()
    mutate(bucket)
    with pytest.raises(WeightUpdateError) as info:
        parse_buckets(_request([bucket]))
    assert offender in info.value.problems, info.value.problems
    assert words in info.value.problems[offender]


def test_parse_buckets_rejects_a_payload_without_buckets():
    for payload in (None, [1, 2], {"buckets": "x"}):
        request = WeightUpdateRequest(["a"], ["float32"], [(1,)], "broadcast", payload)
        with pytest.raises(WeightUpdateError, match="payload"):
            parse_buckets(request)


def test_request_json_round_trip_through_text():
    request = _request([_good_bucket()], strategy="shared_memory")
    text = json.dumps(request_to_json(request))
    back = request_from_json(json.loads(text))
    assert (back.names, back.dtypes, back.shapes, back.strategy) == (request.names, request.dtypes,
                                                                    request.shapes, request.strategy)
    assert back.payload == request.payload
    assert back.check_finite is False
    request.check_finite = True
    assert request_from_json(json.loads(json.dumps(request_to_json(request)))).check_finite is True


@pytest.mark.parametrize("field, value", [
    ("wire_version", 99), ("strategy", "pickle"), ("names", [1, 2]), ("dtypes", ["float32", "object"]),
    ("shapes", [[2, 2], [-1]]), ("shapes", [[2, 2], [True]]), ("shapes", [[2, 2.0], [1]]), ("shapes", [[2, 2], 1]),
    ("shapes", [(2, 2), [1]]), ("names", ["a", "a"]), ("check_finite", "yes"), ("check_finite", 1),
])
def test_request_from_json_rejects_bad_top_level_fields(field, value):
    obj = request_to_json(_request([_good_bucket()], strategy="shared_memory"))
    obj[field] = value
    with pytest.raises(WeightUpdateError):
        request_from_json(obj)


def test_in_process_tensors_cannot_be_serialised():
    request = WeightUpdateRequest.from_named_tensors([("a", torch.zeros(2))])
    with pytest.raises(WeightUpdateError, match="cannot cross a process boundary"):
        request_to_json(request)


def test_a_rejection_reported_as_text_by_a_worker_is_recovered():
    from skyrl_backends.weight_sync.manifest import weight_update_error_from_text

    original = WeightUpdateError({"a.weight": "shape (1,) does not match the engine's (2,)",
                                  "payload.buckets[3].segment": "segment 'skyrl_ws_00' does not exist"})
    wrapped = f"Call to collective_rpc method failed: Worker failed with error '{original}', please check the logs"
    for text in (str(original), wrapped):
        recovered = weight_update_error_from_text(text)
        assert isinstance(recovered, WeightUpdateError) and recovered.problems == original.problems
    assert weight_update_error_from_text("RuntimeError: CUDA out of memory") is None


def test_tied_weights_of_a_module_are_sent_once_under_the_first_name():
    import torch
    from skyrl_backends.weight_sync.chunks import named_tensors

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(4, 3)
            self.head = torch.nn.Linear(3, 4, bias=False)
            self.head.weight = self.embed.weight

    names = [name for name, _ in named_tensors(Tied())]
    assert names == ["embed.weight"]
    # a plain state dict is sent as given: the caller chose those names
    assert [n for n, _ in named_tensors(Tied().state_dict())] == ["embed.weight", "head.weight"]


def test_a_shared_submodule_and_a_shared_buffer_are_sent_once_under_their_first_names():
    import torch
    from skyrl_backends.weight_sync.chunks import named_tensors

    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            block = torch.nn.Linear(3, 3)
            self.first = block
            self.second = block  # the same module under two names: its parameters are aliases
            scale = torch.ones(3)
            self.register_buffer("scale", scale)
            self.inner = torch.nn.Module()
            self.inner.register_buffer("scale", scale)  # the same buffer again
            self.inner.register_buffer("own", torch.zeros(2))
            self.inner.register_buffer("scratch", torch.zeros(2), persistent=False)  # not in the state dict

    assert [name for name, _ in named_tensors(Shared())] == ["scale", "first.weight", "first.bias", "inner.own"]


# -- the planned payload: the plan instead of the manifests ------------------------------------
def _planned(bucket_bytes: int = 1024) -> WeightUpdateRequest:
    layout = plan(_state_dict(), bucket_bytes)
    return WeightUpdateRequest(layout.names, layout.dtypes, layout.shapes, "broadcast", layout.payload())


def test_a_planned_payload_gives_the_senders_manifests_in_less_json():
    layout = plan(_state_dict(), 1024)
    request = _planned()
    assert [manifest for manifest, _ in parse_buckets(request)] == layout.buckets
    # Planned once per layout: the sender's own manifest objects again, what the layout caches compare
    assert all(a is b for (a, _), b in zip(parse_buckets(request), layout.buckets, strict=True))
    explicit = spelled_out(request)
    assert "plan" not in explicit.payload
    assert [manifest for manifest, _ in parse_buckets(explicit)] == layout.buckets
    # The same layout, every tensor described once (at the request's top level) instead of twice
    assert len(json.dumps(request_to_json(request))) < 0.6 * len(json.dumps(request_to_json(explicit)))
    back = request_from_json(json.loads(json.dumps(request_to_json(request))))
    assert [manifest for manifest, _ in parse_buckets(back)] == layout.buckets


@pytest.mark.parametrize("mutate, offender, words", [
    (lambda p: p["plan"].update(bucket_bytes=0), "payload.plan.bucket_bytes", "integer in [1,"),
    (lambda p: p["plan"].update(bucket_bytes="1024"), "payload.plan.bucket_bytes", "integer in [1,"),
    (lambda p: p["plan"].update(alignment=100), "payload.plan.alignment", "power of two"),
    (lambda p: p["plan"].update(order="reversed"), "payload.plan", "unknown field(s) ['order']"),
    (lambda p: p.update(plan=[1024]), "payload.plan", "expected an object"),
    (lambda p: p["plan"].update(bucket_bytes=1 << 20), "payload.buckets", "payload.plan gives 1"),
    (lambda p: p["buckets"].pop(), "payload.buckets", "payload.plan gives"),
    (lambda p: p["buckets"][1].update(nbytes=p["buckets"][1]["nbytes"] + 1), "payload.buckets[1].nbytes",
     "payload.plan gives this bucket"),
    (lambda p: p["buckets"][0].pop("nbytes"), "payload.buckets[0]", "missing field(s) ['nbytes']"),
    (lambda p: p["buckets"][0].update(tensors=[]), "payload.buckets[0].tensors", "send the plan or the tensors"),
])
def test_a_planned_payload_names_every_problem(mutate, offender, words):
    request = _planned()
    mutate(request.payload)
    with pytest.raises(WeightUpdateError) as info:
        parse_buckets(request)
    assert offender in info.value.problems, info.value.problems
    assert words in info.value.problems[offender]


def test_a_planned_payload_refuses_a_negative_dimension_by_name():
    request = _planned()
    request.shapes[0] = (-10, 8)
    with pytest.raises(WeightUpdateError) as info:
        parse_buckets(request)
    assert "non-negative" in info.value.problems[request.names[0]]


@pytest.mark.parametrize("weights, named", [({"a": torch.ones(2), 7: torch.ones(2)}, "7"),
                                            ([("a", torch.ones(2)), ("b", [1.0, 2.0])], "b"),
                                            ([("a", torch.ones(2)), ("b", torch.ones(2), "extra")], "('b'"),
                                            ([("a", torch.ones(2)), "bc"], "bc")])
def test_weights_that_are_not_named_tensors_are_refused_by_the_first_offender(weights, named):
    with pytest.raises(WeightUpdateError) as refused:
        plan(weights)
    assert any(key.startswith(named) for key in refused.value.problems), refused.value.problems


def test_tensors_needing_grad_are_detached_and_the_others_passed_as_they_are():
    kept, trained = torch.ones(3), torch.nn.Parameter(torch.ones(2))
    layout = plan({"kept": kept, "trained": trained})
    assert layout.tensors["kept"] is kept
    assert not layout.tensors["trained"].requires_grad
    assert layout.tensors["trained"].data_ptr() == trained.data_ptr()
    assert plan([]).names == []
