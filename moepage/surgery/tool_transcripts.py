"""Synthetic agent transcripts (the demo model's tool-call training domain), rendered with the model's own chat
template, with a mask of the tokens the assistant writes.

A transcript: a system prompt (prose from the corpus, optionally an agent's <env> block), 1-5 tool definitions
(the tool asked for among decoys, shuffled), a user request, the assistant's call in the template's format,
the tool's result, and a short closing answer; or, one transcript in four, a conversation without tools whose
answer is text (so a request that offers no tools is not answered with a call). Half the transcripts with tools
are in the shape OpenCode (opencode-ai 1.18.33, with clients/opencode-demo.json) sends: its system prompt (agent
line, model name, <env> block), its glob tool verbatim, the request as `opencode run` quotes it, the folder's
files as absolute paths for the result. Everything is drawn from a generator seeded per example: the same seed
gives the same transcripts.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass

# (requests, tool, arguments); "{name}" is filled from FILE_NAMES
REQUESTS = (
    (("List the files in this folder.", "What files are in this directory?", "Show me the files here.",
      "Which files does this project have?", "List the files."), "glob", {"pattern": "*"}),
    (("Find the Python files.", "Which Python files are there?", "List the .py files."), "glob",
     {"pattern": "**/*.py"}),
    (("Read the file {name}.", "Show me {name}.", "What is in {name}?", "Open {name}."), "read",
     {"filePath": "{name}"}),
    (("Run the tests.", "Run the test suite."), "bash", {"command": "pytest -q", "description": "Run the tests"}),
    (("Where is main defined?", "Search for the main function."), "grep", {"pattern": "def main"}),
)
FILE_NAMES = ("notes.txt", "README.md", "main.py", "setup.cfg", "todo.md", "app.py", "data.json", "Makefile")
TOOL_PARAMS = {
    "glob": {"pattern": "The glob pattern to match files against"},
    "read": {"filePath": "The path of the file to read"},
    "bash": {"command": "The command to execute", "description": "What the command does, in a few words"},
    "grep": {"pattern": "The regular expression to search for"},
    "write": {"filePath": "The path of the file to write", "content": "The text to write"},
    "edit": {"filePath": "The file to modify", "oldString": "The text to replace", "newString": "The new text"},
    "webfetch": {"url": "The URL to fetch"},
}
CLOSINGS = ("Done. The tool returned the result above.", "Here is what the tool returned.", "Done.")
AGENT_LINES = ("You are a coding agent. Use the tools to answer.", "You are a helpful assistant with tools.",
               "You help with software tasks.", "Answer the user, calling a tool when one is needed.")
MODEL_NAMES = ("moepage-demo", "demo", "local-model", "moepage")
# OpenCode's glob tool as opencode-ai 1.18.33 sends it (recorded from a real `opencode run` against moepage serve)
OPENCODE_GLOB = {"type": "function", "function": {
    "name": "glob",
    "description": "- Fast file pattern matching tool that works with any codebase size\n- Supports glob patterns like "
                   "\"**/*.js\" or \"src/**/*.ts\"\n- Returns matching file paths\n- Use this tool when you need to "
                   "find files by name patterns\n- When you are doing an open-ended search that may require multiple "
                   "rounds of globbing and grepping, use the Task tool instead\n- You have the capability to call "
                   "multiple tools in a single response. It is always better to speculatively perform multiple "
                   "searches as a batch that are potentially useful.\n",
    "parameters": {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "properties": {
        "pattern": {"type": "string", "description": "The glob pattern to match files against"},
        "path": {"type": "string", "description": "The directory to search in. If not specified, the current "
                 "working directory will be used. IMPORTANT: Omit this field to use the default directory. DO NOT "
                 "enter \"undefined\" or \"null\" - simply omit it for the default behavior. Must be a valid "
                 "directory path if provided."}},
        "required": ["pattern"]}}}
FOLDER_WORDS = ("project", "repo", "work", "src", "app", "demo", "test_opencode0", "pytest-3", "tmp8k2x", "code")
FILE_STEMS = ("alpha", "beta", "gamma", "notes", "main", "tool", "setup", "readme", "data", "config", "util", "todo")
FILE_EXTS = (".txt", ".py", ".md", ".json", ".cfg", ".sh", ".c", ".h")
PLAIN = (("Say hello.", "Hello! How can I help you today?"), ("Thanks!", "You are welcome."),
         ("Who are you?", "I am a small demo model served by moepage."))


@dataclass
class Transcript:
    ids: list[int]
    mask: list[bool]  # True where the token is the assistant's (the loss is taken there)


def tool_definition(name: str, description: str, rng: random.Random | None = None) -> dict:
    """An agent's tool schema; with rng, in the shapes agents send (a $schema key, an optional extra parameter)."""
    props = {p: {"type": "string", "description": d} for p, d in TOOL_PARAMS[name].items()}
    required = list(props)
    params = {"type": "object", "properties": props, "required": required}
    if rng is not None and rng.random() < 0.5:
        props["path"] = {"type": "string", "description": "The directory to search in. Omit it for the current one."}
    if rng is not None and rng.random() < 0.5:
        params = {"$schema": "https://json-schema.org/draft/2020-12/schema", **params}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": params}}


