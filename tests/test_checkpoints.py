"""The verified checkpoint loader (iclsft.sft.checkpoints) on the tiny Llama of conftest: a checkpoint is
used only when its marker exists and every file matches it; a LoRA adapter attached to a base gives
peft's own model and leaves the base bit for bit as it was; a full fine-tune loads its own weights."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_llama

from iclsft.sft.adapters import MARKER, save_checkpoint
from iclsft.sft.checkpoints import is_lora, load_checkpoint, verify_checkpoint

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.tensor([[1, 17, 230, 5, 99, 42]])


def lora_model(vocab: int):
    """A LoRA adapter with random (non-zero) weights on the attention projections of a fresh tiny Llama."""
    torch.manual_seed(7)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return peft.get_peft_model(make_tiny_llama(vocab), config)


@pytest.fixture(scope="module")
def lora_dir(smollm_tokenizer, tmp_path_factory):
    return save_checkpoint(lora_model(len(smollm_tokenizer)), tmp_path_factory.mktemp("ckpt") / "lora", {"key": "k"})


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_verify_returns_the_marker_of_a_finished_checkpoint(lora_dir):
    marker = verify_checkpoint(lora_dir)
    assert marker["key"] == "k"
    assert sorted(marker["files"]) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert is_lora(lora_dir)


def test_verify_refuses_missing_unfinished_and_damaged_checkpoints(lora_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"checkpoint {tmp_path / 'none'} does not exist"):
        verify_checkpoint(tmp_path / "none")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=f"checkpoint {tmp_path / 'half'} is unfinished \\(no {MARKER}\\)"):
        verify_checkpoint(tmp_path / "half")
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(lora_dir, damaged)
    weights = damaged / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # same size, one bit
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError) as e:
        verify_checkpoint(damaged)
    assert str(e.value) == (f"checkpoint {damaged} is damaged (adapter_model.safetensors missing or not matching "
                            f"the checksum in {MARKER}); delete it and the conditions scored with it, then rerun "
                            "the sft arm")
    with pytest.raises(ValueError, match="is damaged"), load_checkpoint(make_tiny_llama(8), damaged):
        pass  # never reached: the check comes before any loading


def test_lora_checkpoint_gives_peft_s_model_and_leaves_the_base_untouched(lora_dir, smollm_tokenizer):
    vocab = len(smollm_tokenizer)
    reference = lora_model(vocab).eval()  # the model that was saved, built again the same way
    want = logits(reference)
    base = make_tiny_llama(vocab).eval()
    plain = logits(base)
    weights = {name: p.clone() for name, p in base.named_parameters()}
    assert (want - plain).abs().max() > 1e-2  # the adapter matters
    with load_checkpoint(base, lora_dir) as model:
        assert not model.training
        torch.testing.assert_close(logits(model), want, rtol=0, atol=1e-5)
    # out again: the same parameters, bit for bit, and no LoRA module left in the base
    assert {name: p for name, p in base.named_parameters()}.keys() == weights.keys()
    assert all(torch.equal(p, weights[name]) for name, p in base.named_parameters())
    assert not any("lora" in name for name, _ in base.named_modules())
    torch.testing.assert_close(logits(base), plain, rtol=0, atol=0)


def test_full_checkpoint_loads_its_own_weights(smollm_tokenizer, tiny_model_dir, tmp_path):
    vocab = len(smollm_tokenizer)
    tuned = make_tiny_llama(vocab, seed=3).eval()
    path = save_checkpoint(tuned, tmp_path / "full", {"key": "f"}, tokenizer_dir=tiny_model_dir)
    assert not is_lora(path) and json.loads((path / MARKER).read_text())["key"] == "f"
    base = make_tiny_llama(vocab, seed=0).eval()
    assert (logits(base) - logits(tuned)).abs().max() > 1e-2
    with load_checkpoint(base, path) as model:
        torch.testing.assert_close(logits(model), logits(tuned), rtol=0, atol=0)
        assert model is not base
