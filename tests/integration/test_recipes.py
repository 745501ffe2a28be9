"""The reference recipes (configs/recipes): each trains 2 steps on a tiny random model of its architecture
with its own target modules, format, template and optimizer, offline, so a wrong module name or column
fails here rather than on a rented GPU. The three-task bloom twin runs for real on SmolLM2."""

import json
import re
import string
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lorakit import cli, config, options, plan, train
from lorakit.quickstart import make_task
from tiny import save_tiny

ROOT = Path(__file__).parents[2]
RECIPES = sorted((ROOT / "configs" / "recipes").glob("*.yaml"))
ARCH_OF = (("gemma-2-", "gemma2"), ("gemma", "gemma"), ("bloom", "bloom"), ("llama", "llama"))


def arch_of(model_id: str) -> str:
    return next(arch for key, arch in ARCH_OF if key in model_id.lower())


def rows_for(cfg: config.RunConfig, n: int = 8) -> list[dict]:
    """Rows in the shape the recipe's data set has (its format, or the columns its template names; preference
    pairs as UltraFeedback's: a prompt and two whole chats)."""
    data = cfg.data
    pairs = [(f"what is {i} plus {i}", f"the sum is {2 * i}") for i in range(n)]
    if cfg.objective in ("dpo", "orpo"):
        rows = []
        for q, a in pairs:
            user = {"role": "user", "content": q}
            chosen, rejected = {"role": "assistant", "content": a}, {"role": "assistant", "content": "no idea"}
            rows.append({"prompt": q, "chosen": [user, chosen], "rejected": [user, rejected]})
        return rows
    if data.format == "template":
        fields = {
            f for t in data.template.model_dump().values() if t for _, f, _, _ in string.Formatter().parse(t) if f
        }
        return [{f: f"{f} {q}" for f in fields} for q, _ in pairs]
    if data.format == "chat_text":
        return [{"text": f"### Human: {q}### Assistant: {a}"} for q, a in pairs]
    if data.format == "sharegpt":
        return [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in pairs]
    if data.format == "alpaca":
        return [{"instruction": q, "input": "", "response": a} for q, a in pairs]
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    archs = {arch_of(config.load(r).model) for r in RECIPES}
    return {a: save_tiny(tmp_path_factory.mktemp(a), arch=a) for a in archs}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_each_recipe_trains_on_a_tiny_model_of_its_architecture(recipe, tiny_dirs, tmp_path):
    cfg = config.load(recipe)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in rows_for(cfg)))
    tiny = config.load(recipe, [
        f"model={tiny_dirs[arch_of(cfg.model)]}", f"data.train={rows}", "data.eval=null",
        f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}", "train.max_steps=2",
        "train.batch_size=1", "train.grad_accum=1", "train.eval_every=null", "train.save_every=null",
        "adapter.init=null",  # the run it starts from is another recipe's; the twins below start from it for real
    ])  # fmt: skip
    summary = train.run(tiny, progress=False).summary
    assert summary["steps"] == 2 and summary["trained_tokens"] > 0 and summary["method"] == cfg.method
    if cfg.method == "full":
        assert (tmp_path / "run" / "model" / "config.json").is_file()
        return
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"]) == (cfg.adapter.r, cfg.adapter.alpha)
    weights = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    targets = cfg.adapter.target_modules
    if targets != "all-linear":  # every named module was adapted, in every layer
        assert {k.split(".lora_")[0].split(".")[-1] for k in weights} == set(targets)


def test_every_recipe_has_a_local_twin_that_runs_offline(tmp_path):
    shared = ROOT.parent / "shared" / "data"
    for recipe in RECIPES:
        local = config.load(recipe, local=True)
        assert local.model == "smollm2-135m-instruct" and "local" in local.output_dir, recipe.name
        assert local.train.max_steps and local.train.max_steps <= 60, "shortened to fit a CPU"
        llama = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # SmolLM2's
        assert local.adapter.target_modules == "all-linear" or set(local.adapter.target_modules) <= llama, recipe.name
        # As written on a fresh clone: files of ../shared/data, never ones another command must write first.
        for path in (local.data.train, local.data.eval):
            if isinstance(path, str):
                assert path.startswith("../shared/data/"), f"{recipe.name}: its twin reads {path}"
                assert not shared.is_dir() or (ROOT / path).exists(), path


