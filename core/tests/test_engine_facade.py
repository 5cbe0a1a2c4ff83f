"""The facade's own rules, checked on the arithmetic test double (no engine needed)."""

import asyncio
import sys

import pytest
import skyrl_backends as sb
from doubles import DOUBLE_CAPABILITIES, DoublePlugin, PrefixCachingDoublePlugin
from skyrl_backends import (
    EngineAsleepError,
    EngineClosedError,
    LoraAdapterError,
    SamplingParamsError,
    UnsupportedCapabilityError,
    WeightsNotLoadedError,
    WeightUpdateError,
)
from skyrl_backends.capabilities import Capabilities
from skyrl_backends.types import TensorSpec, WeightUpdateRequest


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def engine(double_backend, tmp_path):
    return sb.create_engine("double", model=str(tmp_path), enable_lora=True)


def update(names, shapes, dtypes=None):
    import torch

    dtypes = dtypes or ["float32"] * len(names)
    tensors = [torch.zeros(shape, dtype=getattr(torch, dtype)) for shape, dtype in zip(shapes, dtypes)]
    return WeightUpdateRequest(names=names, shapes=shapes, dtypes=dtypes, payload=tensors)


def test_outputs_keep_prompt_order_and_carry_request_ids(engine):
    out = run(engine.generate([[10], [20], [30]], {"max_generate_length": 2}, request_ids=["a", "b", "c"]))
    assert out.response_ids == [[11, 12], [21, 22], [31, 32]]
    assert [c.request_id for c in out] == ["a", "b", "c"]


def test_n_samples_are_prompt_major_and_seeded_samples_use_seed_plus_j(tmp_path):
    import dataclasses

    sb.register_backend(DoublePlugin("seeded", dataclasses.replace(DOUBLE_CAPABILITIES, seeded_sampling=True)), "seeded")
    try:
        engine = sb.create_engine("seeded", model=str(tmp_path))
    finally:
        sb.unregister_backend("seeded")
    out = run(engine.generate([[10], [20]], {"max_generate_length": 1, "n": 3, "seed": 100}))
    # sample j of a prompt was generated with seed 100 + j (the double adds the seed to its output)
    assert out.response_ids == [[111], [112], [113], [121], [122], [123]]
    unseeded = run(engine.generate([[10], [20]], {"max_generate_length": 1, "n": 2}))
    assert unseeded.response_ids == [[11], [11], [21], [21]]


def test_generate_while_asleep_then_after_discarding_weights(engine):
    run(engine.sleep(level=2))
    with pytest.raises(EngineAsleepError, match="wake_up"):
        run(engine.generate([[1]], {"max_generate_length": 1}))
    run(engine.wake_up())
    with pytest.raises(WeightsNotLoadedError):
        run(engine.generate([[1]], {"max_generate_length": 1}))
    # a partial update is not enough: every parameter must arrive before generation resumes
    run(engine.update_named_weights(update(["w"], [(2, 2)])))
    with pytest.raises(WeightsNotLoadedError):
        run(engine.generate([[1]], {"max_generate_length": 1}))
    run(engine.update_named_weights(update(["b"], [(2,)])))
    assert run(engine.generate([[1]], {"max_generate_length": 1})).response_ids == [[2]]


@pytest.mark.parametrize("sent", [["w", "embed"], ["w", "head"], ["w", "embed", "head"]])
def test_a_tied_parameter_is_sent_under_either_name(engine, sent):
    # A tied model's trainer sends named_parameters() (the tied parameter once, under one name) or
    # its state_dict() (under every name): either is every weight.
    engine.impl.specs = [TensorSpec("w", (2, 2), "float32"), TensorSpec("embed", (3, 2), "float32"),
                         TensorSpec("head", (3, 2), "float32", tied_to="embed")]
    shapes = {"w": (2, 2), "embed": (3, 2), "head": (3, 2)}
    run(engine.sleep(level=2))
    run(engine.wake_up())
    run(engine.update_named_weights(update(["w"], [(2, 2)])))
    assert not engine.weights_loaded  # the tied parameter is still missing under both names
    run(engine.update_named_weights(update(sent[1:], [shapes[n] for n in sent[1:]])))
    assert engine.weights_loaded
    assert run(engine.generate([[1]], {"max_generate_length": 1})).response_ids == [[2]]


