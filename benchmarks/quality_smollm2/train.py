"""Train one OFT and one LoRA adapter per task on SmolLM2-135M-Instruct; cached and resumable.

Artefacts live under ``<cache>/replica/<kind>-<key>/<task>/`` where ``<cache>`` is
`benchmarks.real_model.cache_root` (``$PEFT_ORTHOMERGE_SMOLLM2_CACHE``, default
``~/.cache/peft-orthomerge/smollm2``) and the key hashes every setting that shapes that kind's adapters (`TrainConfig.key`).
Every ``save_every`` steps the adapter, the optimiser and scheduler states, the step and the
generator state are written to ``<task>/checkpoint/`` (atomically); an interrupted run resumes from
there, a finished adapter (``<task>/adapter/`` plus ``done.json``) is skipped.

Run (a later session does the long runs)::

    python -m benchmarks.quality_smollm2.run --plan            # what would be trained, nothing runs
    python -m benchmarks.quality_smollm2.run --train --smoke   # seconds: 2 layers, 3 steps per adapter
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.real_model import cache_root, smollm2_dir

from . import tasks

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of the trained adapters (the cache key is a hash of this)."""

    seed: int = 0
    layers: int | None = None  # None: all 30; the smoke run uses 2
    tasks: tuple[str, ...] = tasks.REPLICA_TASKS
    kinds: tuple[str, ...] = ("oft", "lora")
    train_examples: int = 1200
    steps: int = 150
    batch: int = 8  # 16 doubled the time per step; on 2 shared cores the whole run had to fit one session
    oft_lr: float = 5e-4  # 2e-3 solved `add` (EM 0.78) but wrecked the rest (perplexity 24 -> 3066)
    oft_block_size: int = 32
    lora_lr: float = 1e-3
    lora_r: int = 8
    lora_alpha: int = 16
    save_every: int = 25
    log_every: int = 10
    version: int = 2  # bump when the training code changes meaning

    def key(self, kind: str) -> str:
        """Hash of the settings that shape a ``kind`` adapter (the other kind's settings, the task
        list and the logging / checkpoint cadence left out, so changing them retrains nothing)."""
        other = "lora_" if kind == "oft" else "oft_"
        settings = {
            k: v
            for k, v in asdict(self).items()
            if not k.startswith(other) and k not in ("tasks", "kinds", "save_every", "log_every")
        }
        return hashlib.sha256(json.dumps({"kind": kind, **settings}, sort_keys=True).encode()).hexdigest()[:12]


def adapter_root(cfg: TrainConfig, kind: str, cache: Path | None = None) -> Path:
    """``<cache>/replica/<kind>-<key>``: the ``kind`` adapters of ``cfg``, one subdirectory per task."""
    return (cache or cache_root()) / "replica" / f"{kind}-{cfg.key(kind)}"


def adapter_config(kind: str, cfg: TrainConfig):
    from peft import LoraConfig, OFTConfig

    if kind == "oft":
        return OFTConfig(r=0, oft_block_size=cfg.oft_block_size, target_modules=TARGETS, task_type="CAUSAL_LM")
    if kind == "lora":
        return LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"
        )
    raise ValueError(f"unknown adapter kind {kind!r}")


def batches(tokenizer, task: str, cfg: TrainConfig) -> list[tuple[torch.Tensor, ...]]:
    """The training set of ``task`` as right-padded ``(input_ids, labels, attention_mask)`` batches;
    the loss is on the answer tokens only."""
    encoded = [tasks.encode(tokenizer, p, a) for p, a in tasks.examples(task, cfg.train_examples, cfg.seed)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for i in range(0, len(encoded), cfg.batch):
        chunk = encoded[i : i + cfg.batch]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad)
        labels = torch.full((len(chunk), width), -100)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (seq, start) in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq)
            labels[row, start : len(seq)] = torch.tensor(seq[start:])
            mask[row, : len(seq)] = 1
        out.append((ids, labels, mask))
    return out