@pytest.mark.slow
def test_three_task_twin_trains_evaluates_and_serves_side_by_side(tmp_path, capsys):
    """The bloom setup's local twin on SmolLM2: three adapters, one eval against the base, one server."""
    from conftest import shared_data_dir

    shared_data_dir()  # skips without ../shared
    from lorakit.serve import server

    train_path, eval_path = make_task(tmp_path / "sql-data", n_train=200, n_eval=8, seed=2)
    runs = {}
    for task in ("general", "sql", "detox"):
        recipe = ROOT / "configs" / "recipes" / f"bloom-1b1-{task}.yaml"
        over = [
            f"output_dir={tmp_path / 'runs' / task}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "train.max_steps=3",
            "train.eval_every=null",
            "train.save_every=null",
            "data.limit=64",
        ]
        if task == "sql":  # the quickstart's task: a score that moves in 3 steps (the twin's WikiSQL: a format)
            over += [f"data.train={train_path}", f"data.eval={eval_path}", "data.format=auto"]
        assert cli.main(["train", str(recipe), "--local", "--no-progress", *over]) == 0
        runs[task] = tmp_path / "runs" / task
    sql = ROOT / "configs" / "recipes" / "bloom-1b1-sql.yaml"
    adapters = [a for task, path in runs.items() for a in ("--adapter", f"{task}={path}")]
    assert cli.main(["eval", str(sql), "--local", f"data.train={train_path}", f"data.eval={eval_path}",
                     "data.format=auto", f"output_dir={tmp_path / 'runs' / 'sql'}", "--max-new-tokens", "24",
                     "--normalize", "sql",
                     "--metric", "exact_match", *adapters]) == 0  # fmt: skip
    report = json.loads((tmp_path / "runs" / "sql" / "eval" / "eval.json").read_text())
    assert list(report["models"]) == ["base", "general", "sql", "detox"]
    assert all(m["loss"] > 0 for m in report["models"].values())
    assert report["models"]["sql"]["loss"] < report["models"]["base"]["loss"], "the SQL adapter learned its task"
    _, serving = server.build(
        server.ServeOptions(model="smollm2-135m-instruct", adapters={t: str(p) for t, p in runs.items()})
    )
    assert set(serving.registry.active) == {"general", "sql", "detox"}
    serving.close()


@pytest.mark.slow
def test_sft_then_dpo_twins_train_as_written(tmp_path, capsys):
    """The SFT -> DPO path's local twins on SmolLM2 and ../shared/data, two steps each (short rows, few rows): the
    DPO twin starts from the SFT twin's adapter (here of rank 4, where a new adapter would have the recipe's 16),
    scores its reference once before the first step, and logs the preference metrics."""
    from conftest import shared_data_dir

    shared_data_dir()  # skips without ../shared
    recipes = ROOT / "configs" / "recipes"
    short = ["--local", "--no-progress", "train.max_steps=2", "train.batch_size=1", "train.eval_every=null",
             "train.save_every=null", "data.max_length=128", f"data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    sft, dpo = tmp_path / "runs" / "sft", tmp_path / "runs" / "dpo"
    over = [f"output_dir={sft}", "data.limit=8", "adapter.r=4", "adapter.alpha=8"]
    assert cli.main(["train", str(recipes / "llama-3.2-1b-sft.yaml"), *short, *over]) == 0
    over = [f"output_dir={dpo}", f"adapter.init={sft}", "data.limit=4", "preference.max_prompt_length=64"]
    assert cli.main(["train", str(recipes / "llama-3.2-1b-dpo.yaml"), *short, *over]) == 0
    assert "reference log-probs: 8 sequences scored with the starting weights" in capsys.readouterr().out
    summary = json.loads((dpo / "summary.json").read_text())
    assert summary["objective"] == "dpo" and summary["steps"] == 2 and summary["examples"] == 3, summary
    assert "final_eval_rewards_accuracy" in summary
    shape = json.loads((dpo / "adapter" / "adapter_config.json").read_text())
    assert (shape["r"], shape["lora_alpha"]) == (4, 8), "continued the SFT twin's adapter"


# A recipe's comment quotes the planner as "lorakit plan[ --flag value ...]: X GiB": `lorakit plan RECIPE --device cuda`
# with those flags prints a peak of X GiB.
PLAN_QUOTE = re.compile(r"lorakit plan((?: --[\w-]+ [^\s:]+)*): (\d+\.\d) GiB")


def planned_gib(recipe: Path, flags: list[str]) -> str:
    args = cli.build_parser().parse_args(["plan", str(recipe), "--device", "cuda", *flags])
    _, _, est = plan.plan(config.load(args.config), options.from_args(options.PlanOptions, args))
    return f"{est.peak_bytes / plan.GIB:.1f}"


def test_the_hardware_lines_of_recipes_and_docs_are_what_lorakit_plan_says():
    """One source for memory figures: each recipe's comment and docs/recipes.md quote `lorakit plan`."""
    docs = (ROOT / "docs" / "recipes.md").read_text()
    for recipe in RECIPES:
        comment = " ".join(line.lstrip("#").strip() for line in recipe.read_text().splitlines() if line.startswith("#"))
        quotes = PLAN_QUOTE.findall(comment)
        assert quotes and quotes[0][0] == "", f"{recipe.name}: its Hardware line quotes `lorakit plan` on itself"
        for flags, gib in quotes:
            assert planned_gib(recipe, flags.split()) == gib, f"{recipe.name}: lorakit plan{flags} is not {gib} GiB"
        row = next(line for line in docs.splitlines() if line.startswith(f"| `{recipe.stem}` | "))
        assert f"plan {quotes[0][1]} GiB" in row, f"docs/recipes.md's row of {recipe.stem}"
    assert "not there yet" not in docs + "".join(r.read_text() for r in RECIPES), "FSDP is there: --nproc"