def test_level_one_sleep_keeps_weights(engine):
    run(engine.sleep(level=1))
    run(engine.wake_up())
    assert run(engine.generate([[1]], {"max_generate_length": 1})).response_ids == [[2]]


def test_memory_already_asleep_is_not_released_again(engine):
    run(engine.sleep(tags=["kv_cache"], level=1))
    run(engine.sleep(level=1))  # only the weights are still awake
    run(engine.sleep(level=2))  # nothing is awake: a no-op, the weights were kept at level 1
    sleeps = [args for call, args in engine.impl.calls if call == "sleep"]
    assert sleeps == [(["kv_cache"], 1), (["weights"], 1)]
    run(engine.wake_up())
    assert run(engine.generate([[1]], {"max_generate_length": 1})).response_ids == [[2]]


def test_undeclared_sleep_level_and_unknown_tag_are_rejected(engine):
    with pytest.raises(UnsupportedCapabilityError, match="sleep level 3"):
        run(engine.sleep(level=3))
    with pytest.raises(SamplingParamsError, match="tags"):
        run(engine.sleep(tags=["gpu"]))


def test_weights_cannot_be_updated_while_asleep(engine):
    run(engine.sleep(tags=["weights"], level=1))
    with pytest.raises(EngineAsleepError):
        run(engine.update_named_weights(update(["w"], [(2, 2)])))


def test_bad_weight_update_names_every_offender_and_applies_nothing(engine):
    with pytest.raises(WeightUpdateError) as info:
        run(engine.update_named_weights(update(["w", "bb", "b"], [(2, 3), (2,), (2,)], ["float32", "float32", "bfloat16"])))
    problems = info.value.problems
    assert problems["w"].startswith("shape (2, 3) does not match")
    assert "did you mean 'b'" in problems["bb"]
    assert "dtype bfloat16" in problems["b"]
    assert ("update", ["w", "bb", "b"]) not in engine.impl.calls
    assert engine.weight_version == 0


def test_weight_version_is_bumped_and_stamped(engine):
    assert run(engine.update_named_weights(update(["w"], [(2, 2)]))) == 1
    out = run(engine.generate([[1]], {"max_generate_length": 1}))
    assert out[0].weight_version == 1


def _broadcast_update(layout: str = "packed", apply: str = "atomic") -> WeightUpdateRequest:
    payload = {"group_name": "g", "layout": layout, "apply": apply, "buckets": []}
    return WeightUpdateRequest(["w", "b"], ["float32", "float32"], [(2, 2), (2,)], "broadcast", payload)


def test_streamed_update_failing_partway_refuses_generation_until_every_weight_is_back(tmp_path):
    caps = Capabilities(weight_sync_strategies=("tensors", "broadcast"))
    sb.register_backend(DoublePlugin("streaming", caps), "streaming")
    try:
        engine = sb.create_engine("streaming", model=str(tmp_path))
        # An atomic update that fails changed nothing: generation goes on.
        engine.impl.update_failure = RuntimeError("trainer vanished")
        with pytest.raises(RuntimeError):
            run(engine.update_named_weights(_broadcast_update(apply="atomic")))
        assert engine.weights_loaded and run(engine.generate([[1]], {"max_generate_length": 1}))
        # A streamed one may have applied some buckets: the mix is never served.
        engine.impl.update_failure = RuntimeError("trainer vanished")
        with pytest.raises(RuntimeError):
            run(engine.update_named_weights(_broadcast_update(apply="streamed")))
        assert not engine.weights_loaded and engine.weight_version == 0
        with pytest.raises(WeightsNotLoadedError) as info:
            run(engine.generate([[1]], {"max_generate_length": 1}))
        assert "streamed weight update failed partway" in str(info.value)
        assert "trainer vanished" in str(info.value) and "update_named_weights" in str(info.value)
        # Back once every parameter has arrived again, over one update or several.
        run(engine.update_named_weights(update(["w"], [(2, 2)])))
        assert not engine.weights_loaded
        run(engine.update_named_weights(update(["b"], [(2,)])))
        assert engine.weights_loaded and engine.weight_version == 2
        assert run(engine.generate([[1]], {"max_generate_length": 1}))[0].weight_version == 2
    finally:
        sb.unregister_backend("streaming")


