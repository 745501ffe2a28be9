"""Ollama: a Modelfile whose TEMPLATE, default SYSTEM and stop tokens reproduce the model's own chat template.

The template is taken apart by rendering chats of marker strings (`chat_pieces`), so any template that
is one block per turn (ChatML, Llama 3, Gemma, Zephyr, …) translates without a table of known formats.
"""

from __future__ import annotations

import re
from typing import Any

from jinja2.exceptions import TemplateError

from lorakit import render
from lorakit.errors import LorakitError


def chat_pieces(tokenizer: Any) -> dict[str, str]:
    """The text a chat template puts around each turn, found by rendering chats of marker strings.

    Keys: head (text before everything, e.g. BOS), sys_pre/sys_post, user_pre/user_post, gen (the
    generation prompt, which opens the assistant turn), asst_post (closes it) and default_system
    (what the template inserts when a chat has no system turn; SmolLM2 does). Raises LorakitError
    for a template that is not one block per turn (Llama 2 folds the system turn into the first user turn).
    """
    S, U, A = ({"role": r, "content": f"LKMARK{r.upper()}"} for r in ("system", "user", "assistant"))

    def as_text(chat: list[dict], gen: bool = False) -> str:
        return render.render(tokenizer, chat, add_generation_prompt=gen)

    unsupported = LorakitError(
        "Modelfile: this chat template is not one block per turn, so it cannot be "
        "written as an Ollama TEMPLATE automatically; write TEMPLATE by hand"
    )
    try:
        s, su, sua, gen, u = as_text([S]), as_text([S, U]), as_text([S, U, A]), as_text([S, U], True), as_text([U])
    except (TemplateError, ValueError):  # no template, or one that refuses these chats
        raise unsupported from None
    head = (
        tokenizer.bos_token
        if tokenizer.bos_token and "bos_token" in (tokenizer.chat_template or "") and s.startswith(tokenizer.bos_token)
        else ""
    )
    blocks = (s[len(head) :], su[len(s) :], sua[len(su) :])
    if not (
        su.startswith(s)
        and sua.startswith(su)
        and gen.startswith(su)
        and u.startswith(head)
        and u.endswith(blocks[1])
        and len(u) >= len(head) + len(blocks[1])
        and all(b.count(m["content"]) == 1 for b, m in zip(blocks, (S, U, A)))
    ):
        raise unsupported
    (sys_pre, sys_post), (user_pre, user_post), (asst_pre, asst_post) = (
        b.split(m["content"]) for b, m in zip(blocks, (S, U, A))
    )
    p = {
        "head": head,
        "sys_pre": sys_pre,
        "sys_post": sys_post,
        "user_pre": user_pre,
        "user_post": user_post,
        "gen": gen[len(su) :],
        "asst_post": asst_post,
        "default_system": "",
    }
    extra = u[len(head) : len(u) - len(blocks[1])]  # the system turn the template adds on its own
    if extra:
        if not (extra.startswith(sys_pre) and extra.endswith(sys_post)):
            raise unsupported
        p["default_system"] = extra[len(sys_pre) : len(extra) - len(sys_post)]
    # The Ollama template below opens the assistant turn right after each user turn: that must be
    # the generation prompt, and the pieces must rebuild the template's own rendering of a 2-turn chat.
    two_turns = [S, U, A, {"role": "user", "content": "LKMARKUSER2"}]
    rebuilt = (
        head
        + sys_pre
        + S["content"]
        + sys_post
        + user_pre
        + U["content"]
        + user_post
        + p["gen"]
        + A["content"]
        + asst_post
        + user_pre
        + "LKMARKUSER2"
        + user_post
        + p["gen"]
    )
    if asst_pre != p["gen"] or as_text(two_turns, True) != rebuilt:
        raise unsupported
    return p


def modelfile(gguf_name: str, tokenizer: Any, generation_config: Any) -> tuple[str, str | None]:
    """An Ollama Modelfile whose TEMPLATE, default SYSTEM and stops reproduce the model's chat template.

    Returns (text, warning). A template that cannot be translated gets no TEMPLATE (Ollama then
    falls back to the chat template stored in the GGUF) and a warning saying so.
    """
    special = render.special_ids(tokenizer)
    ids = render.stop_ids(tokenizer, generation_config)
    lines, warning = [f"FROM ./{gguf_name}"], None
    try:
        p = chat_pieces(tokenizer)
        if any("{{" in v or '"""' in v for v in p.values()):
            raise LorakitError("the chat template contains '{{' or '\"\"\"', which a TEMPLATE cannot hold literally")
    except LorakitError as e:
        warning = f"{e}. The Modelfile has no TEMPLATE: Ollama uses the chat template stored in the GGUF"
        lines.append(f"# {warning}")
    else:
        template = (
            f"{p['head']}{{{{ if .System }}}}{p['sys_pre']}{{{{ .System }}}}{p['sys_post']}"
            f'{{{{ end }}}}{{{{ range .Messages }}}}{{{{ if eq .Role "user" }}}}{p["user_pre"]}{{{{ .Content }}}}'
            f'{p["user_post"]}{p["gen"]}{{{{ else if eq .Role "assistant" }}}}{{{{ .Content }}}}'
            f"{p['asst_post']}{{{{ end }}}}{{{{ end }}}}"
        )
        warning = same_as_chat_template(template, p["default_system"], tokenizer)
        lines.append(f'TEMPLATE """{template}"""' if warning is None else f"# {warning}")
        if p["default_system"]:
            lines.append(f'SYSTEM """{p["default_system"]}"""')
        # Also stop at the token closing a turn and at one opening a new user turn.
        for piece in (p["asst_post"], p["user_pre"]):
            ids += [i for i in tokenizer(piece, add_special_tokens=False)["input_ids"] if i in special][:1]
    stops = [tokenizer.convert_ids_to_tokens(i) for i in dict.fromkeys(ids)]
    lines += [f'PARAMETER stop "{s}"' for s in stops if s]
    return "\n".join(lines) + "\n", warning


