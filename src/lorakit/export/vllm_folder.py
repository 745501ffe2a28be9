"""`export --format vllm`: OUT/serve.sh, the command `lorakit serve --engine vllm` would run for the adapters (with
serve's defaults and export's --device), and OUT/README.md saying how to use it.

The script is that command's exact argv, shell-quoted, after its environment; options given to it go to vLLM after
the script's own, and argparse takes the last of a repeated flag: `./serve.sh --port 9000` serves on 9000.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from lorakit import files
from lorakit.errors import LorakitError
from lorakit.export import vllm
from lorakit.export.gguf import claim, mark
from lorakit.options import ExportOptions, ServeOptions

SCRIPT = "serve.sh"
FALLBACK_PYTHON = "python3"  # serve.sh's interpreter when none here has vLLM (export may run before vLLM is installed)


@dataclass
class Written:
    script: Path
    launch: vllm.Launch
    notes: list[str]  # the launch's, and the interpreter's when none here has vLLM


def export(opts: ExportOptions) -> Written:
    """Write OUT (new or empty, or with --overwrite an earlier export): serve.sh and README.md."""
    base, adapters = vllm.for_source(opts.source, opts.adapters, opts.base)
    out = Path(opts.out)
    claim(out, opts.overwrite, writes=f"{SCRIPT} and README.md")
    notes = []
    try:
        python = vllm.python(opts.vllm_python)
    except LorakitError as e:
        if opts.vllm_python:  # named by the user, and wrong: say so rather than write a script that fails
            raise
        python = FALLBACK_PYTHON
        notes.append(f"{e}. {SCRIPT} runs {FALLBACK_PYTHON} meanwhile: export again with --vllm-python PATH")
    served = ServeOptions(model=base, device=opts.device, force=opts.force)
    launch = vllm.launch(served, adapters, python)
    notes += launch.notes
    mark(out, opts.source, None, format="vllm")
    script = out / SCRIPT
    with files.atomic_file(script) as tmp:
        tmp.write_text(script_text(launch, served, opts), encoding="utf-8")
        tmp.chmod(0o755)
    files.write_text(out / "README.md", readme(launch, served, adapters, notes))
    return Written(script, launch, notes)


def script_text(launch: vllm.Launch, served: ServeOptions, opts: ExportOptions) -> str:
    made_by = shlex.join(["lorakit", "export", opts.source, opts.out, "--format", "vllm"])
    lines = [
        "#!/bin/sh",
        f"# vLLM's OpenAI server for {served.model} and its adapters, as `lorakit serve --engine vllm` starts it.",
        f"# Written by `{made_by}`. Options after ./{SCRIPT} go to vLLM and win over these (--port 9000).",
        "# VLLM_API_KEY=KEY requires Authorization: Bearer KEY.",
    ]
    # A variable already set (by the caller, for another machine's memory) wins over the one sized here.
    lines += [f'export {k}="${{{k}:-{v}}}"' for k, v in launch.env.items()]
    return "\n".join([*lines, f'exec {shlex.join(launch.argv)} "$@"', ""])


def readme(launch: vllm.Launch, served: ServeOptions, adapters: dict[str, Path], notes: list[str]) -> str:
    names = ", ".join(f"`{n}`" for n in adapters)
    argv = launch.argv
    lines = [
        f"# {served.model} with {names} on vLLM",
        "",
        f"`./{SCRIPT}` starts vLLM's OpenAI-compatible server on http://{served.host}:{served.port}/v1 as "
        "`lorakit serve --engine vllm` would: the same base, adapters, names, batch size, context and precision "
        f"(`--dtype {argv[argv.index('--dtype') + 1]}`). A request's `model` picks the base "
        f"(`{served.served_model_name or served.model}`) or an adapter ({names}).",
        "",
        "```bash",
        f"./{SCRIPT}",
        f"./{SCRIPT} --host 0.0.0.0 --port 9000   # vLLM's options after it win over the script's",
        f"VLLM_API_KEY=KEY ./{SCRIPT}             # clients then send Authorization: Bearer KEY",
        "```",
        "",
        f"It runs vLLM's server module with the Python that has vLLM (`{argv[0]}`):",
        "",
        "```bash",
        launch.shell(),
        "```",
    ]
    if vllm.KV_SPACE in launch.env:
        lines += [
            "",
            f"`{vllm.KV_SPACE}` is the GiB of KV cache vLLM's CPU backend takes, sized from this machine's free "
            f"memory at export; set it before `./{SCRIPT}` to change it. Without it vLLM reserves 92% of the RAM "
            "and refuses to start when that much is not free.",
        ]
    lines += [
        "",
        "Greedy answers, stop reasons and `usage` agree with `lorakit serve` (`make test-vllm` checks it); both count "
        "the end-of-turn token that ends an answer in `usage.completion_tokens`, as OpenAI's API does.",
    ]
    if notes:
        lines += ["", "## Notes", "", *(f"- {n}" for n in notes)]
    return "\n".join([*lines, ""])