def test_broadcast_layout_the_engine_cannot_receive_is_refused_before_any_byte(tmp_path):
    caps = Capabilities(weight_sync_strategies=("broadcast",), broadcast_layouts=("per_tensor",))
    sb.register_backend(DoublePlugin("native", caps), "native")
    try:
        engine = sb.create_engine("native", model=str(tmp_path))
        with pytest.raises(WeightUpdateError) as info:
            run(engine.validate_weight_update(_broadcast_update(layout="packed")))
        assert "['per_tensor']" in info.value.problems["payload.layout"]
        run(engine.validate_weight_update(_broadcast_update(layout="per_tensor")))
        with pytest.raises(WeightUpdateError) as info:
            run(engine.update_named_weights(_broadcast_update(layout="packed", apply="streamed")))
        assert "payload.layout" in info.value.problems
        assert not any(call[0] == "update" for call in engine.impl.calls)
    finally:
        sb.unregister_backend("native")


def test_check_finite_is_refused_where_broadcasts_are_received_natively(tmp_path):
    """An engine that receives broadcasts with its own code (SGLang's, which loads each tensor as it
    arrives) cannot check values before applying them: asking it to is refused before any byte."""
    caps = Capabilities(weight_sync_strategies=("broadcast",), broadcast_layouts=("per_tensor",))
    sb.register_backend(DoublePlugin("native", caps), "native")
    try:
        engine = sb.create_engine("native", model=str(tmp_path))
        checked = _broadcast_update(layout="per_tensor")
        checked.check_finite = True
        with pytest.raises(WeightUpdateError) as info:
            run(engine.update_named_weights(checked))
        assert "cannot check their values" in info.value.problems["check_finite"]
        assert not any(call[0] == "update" for call in engine.impl.calls)
        run(engine.update_named_weights(_broadcast_update(layout="per_tensor")))  # unchecked: accepted
    finally:
        sb.unregister_backend("native")


def test_in_process_tensors_are_checked_against_their_declaration(engine):
    """The facade's own rule (real engines: tests/weight_sync/test_delivered.py)."""
    import torch

    request = update(["w", "b"], [(2, 2), (2,)])
    request.payload = [torch.zeros(2, 2), torch.zeros(())]
    with pytest.raises(WeightUpdateError) as info:
        run(engine.update_named_weights(request))
    assert info.value.problems == {"b": "payload says float32[] but the request declares float32[2]"}
    request.payload = [torch.zeros(2, 2)]
    with pytest.raises(WeightUpdateError) as info:
        run(engine.validate_weight_update(request))
    assert info.value.problems == {"b": "is declared in the request but missing from the payload"}
    assert not any(call[0] == "update" for call in engine.impl.calls) and engine.weight_version == 0


def test_lora_bookkeeping(engine, tmp_path):
    with pytest.raises(LoraAdapterError, match="No LoRA adapter named 'x'"):
        run(engine.generate([[1]], {"max_generate_length": 1}, lora_name="x"))
    with pytest.raises(LoraAdapterError, match="not a directory"):
        run(engine.load_lora_adapter("x", tmp_path / "missing"))
    run(engine.load_lora_adapter("x", tmp_path))
    with pytest.raises(LoraAdapterError, match="already loaded"):
        run(engine.load_lora_adapter("x", tmp_path))
    run(engine.generate([[1]], {"max_generate_length": 1}, lora_name="x"))
    run(engine.unload_lora_adapter("x"))
    with pytest.raises(LoraAdapterError, match="Loaded: none"):
        run(engine.unload_lora_adapter("x"))


def test_lora_changes_are_refused_while_weights_sleep(engine, tmp_path):
    run(engine.sleep(tags=["weights"], level=1))
    with pytest.raises(EngineAsleepError, match="weights"):
        run(engine.load_lora_adapter("x", tmp_path))
    run(engine.wake_up())
    run(engine.load_lora_adapter("x", tmp_path))
    run(engine.sleep(level=1))
    with pytest.raises(EngineAsleepError):
        run(engine.unload_lora_adapter("x"))
    assert engine.lora_adapters == {"x": str(tmp_path)}


