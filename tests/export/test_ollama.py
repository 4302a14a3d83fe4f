"""`loraforge export ollama`: the Modelfile's TEMPLATE renders what the model was trained on.

Ollama cannot run here, so the TEMPLATE is executed by a small evaluator of the Go
text/template subset it uses (range, if / else if with eq / and / not, printing, `$`
variables, `{{-` / `-}}` trimming) fed the values Ollama's server gives a template:
the Modelfile's SYSTEM prepended when a request has no system message, `.System` = the
system messages joined, `.Messages` = every message (system ones included).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from loraforge.data.records import Turn
from loraforge.data.templates import TEMPLATES, get_template, jinja_template, render_prompt
from loraforge.errors import LoraforgeError
from loraforge.export.gguf_writer import export_gguf
from loraforge.export.ollama import write_modelfile

BOS, EOS = "<s>", "</s>"  # the tiny fixture tokenizer's

# --- a Go text/template evaluator for the subset the Modelfile uses ------------------------

ACTION = re.compile(r'\{\{(- )?((?:"(?:\\.|[^"\\])*"|[^"])*?)( -)?\}\}', re.S)
WORD = re.compile(r'"(?:\\.|[^"\\])*"|\S+')


def go_tokens(template: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", body)] with `{{-` / `-}}` whitespace trimming applied."""
    tokens, pos, trim_next = [], 0, False
    for m in ACTION.finditer(template):
        text = template[pos:m.start()]
        text = text.lstrip(" \t\r\n") if trim_next else text
        tokens.append(("text", text.rstrip(" \t\r\n") if m[1] else text))
        tokens.append(("action", m[2].strip()))
        pos, trim_next = m.end(), bool(m[3])
    tail = template[pos:]
    tokens.append(("text", tail.lstrip(" \t\r\n") if trim_next else tail))
    return tokens


def go_parse(tokens, i=0):
    """Nodes up to an `end` / `else …` at this level: (nodes, index of that action, its body)."""
    nodes = []
    while i < len(tokens):
        kind, body = tokens[i]
        if kind == "text":
            nodes.append(("text", body))
        elif body == "end" or body.startswith("else"):
            return nodes, i, body
        elif body.startswith(("if ", "range ")):
            word, expr = body.split(" ", 1)
            branches, otherwise = [], []
            while True:
                inner, i, closer = go_parse(tokens, i + 1)
                branches.append((expr, inner))
                if closer == "end":
                    break
                if closer == "else":
                    otherwise, i, _ = go_parse(tokens, i + 1)
                    break
                expr = closer.removeprefix("else if ")
            nodes.append((word, branches, otherwise))
        elif m := re.fullmatch(r"\$(\w+) :?= (.+)", body):
            nodes.append(("set", m[1], m[2]))
        else:
            nodes.append(("print", body))
        i += 1
    return nodes, i, None


def go_value(expr: str, dot, root, variables):
    words = WORD.findall(expr)

    def term(word):
        if word.startswith('"'):
            return json.loads(word)
        if word in ("true", "false"):
            return word == "true"
        if word.startswith("$."):
            return root[word[2:]]
        if word.startswith("$"):
            return variables[word[1:]]
        if word.startswith("."):
            return dot[word[1:]]
        raise AssertionError(f"evaluator does not know {word!r} in {expr!r}")

    functions = {"not": lambda x: not x, "and": lambda *xs: all(xs), "eq": lambda a, b: a == b}
    if words[0] in functions:
        return functions[words[0]](*map(term, words[1:]))
    assert len(words) == 1, expr
    return term(words[0])


def go_run(nodes, dot, root, variables) -> str:
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "print":
            out.append(str(go_value(node[1], dot, root, variables)))
        elif node[0] == "set":
            variables[node[1]] = go_value(node[2], dot, root, variables)
        elif node[0] == "if":
            _, branches, otherwise = node
            chosen = next((body for expr, body in branches if go_value(expr, dot, root, variables)), otherwise)
            out.append(go_run(chosen, dot, root, variables))
        else:  # range
            (expr, body), = node[1]
            out += [go_run(body, item, root, variables) for item in go_value(expr, dot, root, variables)]
    return "".join(out)


