"""The suffix learner's SuffixDecoding scoring (engine/suffix.py, scoring="probability") on
synthetic streams, and its stream index bounded by outputs and by tokens: what eviction removes,
that memory stays bounded, and checkpoints within the bounds. No model runs."""

from __future__ import annotations

import copy
import gc
import random
import tracemalloc

import pytest

from onspec.engine.engine import PROPOSERS, EngineConfig
from onspec.engine.suffix import SuffixIndex, SuffixLearner

P = [1, 2, 3, 4, 5, 6, 7, 8]
"""A context of max_depth tokens that no other test token repeats."""


def _probable(**kw) -> SuffixLearner:
    kw.setdefault("prompt_context", 0)
    return SuffixLearner(scoring="probability", **kw)


def _rebuilt(learner: SuffixLearner) -> SuffixIndex:
    """The stream's index built afresh from what the learner keeps."""
    index = SuffixIndex(learner.max_depth)
    for seq, start in learner.history:
        index.add(list(seq), start=start)
    return index


# -- scoring -----------------------------------------------------------------------------------

def test_a_repeated_stream_gives_long_certain_continuations():
    out = list(range(100, 140))
    learner = _probable()
    for _ in range(3):
        learner.learn([], out)
    # 8 matched tokens: a budget of min(16, 2 * 8); every count ratio is 1
    tokens, depths = learner.continuation(out[:8], None, 16)
    assert tokens == out[8:24] and depths == [8] * 16
    assert learner._path(learner.index, out[:8], 16)[0] == pytest.approx(16.0)  # score: 16 tokens of probability 1
    tokens, _ = learner.continuation(out[:30], None, 16)
    assert tokens == out[30:]  # the stream's end stops it


def _branching() -> SuffixLearner:
    """After P: 20 three times in four (30 once); then 21; then 22 twice in three (23 once); then 24;
    then 25 or 26, once each. The path's probability: 0.75, 0.75, 0.5, 0.5, 0.25, ..."""
    learner = _probable(min_prob=0.4)
    for tail in ([20, 21, 22, 24, 25, 27], [20, 21, 22, 24, 26, 28], [20, 21, 23, 29], [30, 31]):
        learner.learn([], P + tail)
    return learner


def test_a_branching_stream_stops_where_the_path_probability_falls_below_the_minimum():
    learner = _branching()
    assert learner.continuation(P, None, 16)[0] == [20, 21, 22, 24]  # 0.25 < 0.4 stops before 25
    learner.min_prob = 0.6
    assert learner.continuation(P, None, 16)[0] == [20, 21]  # 0.5 < 0.6 stops before 22
    learner.min_prob = 0.1
    assert learner.continuation(P, None, 16)[0] == [20, 21, 22, 24, 25, 27]  # 25: the first seen of two
    learner.min_prob = 0.8
    assert learner.continuation(P, None, 16) == ([], [])  # 0.75 < 0.8: no proposal
    score = learner._path(learner.index, P, 16)
    assert score == (0.0, [], [])
    # the frequency scoring has no minimum: it goes on to the end of what it has seen
    frequent = SuffixLearner(prompt_context=0)
    frequent.index, frequent.history = learner.index, learner.history
    assert frequent.continuation(P, None, 16)[0] == [20, 21, 22, 24, 25, 27]


def test_the_length_budget_follows_the_match_length():
    out = list(range(200, 240))
    learner = _probable(spec_factor=1.0)
    learner.learn([], out)
    for n in range(1, 9):  # the context's last n tokens match (the token before them does not)
        context = [999] + out[10 - n: 10]
        assert learner.continuation(context, None, 16)[0] == out[10: 10 + n]
    learner.spec_factor = 2.0
    assert learner.continuation([999] + out[7:10], None, 16)[0] == out[10:16]  # 2 * 3 tokens
    assert learner.continuation(out[:10], None, 16)[0] == out[10:26]  # 2 * 8, the cap
    assert learner.continuation(out[:10], None, 5)[0] == out[10:15]  # the row's own budget
    learner.spec_factor, learner.spec_offset = 0.0, 3.0
    assert learner.continuation([999] + out[9:10], None, 16)[0] == out[10:13]  # the offset alone


def test_the_request_and_the_stream_compete_on_score():
    context = [50, 51, 52]
    local = lambda learner: learner.local_index(context + [70, 71])  # noqa: E731 (70, 71: probability 1, score 2)

    certain = _probable()  # the stream: 60 .. 63 twice (score 4) beats the request's 70, 71
    for _ in range(2):
        certain.learn([], context + [60, 61, 62, 63])
    assert certain.continuation(context, local(certain), 16)[0] == [60, 61, 62, 63]

    split = _probable()  # the stream: 60 or 61 after the context (score 0.5): the request's wins
    split.learn([], context + [60])
    split.learn([], context + [61])
    assert split.continuation(context, local(split), 16)[0] == [70, 71]

    tie = _probable()  # equal scores: the request's own
    tie.learn([], context + [60, 61])
    assert tie.continuation(context, local(tie), 16)[0] == [70, 71]

    # where merged counts would follow the stream's majority, the competition follows the surer path
    voted = [_probable(), SuffixLearner(prompt_context=0)]
    for learner in voted:
        for tail in ([60, 61], [60, 61], [62, 63], [62, 63]):
            learner.learn([], context + tail)
    assert voted[0].continuation(context, local(voted[0]), 16)[0] == [70, 71]  # 2 beats 0.5 + 0.5
    assert voted[1].continuation(context, local(voted[1]), 16)[0] == [60, 61]  # merged: 60 seen twice


