"""The `vllm serve` command's --max-lora-rank: vLLM takes a few values for it, and an adapter loads when its rank is
at most the value given, so every rank up to the largest is served under the smallest value covering them all."""

import pytest
from peft import LoraConfig

from lorakit.errors import LorakitError
from lorakit.export import vllm


def adapter(folder, r: int, rank_pattern: dict | None = None):
    """An adapter folder as vLLM reads one before its weights: peft's adapter_config.json alone."""
    LoraConfig(r=r, target_modules=["q_proj", "v_proj"], rank_pattern=rank_pattern or {}).save_pretrained(folder)
    return folder


def max_lora_rank(tmp_path, *ranks: int) -> str:
    adapters = {f"a{k}": adapter(tmp_path / f"a{k}", r) for k, r in enumerate(ranks)}
    cmd = vllm.command("org/base", adapters)
    return cmd[cmd.index("--max-lora-rank") + 1]


@pytest.mark.parametrize(
    ("ranks", "flag"), [((4,), "8"), ((4, 16), "16"), ((20,), "32"), ((8, 64), "64"), ((300,), "320"), ((512,), "512")]
)
def test_the_smallest_max_lora_rank_that_covers_every_adapter(tmp_path, ranks, flag):
    assert max_lora_rank(tmp_path, *ranks) == flag


def test_a_rank_pattern_counts_and_only_ranks_above_vllms_largest_are_refused(tmp_path):
    cmd = vllm.command("org/base", {"mixed": adapter(tmp_path / "mixed", 8, {"q_proj": 24})})
    assert cmd[cmd.index("--max-lora-rank") + 1] == "32", "the pattern's rank 24 needs 32"
    with pytest.raises(LorakitError, match="big: rank 1024 is above 512, the largest vLLM's --max-lora-rank takes"):
        vllm.command("org/base", {"small": adapter(tmp_path / "small", 4), "big": adapter(tmp_path / "big", 1024)})
