"""``python -m peft_orthomerge demo``: merge three OFT adapters of a tiny Llama end to end, offline.

Builds a tiny Llama (GQA, hidden 64) and three OFT adapters with distinct random rotations in a
temporary directory, merges them with `merge_oft_adapters`, saves the result with PEFT's
``save_pretrained``, reloads it with ``PeftModel.from_pretrained``, and compares its logits with
a model whose weights were folded independently: dense ``W0 @ blockdiag(R)^T`` built with
``torch.block_diag`` from the saved merged vectors (not PEFT's merge).
"""

from __future__ import annotations

import json
import tempfile
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _make_adapter(path: Path, seed: int, targets: list[str]) -> Path:
    from peft import OFTConfig, get_peft_model

    model = _tiny_llama()
    torch.manual_seed(seed)
    config = OFTConfig(r=0, oft_block_size=16, target_modules=targets, init_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "oft_R" in name:
                param.mul_(0.3)  # "trained" rotations of moderate size
    peft_model.save_pretrained(path)
    return path


def _dense_fold(base, adapter_dir: Path):
    """Fold a saved OFT adapter into ``base`` densely: ``W0 @ blockdiag(R)^T`` (float64 math)."""
    from safetensors.torch import load_file

    from .ops.skew import peft_rotation, to_canonical, vec_to_skew

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    flag, terms = config["use_cayley_neumann"], config["num_cayley_neumann_terms"]
    state = base.state_dict()
    for key, vec in load_file(adapter_dir / "adapter_model.safetensors").items():
        name = key.removeprefix("base_model.model.").removesuffix(".oft_R.weight")
        rotation = peft_rotation(vec_to_skew(to_canonical(vec, flag)), flag, terms)
        dense = torch.block_diag(*rotation)
        weight = state[f"{name}.weight"]
        state[f"{name}.weight"] = (weight.double() @ dense.T).to(weight.dtype)
    base.load_state_dict(state)
    return base


def _work_dir(keep: str | Path | None):
    """A temporary directory (removed after), or ``keep`` (created; must be new or empty), left in place."""
    if keep is None:
        return tempfile.TemporaryDirectory(prefix="orthomerge-demo-")
    from .errors import ConfigError

    directory = Path(keep).expanduser().resolve()
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ConfigError("the demo's --keep directory must be new or empty", path=directory)
    directory.mkdir(parents=True, exist_ok=True)
    return nullcontext(str(directory))


def run_demo(keep: str | Path | None = None) -> float:
    """Run the demo, print the report and the logit difference; return the max |difference|.

    ``keep``: a new or empty directory that keeps the demo's inputs (``base``: the tiny Llama,
    ``oft-task-a/b/c``) and output (``merged``); by default everything lives in a temporary directory."""
    from peft import PeftModel

    from .api.oft import merge_oft_adapters
    from .progress import quiet

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    with _work_dir(keep) as tmp, quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecation notices from transformers internals
        tmp = Path(tmp)
        print("Building a tiny Llama (hidden 64, GQA) and three OFT adapters (block size 16) ...")
        adapters = [
            _make_adapter(tmp / "oft-task-a", 1, TARGETS),
            _make_adapter(tmp / "oft-task-b", 2, TARGETS),
            _make_adapter(tmp / "oft-task-c", 3, ["q_proj", "v_proj", "up_proj", "down_proj"]),
        ]
        merged = merge_oft_adapters(_tiny_llama(), [str(a) for a in adapters], weights=[0.5, 0.3, 0.2])
        print(merged.orthomerge_report)
        merged.save_pretrained(tmp / "merged")
        saved = tmp / "merged"
        reloaded = PeftModel.from_pretrained(_tiny_llama(), saved).eval()
        folded = _dense_fold(_tiny_llama(), saved)
        ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ours, reference = reloaded(ids).logits, folded(ids).logits
            base = _tiny_llama()(ids).logits
        diff = float((ours - reference).abs().max())
        print(f"\nReloaded merged adapter vs independently folded weights: max |logit difference| = {diff:.3e}")
        print(f"(for scale: max |logit change| caused by the merged adapter = {float((ours - base).abs().max()):.3e})")
        if keep is not None:
            _tiny_llama().save_pretrained(tmp / "base")
            print(f"\nkept in {tmp}: base (tiny Llama), oft-task-a, oft-task-b, oft-task-c (inputs), merged (output)")
        return diff