def answer_loss(model, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens (teacher forcing).

    The vocabulary projection (49152 x 576, a quarter of a step's work) runs on the positions
    that predict an answer token only; the loss equals the full-logits one."""
    causal_lm = model.get_base_model()
    hidden = causal_lm.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    scored = targets != -100
    logits = causal_lm.lm_head(hidden[scored])
    return torch.nn.functional.cross_entropy(logits, targets[scored])


def _optimiser(model, lr: float, steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    return params, opt, sched


def save_checkpoint(peft_model, opt, sched, step: int, rng: random.Random, path: Path) -> None:
    """Adapter + optimiser + scheduler + step + batch order state, written to a sibling and renamed."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(tmp / "adapter")
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict(), "step": step}, tmp / "state.pt")
    (tmp / "rng.json").write_text(json.dumps(rng.getstate()))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def load_checkpoint(peft_model, opt, sched, rng: random.Random, path: Path) -> int:
    """Restore a `save_checkpoint` into the objects; returns the step to continue from (0 if none)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if not (path / "state.pt").is_file():
        return 0
    set_peft_model_state_dict(peft_model, load_file(path / "adapter" / "adapter_model.safetensors"))
    state = torch.load(path / "state.pt", weights_only=True)
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    version, internal, gauss = json.loads((path / "rng.json").read_text())
    rng.setstate((version, tuple(internal), gauss))
    return int(state["step"])


def train_adapter(kind: str, task: str, cfg: TrainConfig, base: Path, out: Path, say=print) -> Path:
    """Train (or resume, or find finished) the ``kind`` adapter of ``task``; returns its directory."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "done.json").is_file():
        return out / "adapter"
    torch.manual_seed(cfg.seed)  # the adapter's initialisation
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, adapter_config(kind, cfg))
    params, opt, sched = _optimiser(peft_model, cfg.oft_lr if kind == "oft" else cfg.lora_lr, cfg.steps)
    data = batches(AutoTokenizer.from_pretrained(base), task, cfg)
    rng = random.Random(f"{cfg.seed}/{kind}/{task}")
    step = load_checkpoint(peft_model, opt, sched, rng, out / "checkpoint")
    start, loss = time.perf_counter(), float("nan")
    peft_model.train()
    while step < cfg.steps:
        batch_loss = answer_loss(peft_model, *data[rng.randrange(len(data))])
        opt.zero_grad(set_to_none=True)
        batch_loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step, loss = step + 1, float(batch_loss.detach())
        if step % cfg.log_every == 0:
            say(f"{kind}/{task}: step {step}/{cfg.steps}, loss {loss:.3f}, {time.perf_counter() - start:.0f} s")
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_checkpoint(peft_model, opt, sched, step, rng, out / "checkpoint")
    peft_model.save_pretrained(out / "adapter")
    (out / "done.json").write_text(json.dumps({"loss": loss, "seconds": time.perf_counter() - start}) + "\n")
    shutil.rmtree(out / "checkpoint", ignore_errors=True)
    return out / "adapter"


def finished(cfg: TrainConfig, cache: Path | None = None) -> dict[str, dict[str, Path]]:
    """The adapters of ``cfg`` that are trained already (``{kind: {task: adapter directory}}``)."""
    roots = {kind: adapter_root(cfg, kind, cache) for kind in cfg.kinds}
    return {
        kind: {t: root / t / "adapter" for t in cfg.tasks if (root / t / "done.json").is_file()}
        for kind, root in roots.items()
    }


def prepare(cfg: TrainConfig, cache: Path | None = None, say=print) -> dict[str, dict[str, Path]]:
    """Every adapter of ``cfg``: ``{kind: {task: adapter directory}}``, training what is missing."""
    base = smollm2_dir(cfg.layers)
    adapters: dict[str, dict[str, Path]] = {kind: {} for kind in cfg.kinds}
    for kind in cfg.kinds:
        root = adapter_root(cfg, kind, cache)
        root.mkdir(parents=True, exist_ok=True)
        (root / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    for task in cfg.tasks:  # task-major: an interrupted run has both kinds of the first tasks
        for kind in cfg.kinds:
            adapters[kind][task] = train_adapter(kind, task, cfg, base, adapter_root(cfg, kind, cache) / task, say)
    return adapters
