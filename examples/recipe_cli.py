"""Recipe via the CLI: build tiny local inputs, copy a recipe next to them, merge, inspect, report, reproduce.

Runs offline in a few seconds:  python examples/recipe_cli.py [WORKDIR]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

RECIPES = Path(__file__).resolve().parent / "recipes"


def build_inputs(workdir: Path) -> None:
    """A tiny Llama base and two OFT adapters ("math", "code") with random rotations."""
    from peft import OFTConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(config).save_pretrained(workdir / "base")
    for seed, name in enumerate(["oft-math", "oft-code"]):
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(workdir / "base"),
            OFTConfig(oft_block_size=8, r=0, target_modules=["q_proj", "v_proj", "up_proj"]),
        )
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if "oft_R" in pname:
                    param.copy_(0.05 * torch.randn(param.shape, generator=gen))
        model.save_pretrained(workdir / name)


def cli(*args: str) -> None:
    command = [sys.executable, "-m", "peft_orthomerge", *args]
    print("$ peft-orthomerge " + " ".join(args), flush=True)
    subprocess.run(command, check=True)


def main(workdir: Path) -> None:
    torch.set_num_threads(1)
    build_inputs(workdir)
    shutil.copy(RECIPES / "oft_adapter.yaml", workdir / "oft_adapter.yaml")
    cli("merge", str(workdir / "oft_adapter.yaml"))  # add --dry-run to only validate and print the plan
    cli("inspect", str(workdir / "oft-math"), str(workdir / "oft-code"))
    cli("report", str(workdir / "merged-adapter"))
    # the output records its recipe: reproduce the merge from it
    cli(
        "merge",
        str(workdir / "merged-adapter" / "orthomerge_recipe.yaml"),
        "--out",
        str(workdir / "reproduced"),
        "--quiet",
    )
    print((workdir / "merged-adapter" / "README.md").read_text()[:400])


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