def go_render(template: str, values: dict) -> str:
    nodes, _, closer = go_parse(go_tokens(template))
    assert closer is None, f"unbalanced {closer}"
    return go_run(nodes, values, values, {})


# --- the Modelfile as Ollama reads it, and its server's values ----------------------------

COMMAND = re.compile(r'(FROM|TEMPLATE|SYSTEM|PARAMETER (\w+)) (?:"""(.*?)"""|"([^\n]*)"|([^\n]*))\n', re.S)


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(command, value) in order; PARAMETER lines as (parameter name, value). No escapes, like Ollama's."""
    commands, pos = [], 0
    while pos < len(text):
        if text[pos] in "#\n":
            pos = text.index("\n", pos) + 1
            continue
        m = COMMAND.match(text, pos)
        assert m, f"unparsable Modelfile at {text[pos:pos + 60]!r}"
        value = next(v for v in m.groups()[2:] if v is not None)
        commands.append(((m[2] or m[1]).lower(), value))
        pos = m.end()
    return commands


def ollama_prompt(modelfile: str, system: str | None, turns: list[Turn]) -> str:
    commands = dict(parse_modelfile(modelfile))
    messages = [{"Role": t.role, "Content": t.text} for t in turns]
    if system is not None:
        messages.insert(0, {"Role": "system", "Content": system})
    elif "system" in commands:
        messages.insert(0, {"Role": "system", "Content": commands["system"]})
    joined = "\n\n".join(m["Content"] for m in messages if m["Role"] == "system")
    return go_render(commands["template"], {"System": joined, "Messages": messages})


def turns(*texts: str) -> list[Turn]:
    return [Turn("user" if i % 2 == 0 else "assistant", text) for i, text in enumerate(texts)]


CONVERSATIONS = {
    "one-turn": turns("请介绍一下北京。"),
    "two-turn": turns("Name a colour.", "Red.", "Another one?"),
    "template-ish": turns("Print {{ .System }} and $first", "  {{- end }} \n", "  two spaces\n\n"),
}
SYSTEMS = {"default": None, "none": "", "own": "你是一个助手（简洁）。"}


@pytest.fixture(scope="module")
def gguf_paths(tiny_llama, tmp_path_factory):
    """The tiny model as trained with no chat template, and with loraforge's llama2-zh."""
    folder = tmp_path_factory.mktemp("ollama")
    chat = shutil.copytree(tiny_llama, folder / "chat-base")
    config = json.loads((chat / "tokenizer_config.json").read_text())
    config["chat_template"] = jinja_template(get_template("llama2-zh"))
    (chat / "tokenizer_config.json").write_text(json.dumps(config))
    return {"plain": export_gguf(tiny_llama, [], folder / "plain" / "model.gguf", "f16"),
            "llama2-zh": export_gguf(chat, [], folder / "chat" / "model.gguf", "f16")}


# a thinking template (qwen3) is refused: the Go template cannot add its empty <think> block
MODELFILE_TEMPLATES = [name for name, t in TEMPLATES.items() if not t.thinking]


def test_a_thinking_template_is_refused_with_the_way_out(gguf_paths, tmp_path):
    with pytest.raises(LoraforgeError, match="qwen3_nothink"):
        write_modelfile(gguf_paths["plain"], tmp_path / "Modelfile", template="qwen3")


@pytest.mark.parametrize("system_id", SYSTEMS)
@pytest.mark.parametrize("conv_id", CONVERSATIONS)
@pytest.mark.parametrize("name", MODELFILE_TEMPLATES)
def test_template_renders_like_render_prompt(gguf_paths, tmp_path, name, conv_id, system_id):
    modelfile = write_modelfile(gguf_paths["plain"], tmp_path / "Modelfile", template=name).read_text()
    system, history = SYSTEMS[system_id], CONVERSATIONS[conv_id]
    expected = render_prompt(TEMPLATES[name], system, history, EOS, bos_token=BOS)
    assert ollama_prompt(modelfile, system, history) == expected


