"""The batched multi-adapter LoRA of mixed decode batches computes what peft's per-row path computes."""

import gc
import weakref

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lorakit.serve import multi_lora
from tiny import tiny_model, tiny_tokenizer


def with_adapters(**extra):
    """A tiny llama with three adapters of different ranks and targets (b does not touch attention)."""
    net = tiny_model("llama", tiny_tokenizer())
    specs = {"a": (4, ["q_proj", "v_proj"]), "b": (8, ["gate_proj", "up_proj", "down_proj"]), "c": (16, "all-linear")}
    peft_net = None
    for i, (name, (r, targets)) in enumerate(specs.items()):
        torch.manual_seed(i)
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, **extra)
        if peft_net is None:
            peft_net = get_peft_model(net, cfg, adapter_name=name)
        else:
            peft_net.add_adapter(name, cfg)
    return peft_net.eval()


def both(net, rows, ids):
    """Logits of one forward through multi_lora's rows, and through peft's per-row `adapter_names`."""
    with torch.no_grad():
        with multi_lora.rows(net, rows):
            got = net(input_ids=ids).logits
        return got, net(input_ids=ids, adapter_names=[r or "__base__" for r in rows]).logits


def test_mixed_rows_match_peft_per_row_in_prefill_and_decode():
    net = with_adapters()
    assert multi_lora.supported(net)
    rows = ["a", None, "b", "c", "a", "c"]
    ids = torch.randint(0, 600, (len(rows), 7))
    with torch.no_grad():
        want = net(input_ids=ids, adapter_names=[r or "__base__" for r in rows]).logits
        with multi_lora.rows(net, rows):
            got = net(input_ids=ids).logits
            step = net(input_ids=ids[:, :1]).logits  # one-token decode shape, same gathered weights
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
        assert torch.allclose(step, net(input_ids=ids[:, :1], adapter_names=[r or "__base__" for r in rows]).logits,
                              atol=1e-5, rtol=0)  # fmt: skip
        # Leaving the block restores peft's own forward: the active adapter applies to every row again.
        net.set_adapter("c")
        assert torch.allclose(net(input_ids=ids).logits, net(input_ids=ids, adapter_names=["c"] * len(rows)).logits)
    # The adapters really differ, so equality above is not a no-op.
    assert (want[0] - want[1]).abs().max() > 1e-3 and (want[2] - want[3]).abs().max() > 1e-3


def test_an_adapter_reloaded_under_its_name_is_used_not_its_old_stacks():
    net = with_adapters()
    rows = ["a", "b"]
    ids = torch.randint(0, 600, (2, 5))
    with torch.no_grad():
        with multi_lora.rows(net, rows):
            before = net(input_ids=ids).logits
        net.delete_adapter("a")  # its tensors are freed: a new one could take their ids, were they not held
        torch.manual_seed(7)
        again = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        net.add_adapter("a", again)
        with multi_lora.rows(net, rows):
            after = net(input_ids=ids).logits
        want = net(input_ids=ids, adapter_names=rows).logits
    assert torch.allclose(after, want, atol=1e-5, rtol=0) and not torch.allclose(before[0], after[0])


@pytest.mark.parametrize("rows", [["b", None], ["c", "c", "c"], [None, None]])
def test_layers_that_no_rows_adapter_adapts_and_one_adapter_batches_match_peft(rows):
    net = with_adapters()  # b does not touch attention: those layers run the base alone for ["b", None]
    ids = torch.randint(0, 600, (len(rows), 6))
    got, want = both(net, rows, ids)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()


def test_a_layer_left_without_adapters_runs_the_base():
    net = with_adapters()
    net.delete_adapter("c")  # the only one on k_proj and o_proj: peft keeps those layers, now empty
    rows = ["a", "b", None]
    ids = torch.randint(0, 600, (len(rows), 5))
    got, want = both(net, rows, ids)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_fp32_adapters_on_a_bf16_base_add_as_peft_does():
    net = tiny_model("llama", tiny_tokenizer()).to(torch.bfloat16)
    torch.manual_seed(0)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    net = get_peft_model(net, cfg, adapter_name="a")  # peft keeps the adapter's weights in fp32
    net.add_adapter("b", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
    net.eval()
    assert net.base_model.model.model.layers[0].self_attn.q_proj.lora_A["a"].weight.dtype == torch.float32
    rows = ["a", None, "b"]
    ids = torch.randint(0, 600, (len(rows), 6))
    got, want = both(net, rows, ids)
    assert got.dtype == want.dtype == torch.bfloat16
    assert torch.allclose(got.float(), want.float(), atol=3e-2, rtol=0), (got.float() - want.float()).abs().max()


def test_a_new_model_that_takes_a_freed_models_id_gets_its_own_layers():
    old, new = with_adapters(), with_adapters()
    assert multi_lora.supported(old)
    # What a freed model leaves behind when a new one (peft wrapped again) takes its id, same adapter names.
    multi_lora._FOUND[id(new)] = multi_lora._FOUND[id(old)]
    rows = ["a", "b", None, "c"]
    ids = torch.randint(0, 600, (len(rows), 5))
    got, want = both(new, rows, ids)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_a_freed_models_layers_and_stacks_are_not_kept():
    old = with_adapters()
    layer = multi_lora.lora_layers(old)[0]
    both(old, ["a", "c"], torch.randint(0, 600, (2, 4)))  # builds the stacks
    stacks = weakref.ref(layer.__dict__["_lorakit_stacks"]["a"])
    del old, layer
    gc.collect()
    assert multi_lora.supported(with_adapters())  # the next model looked up drops what the freed one left
    gc.collect()
    assert stacks() is None


@pytest.mark.parametrize("extra", [{"use_dora": True}, {"lora_bias": True}])
def test_what_it_cannot_compute_is_left_to_peft(extra):
    assert not multi_lora.supported(with_adapters(**extra))


def test_an_adapter_reloaded_under_its_name_as_dora_is_left_to_peft():
    net = with_adapters()
    assert multi_lora.supported(net)
    net.delete_adapter("c")  # the last one: added again, the names are as they were
    net.add_adapter("c", LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    assert tuple(net.peft_config) == ("a", "b", "c") and not multi_lora.supported(net)