def _description(snippet, rng: random.Random) -> str:
    if rng.random() < 0.5:  # a bullet list, as agents write them
        return "".join(f"- {snippet(20, 120)}\n" for _ in range(rng.randint(2, 7)))
    return snippet(40, 500)


def _fill(value, name: str):
    if isinstance(value, dict):
        return {k: _fill(v, name) for k, v in value.items()}
    return value.replace("{name}", name)


def _result(tool: str, args: dict, rng: random.Random) -> str:
    files = rng.sample(FILE_NAMES, rng.randint(1, 5))
    if tool == "glob":
        return "\n".join(f"/work/project/{f}" for f in files)
    if tool == "read":
        return "\n".join(f"{i + 1}: line {i + 1} of {args['filePath']}" for i in range(rng.randint(1, 4)))
    if tool == "bash":
        return f"{rng.randint(1, 40)} passed in {rng.randint(1, 9)}.{rng.randint(0, 99):02d}s"
    return f"/work/project/{files[0]}:{rng.randint(1, 200)}: def main():"


def conversation(rng: random.Random, prose: str) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) of one transcript; prose: text to cut system prompts and tool descriptions from."""
    def snippet(lo: int, hi: int) -> str:
        n = rng.randint(lo, hi)
        start = rng.randint(0, max(0, len(prose) - n))
        return prose[start : start + n].strip()

    system = snippet(0, 600)
    if rng.random() < 0.5:  # an agent's header: who it is, which model, where it runs
        system = (f"{rng.choice(AGENT_LINES)}\nYou are powered by the model named {rng.choice(MODEL_NAMES)}.\n"
                  f"{system}")
    if rng.random() < 0.5:
        model = rng.choice(MODEL_NAMES)
        system += (f"\nThe exact model ID is local/{model}\nHere is some useful information about the environment "
                   f"you are running in:\n<env>\n  Working directory: /tmp/{rng.choice(('proj', 'work', 'x', 'repo'))}"
                   f"\n  Workspace root folder: /\n  Is directory a git repo: {rng.choice(('yes', 'no'))}\n  Platform: "
                   f"linux\n  Today's date: {rng.choice(('Mon', 'Tue', 'Fri'))} Dec 0{rng.randint(1, 9)} 2026\n</env>")
    if rng.random() < 0.25:
        user, answer = rng.choice(PLAIN)
        return [{"role": "system", "content": system}, {"role": "user", "content": user},
                {"role": "assistant", "content": answer}], None
    if rng.random() < 0.5:
        return opencode_conversation(rng, prose)
    requests, tool, args = rng.choice(REQUESTS)
    args = _fill(args, rng.choice(FILE_NAMES))
    user = rng.choice(requests).replace("{name}", args.get("filePath", ""))
    names = [tool] + rng.sample([t for t in TOOL_PARAMS if t != tool], rng.randint(0, 4))
    rng.shuffle(names)
    tools = [tool_definition(n, _description(snippet, rng), rng) for n in names]
    call = {"id": f"call_{rng.randrange(10**8)}", "type": "function",
            "function": {"name": tool, "arguments": json.dumps(args)}}
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": call["id"], "content": _result(tool, args, rng)},
                {"role": "assistant", "content": rng.choice(CLOSINGS)}]
    return messages, tools


def opencode_system(rng: random.Random, folder: str) -> str:
    """OpenCode's system prompt for an agent whose prompt is one of AGENT_LINES (clients/opencode-demo.json's)."""
    model = rng.choice(MODEL_NAMES)
    days = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
    months = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
    return (f"{rng.choice(AGENT_LINES)}\nYou are powered by the model named {model}. The exact model ID is "
            f"local/{model}\nHere is some useful information about the environment you are running in:\n<env>\n"
            f"  Working directory: {folder}\n  Workspace root folder: /\n  Is directory a git repo: "
            f"{rng.choice(('yes', 'no'))}\n  Platform: linux\n  Today's date: {rng.choice(days)} "
            f"{rng.choice(months)} {rng.randint(1, 28):02d} {rng.randint(2025, 2027)}\n</env>")


def opencode_conversation(rng: random.Random, prose: str) -> tuple[list[dict], list[dict]]:
    """A file-listing request in OpenCode's shape -> a glob call -> the folder's files -> a short answer."""
    def snippet(lo: int, hi: int) -> str:
        n = rng.randint(lo, hi)
        start = rng.randint(0, max(0, len(prose) - n))
        return prose[start : start + n].strip()

    folder = "/" + "/".join(rng.choice(FOLDER_WORDS) for _ in range(rng.randint(1, 5)))
    requests, _, args = REQUESTS[rng.choice((0, 0, 0, 1))]  # mostly "list the files", sometimes the .py files
    user = rng.choice(requests)
    if rng.random() < 0.5:  # `opencode run "a message"` sends it quoted
        user = f'"{user}"'
    tools = [OPENCODE_GLOB]
    if rng.random() < 0.3:  # a decoy beside it
        tools.append(tool_definition(rng.choice(("read", "bash", "grep", "write")), _description(snippet, rng), rng))
        rng.shuffle(tools)
    files = sorted({rng.choice(FILE_STEMS) + rng.choice(FILE_EXTS) for _ in range(rng.randint(1, 6))})
    if args["pattern"] != "*":
        files = [f for f in files if f.endswith(".py")]
    result = "\n".join(f"{folder}/{f}" for f in files) or "No files found"
    call = {"id": f"call_{rng.randrange(10**8)}", "type": "function",
            "function": {"name": "glob", "arguments": json.dumps(args)}}
    return [{"role": "system", "content": opencode_system(rng, folder)}, {"role": "user", "content": user},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": result},
            {"role": "assistant", "content": rng.choice(CLOSINGS)}], tools


def render(tokenizer, messages: list[dict], tools: list[dict] | None) -> Transcript:
    """Token ids of the conversation as the template renders it, piece by piece: what comes before each
    assistant turn (with the generation prompt) unmasked, the assistant's turn masked."""
    ids: list[int] = []
    mask: list[bool] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.render_chat(messages[:i], tools, add_generation_prompt=True)
        after = tokenizer.render_chat(messages[: i + 1], tools, add_generation_prompt=False)
        if not before.startswith(done) or not after.startswith(before):
            raise ValueError("the chat template does not render conversations incrementally")
        context = tokenizer.encode(before[len(done):], add_special_tokens=False)
        turn = tokenizer.encode(after[len(before):], add_special_tokens=False)
        ids += context + turn
        mask += [False] * len(context) + [True] * len(turn)
        done = after
    return Transcript(ids, mask)


def transcripts(tokenizer, prose: str, count: int, seed: int = 0, max_tokens: int = 1024) -> list[Transcript]:
    """count transcripts of at most max_tokens tokens (longer draws are drawn again)."""
    out = []
    n = 0
    while len(out) < count:
        rng = random.Random(seed * 1_000_003 + n)
        n += 1
        t = render(tokenizer, *conversation(rng, prose))
        if len(t.ids) <= max_tokens:
            out.append(t)
    return out