@pytest.mark.parametrize("name", MODELFILE_TEMPLATES)
def test_system_option_replaces_the_default(gguf_paths, tmp_path, name):
    modelfile = write_modelfile(gguf_paths["plain"], tmp_path / "Modelfile", system="只用中文回答。",
                                template=name).read_text()
    assert dict(parse_modelfile(modelfile))["system"] == "只用中文回答。"
    history = CONVERSATIONS["two-turn"]
    assert ollama_prompt(modelfile, None, history) == render_prompt(TEMPLATES[name], "只用中文回答。", history, EOS)


@pytest.mark.parametrize("name", MODELFILE_TEMPLATES)
def test_stop_strings_and_default_system(gguf_paths, tmp_path, name):
    t = TEMPLATES[name]
    commands = parse_modelfile(write_modelfile(gguf_paths["plain"], tmp_path / "Modelfile", template=name).read_text())
    stops = [value for command, value in commands if command == "stop"]
    assert stops == list(dict.fromkeys([t.end_token or EOS, *t.stop_strings]))
    assert dict(commands).get("system") == t.default_system


def test_template_name_and_tokens_come_from_the_gguf(gguf_paths):
    path = gguf_paths["llama2-zh"]
    out = write_modelfile(path, None, None, None)
    assert out == path.with_name("Modelfile")
    text = out.read_text()
    assert "Chat template 'llama2-zh'" in text and text.splitlines()[3] == "FROM ./model.gguf"
    history = CONVERSATIONS["two-turn"]
    prompt = ollama_prompt(text, None, history)
    assert prompt == render_prompt(get_template("llama2-zh"), None, history, EOS, bos_token=BOS)
    assert "</s><s>[INST]" in prompt  # a new round starts with the GGUF's BOS text


def test_from_is_absolute_when_the_modelfile_is_elsewhere(gguf_paths, tmp_path):
    out = write_modelfile(gguf_paths["plain"], tmp_path / "deploy" / "Modelfile", template="chatml")
    assert dict(parse_modelfile(out.read_text()))["from"] == str(gguf_paths["plain"].resolve())


@pytest.mark.parametrize("which, template, message", [
    ("plain", "chatm", "unknown chat template 'chatm': did you mean 'chatml'?"),
    ("plain", None, "has no chat template, so the Modelfile's TEMPLATE cannot be derived from it: pass --template"),
    ("llama2-zh", "chatml", "trained with chat template 'llama2-zh' but --template chatml was given"),
])
def test_template_errors(gguf_paths, tmp_path, which, template, message):
    with pytest.raises(LoraforgeError, match=re.escape(message)):
        write_modelfile(gguf_paths[which], tmp_path / "Modelfile", template=template)
    assert not (tmp_path / "Modelfile").exists()


def test_triple_quotes_in_system_are_refused(gguf_paths, tmp_path):
    with pytest.raises(LoraforgeError, match='SYSTEM text contains """'):
        write_modelfile(gguf_paths["plain"], tmp_path / "Modelfile", system='say """hi"""', template="chatml")


def test_cli(gguf_paths, tmp_path):
    out = tmp_path / "Modelfile"
    result = subprocess.run([sys.executable, "-m", "loraforge", "export", "ollama", str(gguf_paths["plain"]),
                             "-o", str(out), "--template", "llama3", "--system", "Be brief."],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    parsed = parse_modelfile(out.read_text())
    assert dict(parsed)["system"] == "Be brief."
    assert [value for key, value in parsed if key == "stop"] == ["<|eot_id|>", "<|eom_id|>"]  # LLaMA-Factory's stop_words