def test_parameters_needing_absent_capabilities_are_rejected_not_dropped(engine):
    for params, field in [({"stop": ["x"]}, "stop"), ({"min_new_tokens": 1}, "min_new_tokens"),
                          ({"seed": 1}, "seed"), ({"min_p": 0.1}, "min_p")]:
        with pytest.raises(SamplingParamsError) as info:
            run(engine.generate([[1]], params))
        assert info.value.field == field
    with pytest.raises(SamplingParamsError, match="at most 5"):
        run(engine.generate([[1]], {"logprobs": 6}))


def test_absent_capability_calls_are_rejected_with_its_name(tmp_path):
    sb.register_backend(DoublePlugin("bare", Capabilities()), "bare")
    try:
        engine = sb.create_engine("bare", model=str(tmp_path))
        with pytest.raises(UnsupportedCapabilityError, match="'sleep'"):
            run(engine.sleep())
        with pytest.raises(UnsupportedCapabilityError, match="'abort'"):
            run(engine.abort())
        with pytest.raises(UnsupportedCapabilityError, match="'native_pause'"):
            run(engine.pause_generation())
        with pytest.raises(UnsupportedCapabilityError, match="'prefix_caching'"):
            run(engine.reset_prefix_cache())
        with pytest.raises(SamplingParamsError, match="logprobs=0"):
            run(engine.generate([[1]], {"logprobs": 1}))
    finally:
        sb.unregister_backend("bare")


@pytest.mark.parametrize("sleep_clears", [False, True])
def test_sleep_resets_the_prefix_cache_first_unless_the_backend_s_sleep_clears_it(tmp_path, sleep_clears):
    import dataclasses

    caps = dataclasses.replace(DOUBLE_CAPABILITIES, prefix_caching=True, sleep_clears_prefix_cache=sleep_clears)
    sb.register_backend(PrefixCachingDoublePlugin("cached", caps), "cached")
    try:
        engine = sb.create_engine("cached", model=str(tmp_path))
        run(engine.sleep(level=1))
        calls = [name for name, _ in engine.impl.calls]
        assert calls == (["sleep"] if sleep_clears else ["reset_prefix_cache", "sleep"])
        run(engine.teardown())
    finally:
        sb.unregister_backend("cached")


def test_declared_capability_without_its_hooks_fails_validation(tmp_path):
    caps = Capabilities(native_pause=True, prefix_caching=True)
    sb.register_backend(DoublePlugin("liar", caps), "liar")
    try:
        with pytest.raises(sb.BackendLoadError) as info:
            sb.create_engine("liar", model=str(tmp_path))
        assert "skyrl_backends_pause_generation" in str(info.value)
        assert "skyrl_backends_reset_prefix_cache" in str(info.value)
    finally:
        sb.unregister_backend("liar")


def test_torn_down_engine_refuses_everything(engine):
    run(engine.teardown())
    run(engine.teardown())  # idempotent
    assert [c for c in engine.impl.calls if c[0] == "teardown"] == [("teardown", None)]
    with pytest.raises(EngineClosedError):
        run(engine.generate([[1]], {"max_generate_length": 1}))


def test_sleep_aborts_and_drains_in_flight_requests(tmp_path):
    from doubles import ArithmeticEngineDouble

    class SlowDouble(ArithmeticEngineDouble):
        """Holds generation until aborted, like a real engine mid-decode."""

        def __init__(self, config):
            super().__init__(config)
            self.release = asyncio.Event()

        async def skyrl_backends_generate(self, request):
            await self.release.wait()
            return await super().skyrl_backends_generate(request)

        async def skyrl_backends_abort(self, request_ids):
            self.calls.append(("abort", request_ids))
            self.release.set()

    for name in ("skyrl_backends_generate", "skyrl_backends_abort"):
        setattr(SlowDouble, name, sb.hookimpl(getattr(SlowDouble, name)))

    class SlowPlugin(DoublePlugin):
        @sb.hookimpl
        def skyrl_backends_create_engine(self, config):
            return SlowDouble(config)

    sb.register_backend(SlowPlugin("slow"), "slow")
    try:
        engine = sb.create_engine("slow", model=str(tmp_path))
    finally:
        sb.unregister_backend("slow")

    async def scenario():
        task = asyncio.create_task(engine.generate([[1]], {"max_generate_length": 1}))
        await asyncio.sleep(0.01)
        assert engine.num_inflight == 1
        await engine.sleep(level=1)
        await task
        return engine.impl.calls

    calls = run(scenario())
    names = [c[0] for c in calls]
    assert names.index("abort") < names.index("sleep")
    assert engine.num_inflight == 0


