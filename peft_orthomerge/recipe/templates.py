"""``peft-orthomerge new KIND``: a commented recipe template per kind, valid as printed.

Method names in the comments are read from the registry (`ops.registry.method_names`), so a
template lists what this version accepts. Every template parses with `recipe.parse_recipe`
(tests check it); the paths are placeholders to edit.
"""

from __future__ import annotations

OFT = """\
# OFT adapters merged in so(b) with magnitude correction (peft-orthomerge merge THIS.yaml).
# Relative paths resolve against this file's directory; check with --dry-run before a long merge.
kind: oft
base_model: ./base          # optional for format: adapter (recorded in the card); required for folded
inputs:
  - path: ./oft-task-a      # a PEFT OFT adapter directory or a Hub repo id
    weight: 1.0             # optional, default 1; weights are normalised to sum to 1
  - path: ./oft-task-b
method:
  name: orthomerge          # {rotation} (mean_r: folded only); folded also: {euclidean}
  granularity: module       # module | block: what the magnitude correction takes norms over
  cayley: auto              # auto | exact | neumann: the merged adapter's use_cayley_neumann
  scale: 1.0                # multiplies the merged skew generators
output:
  path: ./merged-oft        # must stay inside this file's directory (or pass --out)
  format: adapter           # adapter (a PEFT OFT adapter) | folded (a full model, needs base_model)
"""

DECOUPLE_METHOD = """\
  name: orthomerge          # orthomerge | euclidean (no rotation: the plain baseline)
  target: global            # global | conflict
  residual: ta              # {euclidean}
  residual_kwargs: {{}}       # the residual method's parameters (peft-orthomerge methods), plus seed
  solver: auto              # auto | svd | eigh | newton_schulz
  precision: float64        # float64 (the reference) | float32 (faster, half the memory)
"""

LORA = """\
# LoRA adapters merged by orthogonal-residual decoupling (peft-orthomerge merge THIS.yaml).
# Relative paths resolve against this file's directory; check with --dry-run before a long merge.
kind: lora
base_model: ./base          # required: the model the adapters were trained on
inputs:
  - path: ./lora-task-a     # a PEFT LoRA adapter directory or a Hub repo id
    weight: 1.0             # optional, default 1; weights are normalised to sum to 1
  - path: ./lora-task-b
method:
{decouple_method}  # rank: 16                # required for format: lora
output:
  path: ./merged-lora       # must stay inside this file's directory (or pass --out)
  format: model             # model (merged weights, transformers) | lora (a LoRA adapter; set method.rank)
"""

FULL = """\
# Full fine-tunes of one base merged by orthogonal-residual decoupling, streamed tensor by tensor.
# Relative paths resolve against this file's directory; check with --dry-run before a long merge.
kind: full
base_model: ./base          # required: the common base checkpoint
inputs:
  - path: ./finetune-a      # a checkpoint directory (safetensors) or a Hub repo id
    weight: 1.0             # optional, default 1; weights are normalised to sum to 1
  - path: ./finetune-b
method:
{decouple_method}  # include: "layers"       # regexes over tensor names: which 2-D tensors are decoupled
  # exclude: "lm_head"
  # rank: 16                # required for format: lora
output:
  path: ./merged-full       # must stay inside this file's directory (or pass --out)
  format: model             # model (merged weights, safetensors shards) | lora (a LoRA adapter instead; set method.rank)
"""

MIXED = (
    FULL.replace(
        "# Full fine-tunes of one base merged by orthogonal-residual decoupling, streamed tensor by tensor.",
        "# Full fine-tunes, LoRA and OFT adapters of one base merged by orthogonal-residual decoupling, streamed;\n"
        "# each adapter is read as the checkpoint PEFT makes of the base (its own fold); an OFT adapter\n"
        "# brings its exact rotation instead of a Procrustes fit.",
    )
    .replace("kind: full", "kind: mixed")
    .replace(
        "  - path: ./finetune-b", "  - path: ./lora-b         # a LoRA adapter directory (or Hub id) of the same base"
    )
)

TEMPLATES = {"oft": OFT, "lora": LORA, "full": FULL, "mixed": MIXED}


def recipe_template(kind: str) -> str:
    """The commented template of ``kind`` (``oft``, ``lora``, ``full`` or ``mixed``), method names from the registry."""
    from ..ops.registry import method_names

    names = {family: " | ".join(method_names(family)) for family in ("rotation", "euclidean")}
    method = DECOUPLE_METHOD.format(**names)
    return TEMPLATES[kind].format(decouple_method=method, **names)