def test_the_engine_builds_the_scoring_asked_for():
    assert PROPOSERS["suffix"](EngineConfig()).scoring == "frequency"
    learner = PROPOSERS["suffix"](EngineConfig(suffix_scoring="probability", suffix_history_tokens=1000))
    assert (learner.scoring, learner.min_match, learner.history_tokens) == ("probability", 1, 1000)
    with pytest.raises(ValueError, match="suffix-scoring"):
        EngineConfig(suffix_scoring="best")
    with pytest.raises(ValueError, match="scoring"):
        SuffixLearner(scoring="best")


# -- the bounded stream index ------------------------------------------------------------------

def test_a_row_returns_to_one_packed_int_when_one_token_is_left():
    index = SuffixIndex(max_depth=2)
    index.add([1, 2, 3])
    before = copy.deepcopy(index.counts)
    assert all(type(v) is int for v in before.values())
    index.add([1, 2, 4])  # (1, 2) and (2,) now have two next tokens: dict rows
    assert index.row((1, 2)) == {3: 1, 4: 1} and type(index.counts[SuffixIndex.key((1, 2))]) is dict
    index.add([1, 2, 4], sign=-1)
    assert index.counts == before


def test_eviction_by_tokens_removes_exactly_the_oldest_outputs():
    rng = random.Random(0)
    learner = SuffixLearner(max_depth=4, history=1000, history_tokens=60, prompt_context=2)
    learned = []
    for _ in range(40):
        prompt = [rng.randrange(30) for _ in range(5)]
        out = [rng.randrange(30) for _ in range(rng.randint(1, 25))]
        learner.learn(prompt, out)
        learned.append(prompt[-2:] + out)
        assert learner.tokens == sum(len(s) for s, _ in learner.history) <= 60
        assert learner.index.counts == _rebuilt(learner).counts
    # what is kept is the newest outputs, whole, and nothing older
    kept = [list(s) for s, _ in learner.history]
    assert kept == learned[-len(kept):]
    assert sum(map(len, learned[-len(kept) - 1:])) > 60
    # an output longer than the whole bound joins cut to its last tokens, alone
    long = list(range(100, 200))
    learner.learn([1, 2], long)
    assert [list(s) for s, _ in learner.history] == [long[-60:]]
    assert learner.index.counts == _rebuilt(learner).counts
    # evicting everything leaves an empty index
    learner.learn([], [7, 8])
    learner.history_tokens = 1
    learner.learn([], [9])
    assert len(learner.index) == 0 and learner.tokens == 1


def test_memory_and_contexts_stay_bounded_on_a_long_stream():
    """1,000 outputs of 20 random tokens (every context new) through a bound of 2,000 tokens: the
    contexts never exceed max_depth per kept token, and the memory after 1,000 outputs is that after
    the first 200 (the bound was reached at 100), within 25%."""
    rng = random.Random(1)
    learner = SuffixLearner(max_depth=8, history=100_000, history_tokens=2_000, prompt_context=0)
    gc.collect()
    tracemalloc.start()
    try:
        for i in range(1_000):
            learner.learn([], [rng.randrange(50_000) for _ in range(20)])
            assert len(learner.index) <= 8 * learner.tokens and learner.tokens <= 2_000
            if i == 199:
                gc.collect()
                full = tracemalloc.get_traced_memory()[0]
        gc.collect()
        last = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(learner.history) == 100 and learner.version == 1_000
    assert last < 1.25 * full


def test_a_checkpoint_resumes_within_the_bounds():
    rng = random.Random(2)
    learner = SuffixLearner(max_depth=4, history_tokens=200)
    for _ in range(30):
        learner.learn([rng.randrange(20) for _ in range(6)], [rng.randrange(20) for _ in range(rng.randint(5, 30))])
    state = learner.state_dict()
    same = SuffixLearner(max_depth=4, history_tokens=200)
    same.load_state_dict(state)
    assert same.index.counts == learner.index.counts and same.tokens == learner.tokens
    assert [list(s) for s, _ in same.history] == [list(s) for s, _ in learner.history]
    smaller = SuffixLearner(max_depth=4, history_tokens=100)
    smaller.load_state_dict(state)  # the oldest leave, as if it had learned them itself
    assert smaller.tokens <= 100 and smaller.version == learner.version
    kept = [list(s) for s, _ in smaller.history]
    assert kept == [list(s) for s, _ in learner.history][-len(kept):]
    assert smaller.index.counts == _rebuilt(smaller).counts