SAMPLE_CHATS = (
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Name a color."}],
)  # fmt: skip


def same_as_chat_template(template: str, default_system: str, tokenizer: Any) -> str | None:
    """None if Ollama's TEMPLATE renders SAMPLE_CHATS into the chat template's own strings, else what differs."""
    for chat in SAMPLE_CHATS:
        system = next((m["content"] for m in chat if m["role"] == "system"), default_system)
        got = execute(template, system, chat)
        want = render.render(tokenizer, chat, add_generation_prompt=True)
        if got != want:
            return f"the Ollama TEMPLATE renders {got!r} where the chat template renders {want!r}; no TEMPLATE written"
    return None


ACTION = re.compile(r"{{(.*?)}}", re.S)


def execute(template: str, system: str, messages: list[dict]) -> str:
    """Ollama's Go template language, the subset Modelfile TEMPLATEs use for chats.

    .System, .Messages (range), .Role, .Content; if / else if / else / end; `eq .Role "x"`; `{{-`/`-}}`
    trim the whitespace beside them as in Go. Anything else raises ValueError.
    """
    pieces: list[tuple[str, str]] = []
    pos = 0
    for m in ACTION.finditer(template):
        text, action = template[pos : m.start()], m.group(1)
        if action.startswith("-"):
            text, action = text.rstrip(), action[1:]
        if pieces and pieces[-1][0] == "trim":
            pieces.pop()
            text = text.lstrip()
        pieces.append(("text", text))
        if action.endswith("-"):
            pieces.append(("act", action[:-1].strip()))
            pieces.append(("trim", ""))
        else:
            pieces.append(("act", action.strip()))
        pos = m.end()
    tail = template[pos:]
    if pieces and pieces[-1][0] == "trim":
        pieces.pop()
        tail = tail.lstrip()
    pieces.append(("text", tail))
    nodes, _, stop = _parse(pieces, 0)
    if stop is not None:
        raise ValueError(f"unexpected {{{{ {stop} }}}}")
    return _run(nodes, {"System": system, "Messages": messages})


def _parse(pieces: list[tuple[str, str]], i: int) -> tuple[list, int, str | None]:
    """Nodes until an `end`/`else` action (returned as the stop), from pieces[i]."""
    nodes: list = []
    while i < len(pieces):
        kind, value = pieces[i]
        i += 1
        if kind == "text":
            nodes.append(("text", value))
        elif value == "end" or value.startswith("else"):
            return nodes, i, value
        elif value.startswith("if "):
            branches, cond = [], value[3:]
            while True:
                body, i, stop = _parse(pieces, i)
                branches.append((cond, body))
                if stop == "end":
                    break
                if stop is None:
                    raise ValueError("an {{ if }} without {{ end }}")
                cond = stop[len("else if ") :] if stop.startswith("else if ") else "true"
            nodes.append(("if", branches))
        elif value.startswith("range "):
            body, i, stop = _parse(pieces, i)
            if stop != "end":
                raise ValueError("a {{ range }} without {{ end }}")
            nodes.append(("range", value[6:].strip(), body))
        elif re.fullmatch(r"\.\w+", value):
            nodes.append(("var", value[1:]))
        else:
            raise ValueError(f"{{{{ {value} }}}} is outside the template subset lorakit renders")
    return nodes, i, None


def _value(expr: str, scope: dict) -> Any:
    expr = expr.strip()
    if expr == "true":
        return True
    if expr.startswith("eq "):
        left, right = expr[3:].strip().split(" ", 1)
        return _value(left, scope) == _value(right, scope)
    if expr.startswith('"'):
        return expr.strip('"')
    if expr.startswith("."):
        return scope.get(expr[1:].capitalize(), scope.get(expr[1:], ""))
    raise ValueError(f"{expr!r} is outside the template subset lorakit renders")


def _run(nodes: list, scope: dict) -> str:
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "var":
            out.append(str(_value("." + node[1], scope)))
        elif node[0] == "if":
            body = next((b for cond, b in node[1] if _value(cond, scope)), [])
            out.append(_run(body, scope))
        else:
            for item in _value(node[1], scope):
                out.append(_run(node[2], {**scope, "Role": item["role"], "Content": item["content"]}))
    return "".join(out)
