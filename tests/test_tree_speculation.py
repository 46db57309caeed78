"""Tree speculation (`Draft.parents`): several candidate continuations verified in one target pass
under a tree attention mask. The walk (verify.py) on its own, exactly and statistically; the tree
pass's logits and the cache it leaves, on the ragged and the padded cache; the suffix learner's
trees; and losslessness through the engine: greedy equality in float32 on tiny models, the sampled
distribution, and seeded rows equal to target-only sampling.

Statistical tests use fixed seeds (deterministic); a chi-square assertion fails with probability
~1e-4 for a correct sampler (test_verify_sampling's `assert_matches`).
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from conftest import cached_draft, cached_model, full_logits, reference_greedy
from test_verify_sampling import assert_matches

from onspec.engine.build import make_engine
from onspec.engine.controller import Controller
from onspec.engine.engine import EngineConfig, Request, SpeculativeEngine
from onspec.engine.kv import RaggedKVCache, tree_mask
from onspec.engine.proposer import Draft
from onspec.engine.runner import ModelRunner
from onspec.engine.sampling import SamplingParams, process_logits
from onspec.engine.suffix import SuffixLearner
from onspec.engine.verify import greedy_verify, tree_sample, tree_verify
from onspec.models.decode import decode_forward

ATOL = 1e-5
TEXTS = ("hello world", "a", "the quick brown fox jumps", "def f(x):\n    return")


# -- the walk ----------------------------------------------------------------------------------

def _logits(argmax: list[int], vocab: int = 10) -> torch.Tensor:
    logits = torch.zeros(len(argmax), vocab)
    logits[torch.arange(len(argmax)), torch.tensor(argmax)] = 5.0
    return logits


def test_the_walk_descends_to_the_child_the_target_chose():
    #        root
    #       /    \
    #   0:(4)    1:(5)
    #    |       /   \
    #  2:(6)  3:(7)  4:(8)
    tokens, parents = torch.tensor([4, 5, 6, 7, 8]), [-1, -1, 0, 1, 1]
    # the target: 5 at the root (node 1, column 2), 8 there (node 4, column 5), then 9 (a leaf: the bonus)
    v = tree_verify(tokens, parents, _logits([5, 0, 8, 0, 0, 9]))
    assert (v.num_accepted, v.tokens, v.path, v.proposed) == (2, [5, 8, 9], (1, 4), 5)
    v = tree_verify(tokens, parents, _logits([5, 1, 7, 1, 1, 8]))  # 7 after 5: node 3, then 8 after it
    assert (v.tokens, v.path) == ([5, 7, 1], (1, 3))
    v = tree_verify(tokens, parents, _logits([4, 3, 3, 3, 3, 3]))  # 4, then 3 where node 0 has child 6 only
    assert (v.num_accepted, v.tokens, v.path, v.evaluated) == (1, [4, 3], (0,), 2)
    v = tree_verify(tokens, parents, _logits([1, 0, 0, 0, 0, 0]))  # nothing at the root
    assert (v.num_accepted, v.tokens, v.path) == (0, [1], ())


def test_a_tree_that_is_a_chain_gives_greedy_verifys_verdict():
    gen = torch.Generator().manual_seed(0)
    for k in range(7):
        for _ in range(30):
            logits = torch.randn(k + 1, 5, generator=gen)
            argmax = logits.argmax(-1)
            draft = torch.randint(5, (k,), generator=gen)
            keep = int(torch.randint(k + 1, (1,), generator=gen))
            draft[:keep] = argmax[:keep]  # agree for a while
            chain, tree = greedy_verify(draft, logits), tree_verify(draft, list(range(-1, k - 1)), logits)
            assert (tree.num_accepted, tree.tokens, tree.proposed) == (chain.num_accepted, chain.tokens, chain.proposed)
            assert tree.path == tuple(range(chain.num_accepted)) and tree.evaluated == chain.evaluated


def test_the_sampled_walk_emits_the_target_distribution():
    """The first token is a draw from p at the root, the second (where the first is a node) from p
    at that node: 20,000 walks of a fixed tree, chi-square over the (first, second) cells."""
    vocab = 6
    gen = torch.Generator().manual_seed(1)
    p = torch.rand(5, vocab, generator=gen, dtype=torch.float64) + 0.05
    p[0, 2] = 0.0  # a token the target never emits at the root
    p = (p / p.sum(-1, keepdim=True)).float()
    tokens, parents = torch.tensor([1, 3, 0, 5]), [-1, -1, 0, 1]  # the root's children 1 and 3
    column = {1: 1, 3: 2}  # the column of the node each root child is
    expected = torch.zeros(vocab, vocab + 1, dtype=torch.float64)  # [first, second or 'none' (last)]
    for x1 in range(vocab):
        if x1 in column:
            expected[x1, :vocab] = p[0, x1].double() * p[column[x1]].double()
        else:
            expected[x1, vocab] = p[0, x1]
    counts = torch.zeros_like(expected)
    for _ in range(20_000):
        v = tree_sample(tokens, parents, p, gen)
        x1 = v.tokens[0]
        counts[x1, v.tokens[1] if len(v.tokens) > 1 else vocab] += 1
        assert len(v.tokens) == v.num_accepted + 1
    assert_matches(counts, expected, "first two tokens of a sampled tree walk")


# -- the tree pass and its cache ---------------------------------------------------------------

PROMPTS = [[10, 20, 30, 40, 50, 60, 70], [5, 9], [200, 7, 33, 91]]
# per row: its proposals and their parents (row 1 a chain: None)
TREES = [([11, 12, 13, 14, 15], [-1, -1, 0, 1, 1]),
         ([21, 22, 23, 24, 25], None),
         ([31, 32, 33, 34, 35], [-1, 0, 0, 2, -1])]


def _runner(arch: str, way: str, rows: list[list[int]]) -> tuple[ModelRunner, object]:
    model = cached_model(arch)
    runner = ModelRunner(model, len(rows), decode_forward(model) if way == "ragged" else None)
    runner.prefill(rows)
    return runner, model


def _paths(parents: list[int] | None, k: int) -> list[list[int]]:
    """Each node's path from the root (a chain's: its prefix)."""
    parents = parents if parents is not None else list(range(-1, k - 1))
    paths: list[list[int]] = []
    for j, parent in enumerate(parents):
        paths.append((paths[parent] if parent >= 0 else []) + [j])
    return paths


WAYS = [("llama", "ragged"), ("qwen2", "ragged"), ("llama", "slots"), ("gpt2", "slots")]


@pytest.mark.parametrize("arch,way", WAYS)
def test_a_tree_pass_gives_each_node_its_paths_logits(arch, way):
    """Each node's logits in a tree pass equal a plain forward over the prompt and the node's path:
    rows of different lengths, a chain row beside two tree rows."""
    runner, model = _runner(arch, way, PROMPTS)
    proposals = torch.tensor([t for t, _ in TREES])
    logits = runner.feed(proposals, [parents for _, parents in TREES])  # [3, 6, vocab]
    for b, (prompt, (tokens, parents)) in enumerate(zip(PROMPTS, TREES)):
        torch.testing.assert_close(logits[b, 0], full_logits(model, prompt)[-1], atol=ATOL, rtol=0)
        for j, path in enumerate(_paths(parents, len(tokens))):
            want = full_logits(model, prompt + [tokens[i] for i in path])[-1]
            torch.testing.assert_close(logits[b, j + 1], want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch,way", WAYS)
def test_after_a_tree_step_the_cache_holds_the_accepted_path_as_a_chain(arch, way):
    """accept() keeps each row's accepted nodes: the cache then equals one fed those tokens as a
    chain (the ragged cache's keys and values, compared directly), and the next pass's logits
    equal a plain forward over the kept tokens."""
    runner, model = _runner(arch, way, PROMPTS)
    runner.feed(torch.tensor([t for t, _ in TREES]), [parents for _, parents in TREES])
    paths = [(1, 4), None, (0, 2, 3)]
    accepted = [[12, 15], [21, 22], [31, 33, 34]]
    emitted = [a + [100 + b] for b, a in enumerate(accepted)]
    runner.accept([len(a) for a in accepted], emitted, paths)
    chain, _ = _runner(arch, way, PROMPTS)
    chain.feed(torch.tensor([a + [0] * (3 - len(a)) for a in accepted]))
    chain.accept([len(a) for a in accepted], emitted)
    assert runner.kv.lengths.tolist() == chain.kv.lengths.tolist()
    if way == "ragged":
        for b in range(len(PROMPTS)):
            n = runner.kv.lens[b]
            torch.testing.assert_close(runner.kv.rows[b][..., :n, :], chain.kv.rows[b][..., :n, :], atol=ATOL, rtol=0)
    out = runner.feed(torch.tensor([[7], [8], [9]]))
    for b, (prompt, a) in enumerate(zip(PROMPTS, emitted)):
        torch.testing.assert_close(out[b, -1], full_logits(model, prompt + a + [7 + b])[-1], atol=ATOL, rtol=0)


def test_only_a_tree_row_may_keep_other_than_a_prefix():
    cache = RaggedKVCache(1, "cpu", 2)
    model = cached_model("llama")
    ids = torch.tensor([[1, 2, 3]])
    cache.forward(decode_forward(model), ids, torch.ones_like(ids, dtype=torch.bool))
    with pytest.raises(ValueError):
        cache.rollback(torch.tensor([[True, False, True]]))


def test_tree_mask_positions_and_ancestors():
    offsets, ancestors = tree_mask([-1, -1, 0, 1, 1])
    assert offsets.tolist() == [0, 0, 1, 1, 1]
    assert ancestors[4].tolist() == [False, True, False, False, True]
    offsets, ancestors = tree_mask([-1, 0, 1])
    assert offsets.tolist() == [0, 1, 2] and torch.equal(ancestors, torch.ones(3, 3, dtype=torch.bool).tril())


# -- the suffix learner's trees ----------------------------------------------------------------

def _learner(scoring: str, width: int) -> SuffixLearner:
    learner = SuffixLearner(max_tokens=8, scoring=scoring, tree_width=width)
    for seq in ([1, 2, 3, 4, 5], [1, 2, 3, 7, 8], [1, 2, 3, 4, 9], [1, 2, 6, 6, 6]):
        learner.learn([], seq)
    return learner


@pytest.mark.parametrize("scoring", ["frequency", "probability"])
def test_the_learners_tree_extends_its_chain_with_the_likeliest_branches(scoring):
    chain_learner, tree_learner = _learner(scoring, 1), _learner(scoring, 3)
    context = [0, 1, 2]
    chain, _ = chain_learner.continuation(context, chain_learner.local_index(context), 8)
    tree = tree_learner.tree(context, tree_learner.local_index(context), 8)
    assert tree.parents is not None and len(tree) <= 8
    assert tree.chain().tokens.tolist() == chain  # the main line is the chain's proposal
    assert all(p < j for j, p in enumerate(tree.parents))  # a parent comes before its children
    leaves = set(range(len(tree))) - set(tree.parents)
    assert len(leaves) <= 3
    chances = [b - a for a, b in zip(tree.expected, tree.expected[1:])]
    assert chances == sorted(chances, reverse=True)  # so the first m nodes are the best m-node subtree
    cut = tree.cut(4)
    assert cut.parents == tree.parents[:4] and cut.expected == tree.expected[:5]
    # 6 after (1, 2) is a branch beside 3: both are children of the root
    roots = {int(tree.tokens[j]) for j, p in enumerate(tree.parents) if p == -1}
    assert roots == {3, 6}


def test_a_width_of_one_is_the_chain_and_nothing_branching_is_a_chain():
    learner = _learner("frequency", 1)
    draft = learner.propose([_Row([0, 1, 2], learner)], [8])[0]
    assert draft.parents is None
    learner = SuffixLearner(max_tokens=8, tree_width=4)
    learner.learn([], [1, 2, 3, 4, 5, 6])
    draft = learner.tree([1, 2], learner.local_index([1, 2]), 8)
    assert draft.parents is None and draft.tokens.tolist() == [3, 4, 5, 6]
    with pytest.raises(ValueError, match="tree-width"):
        EngineConfig(suffix_tree_width=0)


class _Row:
    """The little of a Sequence the learner's propose reads."""

    def __init__(self, context: list[int], learner: SuffixLearner) -> None:
        self.context = context
        self.state = {learner.kind: learner.local_index(context)}

    def tail(self, n: int) -> list[int]:
        return self.context[-n:]


# -- through the engine ------------------------------------------------------------------------

class _TakeEveryOffer(Controller):
    def choose(self, policy, k_draft, offers, switch=False):
        return offers[0] if offers else None


class RandomTrees:
    """A test proposer: random trees of up to `nodes` nodes over `tokens`; where it knows a row's
    greedy continuation (`truth`), one branch follows it for a random number of tokens at a random
    place among its siblings. Every fourth offer is a chain (parents None)."""

    kind = "trees"

    def __init__(self, tokens: list[int], truth: dict[tuple[int, ...], list[int]] | None = None,
                 nodes: int = 7, seed: int = 0) -> None:
        self.tokens, self.truth, self.nodes = tokens, truth or {}, nodes
        self.rng = random.Random(seed)
        self.offers = self.trees = 0

    def admit(self, row) -> None:
        pass

    def propose(self, rows, ks):
        return [self._draft(row, k) if k else None for row, k in zip(rows, ks)]

    def _draft(self, row, k: int) -> Draft:
        rng, n = self.rng, min(k, self.nodes)
        truth = self.truth.get(tuple(row.request.prompt_ids), [])[len(row.generated):]
        right = truth[: rng.randint(0, n)] if rng.random() < 0.6 else []
        tokens, parents = [], []
        for j in range(n):
            parent = rng.randint(-1, j - 1)
            tokens.append(rng.choice(self.tokens))
            parents.append(parent)
        # the right continuation as a chain hanging from the root, its nodes among the random ones
        line = -1
        for t in right:
            place = rng.randint(line + 1, len(tokens))
            tokens.insert(place, t)
            parents = [p + (p >= place) for p in parents]
            parents.insert(place, line)
            line = place
        tokens, parents = tokens[:n], parents[:n]
        self.offers += 1
        chain = self.offers % 4 == 0
        self.trees += not chain
        return Draft(torch.tensor(tokens if not chain else (right + tokens)[:n], dtype=torch.long), self,
                     match=[1] * n, expected=[float(m) for m in range(n + 1)], parents=None if chain else parents)

    def observe(self, step) -> None:
        pass

    def release(self, row) -> None:
        pass

    def stats(self) -> dict:
        return {}


def _engine(arch: str, tokenizer, proposer, forward: str = "auto") -> SpeculativeEngine:
    engine = make_engine(cached_model(arch), tokenizer, copy.deepcopy(cached_draft(arch, "noisy")),
                         EngineConfig(k=3, forward=forward, no_suffix=True))
    engine.proposers = [proposer]
    engine.controller = _TakeEveryOffer()
    return engine


@pytest.mark.parametrize("arch,forward", [("llama", "auto"), ("qwen2", "auto"), ("llama", "transformers"),
                                          ("gpt2", "auto")])
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_equality_with_random_trees(arch, forward, batch, tokenizer):
    """Random trees, some holding the target's continuation: the outputs equal plain greedy
    decoding, rows of different lengths; the StepRecords' target logits are those along the path."""
    n = 40
    ids = [tokenizer.encode(t) for t in (TEXTS if batch > 1 else TEXTS[2:3])]
    truth = {tuple(p): reference_greedy(arch, p, n) for p in ids}
    proposer = RandomTrees(sorted({t for out in truth.values() for t in out}), truth)
    engine = _engine(arch, tokenizer, proposer, forward)
    engine.record_logits = True
    records = []
    outs = engine.generate([Request(p, SamplingParams(max_new_tokens=n, ignore_eos=True)) for p in ids],
                           on_record=records.append)
    for p, o in zip(ids, outs):
        assert o.token_ids == truth[tuple(p)]
    assert proposer.trees > 0 and sum(o.stats.accepted for o in outs) > 0
    assert all(o.stats.steps < n for o in outs)  # trees were accepted, several tokens a pass
    model = cached_model(arch)
    by_id = {o.request_id: p + o.token_ids for p, o in zip(ids, outs)}
    for r in records[::7]:
        seq = by_id[r.request_id]
        for i in range(r.num_accepted + 1):
            want = full_logits(model, seq[: r.position] + r.emitted[:i])[-1]
            torch.testing.assert_close(r.target_logits[i], want, atol=ATOL, rtol=0)
        assert r.proposed[: r.num_accepted].tolist() == r.emitted[: r.num_accepted]


def test_the_suffix_learners_trees_are_lossless_in_the_engine(tokenizer):
    """make_engine with --suffix-tree-width 4, every offer taken: greedy equality over text that
    repeats itself, served twice (the second time from the stream's index)."""
    arch = "llama"
    engine = make_engine(cached_model(arch), tokenizer, copy.deepcopy(cached_draft(arch, "noisy")),
                         EngineConfig(k=3, suffix_tree_width=4, suffix_tokens=8))
    engine.controller = _TakeEveryOffer()
    ids = [tokenizer.encode(t) for t in ("abcabcabcabc", "abcabd abcabe abcab", "hello world")]
    n = 32
    for _ in range(2):
        outs = engine.generate([Request(p, SamplingParams(max_new_tokens=n, ignore_eos=True)) for p in ids])
        for p, o in zip(ids, outs):
            assert o.token_ids == reference_greedy(arch, p, n)
    assert engine.suffix.tree_width == 4 and engine.suffix.accepted > 0


def _support(arch: str, prompt: list[int], params: SamplingParams) -> list[int]:
    return process_logits(full_logits(cached_model(arch), prompt)[-1], params).nonzero().flatten().tolist()


def test_sampling_with_trees_emits_the_targets_distribution(tokenizer):
    """The joint distribution of the first two tokens with random trees over the target's top-8
    tokens (trees of two nodes: the first step's budget) equals p(x1) * p(x2 | x1): 3,000 unseeded
    requests in one batch, chi-square (a sampler off by 0.1 in total variation fails it)."""
    n, arch = 3000, "llama"
    prompt = tokenizer.encode("hello")
    params = SamplingParams(temperature=1.0, top_k=8, max_new_tokens=3, ignore_eos=True)
    support = _support(arch, prompt, params)
    proposer = RandomTrees(support, nodes=6)
    engine = _engine(arch, tokenizer, proposer)
    torch.manual_seed(0)
    outs = engine.generate([Request(prompt, params) for _ in range(n)])
    target = cached_model(arch)
    p1 = process_logits(full_logits(target, prompt)[-1], params)
    joint = torch.zeros(len(support), p1.shape[0], dtype=torch.float64)
    for i, x1 in enumerate(support):
        joint[i] = p1[x1].double() * process_logits(full_logits(target, prompt + [x1])[-1], params).double()
    counts = torch.zeros_like(joint)
    index = {x1: i for i, x1 in enumerate(support)}
    for o in outs:
        counts[index[o.token_ids[0]], o.token_ids[1]] += 1
    assert_matches(counts, joint, "joint of the first two tokens with tree speculation")
    accepted = sum(o.stats.accepted for o in outs)
    assert accepted > 0.1 * n and proposer.trees > 0.5 * n  # the trees were really in play


def test_seeded_rows_with_trees_equal_target_only_sampling(tokenizer):
    """A seeded row's output is a function of the seed and the target alone: tree speculation gives
    the tokens target-only decoding does, in a batch of rows of different lengths."""
    arch = "llama"
    ids = [tokenizer.encode(t) for t in TEXTS]
    params = [SamplingParams(temperature=0.8, top_p=0.95, seed=s, max_new_tokens=24, ignore_eos=True)
              for s in (11, 12, 13, 14)]
    plain = SpeculativeEngine(cached_model(arch), tokenizer, None, k=0)
    want = [o.token_ids for o in plain.generate([Request(p, sp) for p, sp in zip(ids, params)])]
    support = sorted({t for w in want for t in w})
    proposer = RandomTrees(support, {tuple(p): w for p, w in zip(ids, want)})
    engine = _engine(arch, tokenizer, proposer)
    outs = engine.generate([Request(p, sp) for p, sp in zip(ids, params)])
    assert [o.token_ids for o in outs] == want
    assert sum(o.stats.accepted for o in outs) > 0
