"""TokenVersions: which weight version produced each token, run-length encoded."""

import pytest
from skyrl_backends.types import Completion, StreamChunk, TokenVersions


def test_runs_from_per_token_and_back():
    versions = TokenVersions.from_per_token([3, 3, 3, 4, 4, 6])
    assert versions.runs == ((0, 3), (3, 4), (5, 6)) and versions.length == 6
    assert versions.per_token() == [3, 3, 3, 4, 4, 6]
    assert [versions.at(i) for i in range(6)] == [3, 3, 3, 4, 4, 6]
    assert (versions.oldest, versions.newest) == (3, 6)
    assert versions.to_json() == [[0, 3], [3, 4], [5, 6]]
    assert TokenVersions.from_json(versions.to_json(), 6) == versions


@pytest.mark.parametrize("runs, length, problem", [
    (((1, 0),), 3, "start at token 0"),
    (((0, 0), (0, 1)), 3, "increase"),
    (((0, 0), (2, 0)), 3, "same version"),
    (((0, 0), (3, 1)), 3, "starts at token 3 of 3"),
    ((), 2, "without a version"),
])
def test_malformed_runs_are_refused(runs, length, problem):
    with pytest.raises(ValueError, match=problem):
        TokenVersions(runs, length)


def test_an_empty_sequence_may_name_the_version_it_ran_under():
    empty = TokenVersions.uniform(0, 5)
    assert empty.runs == ((0, 5),) and empty.per_token() == [] and empty.newest == 5
    assert TokenVersions((), 0).newest is None


def test_concat_shifts_and_merges_neighbours():
    a, b = TokenVersions.from_per_token([0, 0, 1]), TokenVersions.from_per_token([1, 2])
    joined = a.concat(b)
    assert joined.per_token() == [0, 0, 1, 1, 2] and joined.runs == ((0, 0), (2, 1), (4, 2))
    assert TokenVersions.uniform(0, 4).concat(b) == b
    assert a.concat(TokenVersions.uniform(0, 9)) == a


@pytest.mark.parametrize("start, end", [(0, None), (1, 4), (2, 3), (3, None), (5, None), (0, 0), (4, 2)])
def test_slice_matches_slicing_per_token_versions(start, end):
    per_token = [0, 0, 1, 1, 2]
    versions = TokenVersions.from_per_token(per_token)
    assert versions.slice(start, end).per_token() == per_token[start:end]


def test_completion_conveniences_and_stream_final_chunk():
    completion = Completion(token_ids=[7, 8, 9, 10], finish_reason="length",
                            token_versions=TokenVersions.from_per_token([2, 2, 3, 3]))
    assert (completion.oldest_version, completion.newest_version, completion.weight_version) == (2, 3, 3)
    final = StreamChunk.final(0, completion, start=1)
    assert final.token_ids == [8, 9, 10] and final.token_versions.per_token() == [2, 3, 3]
    assert Completion(token_ids=[], finish_reason="abort").weight_version is None
