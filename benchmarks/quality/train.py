"""Pretrain the tiny base model and train one OFT and one LoRA adapter per task, with a cache.

Everything is seeded; trained artefacts live under ``benchmarks/quality/.cache/<hash>/`` where
the hash covers every setting that influences them, so a re-run with the same settings only
redoes the merges. The base is a Llama-style causal LM (``LlamaForCausalLM``) built from a config.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import data

CACHE_ROOT = Path(__file__).resolve().parent / ".cache"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of the trained artefacts (the cache key is a hash of this)."""

    seed: int = 0
    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    pretrain_steps: int = 1500
    pretrain_lr: float = 3e-3
    task_fraction: float = 0.1
    batch: int = 64
    adapter_steps: int = 400
    adapter_replay: float = 0.5  # fraction of each adapter batch drawn from the pretraining mixture
    oft_lr: float = 2e-2
    oft_block_size: int = 16
    lora_lr: float = 3e-3
    lora_r: int = 8
    lora_alpha: int = 16
    tasks: tuple[str, ...] = data.TASKS
    version: int = 1  # bump when the training code changes meaning

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def model_config(cfg: TrainConfig):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=data.VOCAB_SIZE,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=data.TOTAL_LEN,
        tie_word_embeddings=False,
        pad_token_id=data.PAD,
        bos_token_id=data.BOS,
        eos_token_id=data.EOS,
    )


def _loss(model, batch: data.Batch) -> torch.Tensor:
    logits = model(input_ids=batch.input_ids).logits[:, :-1]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1), ignore_index=-100
    )


def train_loop(model, batch_fn: Callable[[torch.Generator], data.Batch], steps: int, lr: float, seed: int) -> float:
    """AdamW with linear warm-up and cosine decay on the trainable parameters; returns final loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    gen = torch.Generator().manual_seed(seed)
    model.train()
    ema = None
    for _ in range(steps):
        loss = _loss(model, batch_fn(gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
    model.eval()
    return float(ema if ema is not None else float("nan"))


def _adapter_batch(cfg: TrainConfig, task: str, g: torch.Generator) -> data.Batch:
    """A batch of ``task`` with ``adapter_replay`` of its rows replaced by the pretraining mixture.

    Replay keeps a tiny model from forgetting everything else while it learns one task (a large
    LLM fine-tuned on one domain keeps most of its other skills; a 2-layer model does not).
    """
    n_replay = round(cfg.batch * cfg.adapter_replay)
    parts = [data.task_batch(task, cfg.batch - n_replay, g, cfg.seed)]
    if n_replay:
        parts.append(data.mixture_batch(n_replay, g, cfg.seed, cfg.task_fraction, cfg.tasks))
    return data.Batch(torch.cat([p.input_ids for p in parts]), torch.cat([p.labels for p in parts]))


@dataclass
class Artifacts:
    """Paths of the trained base and adapters (all local directories)."""

    root: Path
    base: Path
    oft: dict[str, Path] = field(default_factory=dict)
    lora: dict[str, Path] = field(default_factory=dict)
    log: dict = field(default_factory=dict)


def load_base(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def _adapter_config(kind: str, cfg: TrainConfig):
    from peft import LoraConfig, OFTConfig

    if kind == "oft":
        return OFTConfig(r=0, oft_block_size=cfg.oft_block_size, target_modules=TARGETS, task_type="CAUSAL_LM")
    return LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"
    )


def prepare(cfg: TrainConfig, cache_root: Path = CACHE_ROOT, verbose: bool = True) -> Artifacts:
    """Train (or find in the cache) the base model and every adapter of ``cfg``."""
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    say = print if verbose else (lambda *a, **k: None)
    root = cache_root / cfg.key()
    root.mkdir(parents=True, exist_ok=True)
    log_path = root / "train_log.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else {"config": asdict(cfg)}
    arts = Artifacts(root=root, base=root / "base", log=log)

    if not (arts.base / "config.json").exists():
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(model_config(cfg))
        loss = train_loop(
            model,
            lambda g: data.mixture_batch(cfg.batch, g, cfg.seed, cfg.task_fraction, cfg.tasks),
            cfg.pretrain_steps,
            cfg.pretrain_lr,
            cfg.seed,
        )
        model.save_pretrained(arts.base)
        log["pretrain"] = {"loss": loss, "seconds": time.perf_counter() - t0}
        say(f"pretrained base: loss {loss:.3f} in {log['pretrain']['seconds']:.1f}s")
    for kind, lr in (("oft", cfg.oft_lr), ("lora", cfg.lora_lr)):
        for i, task in enumerate(cfg.tasks):
            out = root / kind / task
            getattr(arts, kind)[task] = out
            if (out / "adapter_config.json").exists():
                continue
            t0 = time.perf_counter()
            torch.manual_seed(cfg.seed + 1 + i)
            peft_model = get_peft_model(load_base(arts.base), _adapter_config(kind, cfg))
            loss = train_loop(
                peft_model,
                lambda g, t=task: _adapter_batch(cfg, t, g),
                cfg.adapter_steps,
                lr,
                cfg.seed + 100 + i,
            )
            peft_model.save_pretrained(out)
            log[f"{kind}/{task}"] = {"loss": loss, "seconds": time.perf_counter() - t0}
            say(f"trained {kind} adapter {task}: loss {loss:.3f} in {log[f'{kind}/{task}']['seconds']:.1f}s")
    log_path.write_text(json.dumps(log, indent=2) + "\n")
    return arts