def test_capabilities_of_the_double_are_listed_by_name():
    assert "sleep(levels 1,2)" in DOUBLE_CAPABILITIES.names()
    assert "weight_sync(tensors)" in DOUBLE_CAPABILITIES.names()


def test_misspelled_engine_hook_is_refused_before_the_engine_starts(tmp_path):
    """With BackendInfo.engine_class the engine's hooks are checked on the class: no engine starts."""
    from doubles import ArithmeticEngineDouble

    class Misspelled(ArithmeticEngineDouble):
        started = 0

        def __init__(self, config):
            type(self).started += 1
            super().__init__(config)

        @sb.hookimpl
        def skyrl_backends_genrate(self, request):  # the misspelling under test
            raise AssertionError("never called")

    module = type(sys)("misspelled_engine_module")
    module.Misspelled = Misspelled
    sys.modules[module.__name__] = module

    class NamedClassPlugin(DoublePlugin):
        @sb.hookimpl
        def skyrl_backends_backend_info(self):
            return sb.BackendInfo(name="named", engine="pluggy", engine_class="misspelled_engine_module:Misspelled")

        @sb.hookimpl
        def skyrl_backends_create_engine(self, config):
            return Misspelled(config)

    sb.register_backend(NamedClassPlugin("named"), "named")
    try:
        with pytest.raises(sb.BackendLoadError) as info:
            sb.create_engine("named", model=str(tmp_path))
        assert "skyrl_backends_genrate" in str(info.value) and "'named'" in str(info.value)
        assert Misspelled.started == 0
    finally:
        sb.unregister_backend("named")
        del sys.modules[module.__name__]


def test_engine_failing_validation_after_start_is_torn_down(tmp_path):
    """Without engine_class the object is checked once created; a rejected engine leaks nothing."""
    from doubles import ArithmeticEngineDouble

    torn_down = []

    class Lacking(ArithmeticEngineDouble):
        @sb.hookimpl
        async def skyrl_backends_teardown(self):
            torn_down.append(True)

    Lacking.skyrl_backends_generate = None  # every engine must generate: this one cannot

    class LackingPlugin(DoublePlugin):
        @sb.hookimpl
        def skyrl_backends_create_engine(self, config):
            return Lacking(config)

    sb.register_backend(LackingPlugin("lacking"), "lacking")
    try:
        with pytest.raises(sb.BackendLoadError, match="skyrl_backends_generate"):
            sb.create_engine("lacking", model=str(tmp_path))
        assert torn_down == [True]
    finally:
        sb.unregister_backend("lacking")


def test_generate_hooks_receive_the_translation_made_once(tmp_path):
    """The facade translates each engine call's parameters once and hands them over as engine_params."""
    from doubles import ArithmeticEngineDouble

    translations, received = [], []

    class Recording(ArithmeticEngineDouble):
        @sb.hookimpl
        async def skyrl_backends_generate(self, request, engine_params):
            received.append(engine_params)
            return await ArithmeticEngineDouble.skyrl_backends_generate(self, request)

    class TranslatingPlugin(DoublePlugin):
        @sb.hookimpl
        def skyrl_backends_translate_sampling_params(self, params, config):
            translations.append(params)
            return {"engine_seed": params.seed}

        @sb.hookimpl
        def skyrl_backends_create_engine(self, config):
            return Recording(config)

    import dataclasses

    seeded = dataclasses.replace(DOUBLE_CAPABILITIES, seeded_sampling=True)
    sb.register_backend(TranslatingPlugin("translating", seeded), "translating")
    try:
        engine = sb.create_engine("translating", model=str(tmp_path))
        run(engine.generate([[1], [2]], {"max_generate_length": 1, "seed": 7, "n": 2}))
    finally:
        sb.unregister_backend("translating")
    # n=2 with a seed is two engine calls (seed + j): one translation each, each handed to its call.
    assert [t.seed for t in translations] == [7, 8]
    assert received == [{"engine_seed": 7}, {"engine_seed": 8}]
