"""YAML merge recipes: validation (pydantic) and execution through the public Python API.

A recipe describes one merge::

    kind: oft                  # oft | lora | full | mixed
    base_model: path-or-hub-id # required for lora, full, and folded oft output
    inputs:
      - path: ./oft-math
        weight: 2.0            # optional, default 1 (weights are normalised to sum to 1)
      - path: org/oft-code
    method:
      name: orthomerge         # oft: any registered method (ops.registry.method_names())
      granularity: module      # other keys map one to one onto the Python API's keywords
    output:
      path: ./merged
      format: adapter          # oft: adapter | folded; lora: model | lora; full: model

Method keys per kind (defaults in brackets):

- ``oft`` -> `merge_oft_checkpoints`: ``name`` [orthomerge] (passed as ``method``; a rotation
  method, or for ``format: folded`` any method: ``method_names()`` of `peft_orthomerge.ops.registry`),
  ``granularity`` [module], ``cayley`` [auto], ``scale`` [1.0].
- ``lora`` -> `merge_lora_adapters`; ``full`` -> `merge_models`: ``name`` [orthomerge] or
  ``euclidean`` (no rotation: ``target=None``), ``target`` [global] (global | conflict),
  ``residual`` [ta] (a Euclidean method, ``method_names("euclidean")``), ``residual_kwargs``
  [none] (the method's declared parameters, checked by `check_params` when the recipe is parsed,
  plus ``seed``), ``solver`` [auto], ``precision`` [float64] (float64 | float32: the compute
  dtype; float64 for a decoupled weight too ill-conditioned for float32); ``lora`` also ``rank`` (required for ``format: lora``); ``full`` also ``include`` /
  ``exclude`` (regexes).

Paths: relative paths resolve against the recipe file's directory. Inputs and ``base_model`` may
be local directories (absolute, or relative with ``..``) or Hub repo ids. The output path of a
recipe must stay inside the recipe's directory (no absolute path, no ``..`` escape), so that a
recipe received from someone else cannot write, or with ``--overwrite`` replace, a directory
elsewhere; the command line's ``--out`` (typed by the user) is not restricted.

Modules: `schema` (pydantic models), `errors` (a pydantic error as one line), `load` (parse, load,
write YAML), `plan` (`plan_recipe`: checks and the API call), `run` (`run_recipe`: execution),
`preview` / `preview_kinds` (`preview_plan`: the header-level checks and summary of ``--dry-run``),
`templates` (`recipe_template`: ``peft-orthomerge new KIND``).
"""

from __future__ import annotations

from .load import load_recipe, parse_recipe, recipe_to_yaml
from .plan import MergePlan, plan_recipe
from .run import MULTI_PROCESS_FUNCTIONS, RECIPE_FILE, run_recipe
from .schema import (
    DecoupleMethod,
    FullMethod,
    FullOutput,
    FullRecipe,
    InputSpec,
    LoraMethod,
    LoraOutput,
    LoraRecipe,
    OftMethod,
    OftOutput,
    OftRecipe,
    Precision,
    Recipe,
)

__all__ = [
    "MULTI_PROCESS_FUNCTIONS",
    "RECIPE_FILE",
    "DecoupleMethod",
    "FullMethod",
    "FullOutput",
    "FullRecipe",
    "InputSpec",
    "LoraMethod",
    "LoraOutput",
    "LoraRecipe",
    "MergePlan",
    "OftMethod",
    "OftOutput",
    "OftRecipe",
    "Precision",
    "Recipe",
    "load_recipe",
    "parse_recipe",
    "plan_recipe",
    "recipe_to_yaml",
    "run_recipe",
]
