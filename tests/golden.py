"""Golden set: tensor hashes of one merge per method and path, every example and the demo.

Recorded before the pipeline was restructured (issue 12) so that a refactor proves it changed no
output bit. ``python tests/golden.py --record`` rewrites ``tests/golden/hashes.json`` (do that only
for an intended change of result, and say why in the commit); ``tests/test_golden.py`` replays
every case and compares.

Each case returns ``{tensor name: sha256 of dtype, shape and bytes}``: of every safetensors file
in an output directory, or of an in-memory model's ``state_dict``. Hashes are bit-exact, so they
hold for the machine type they were recorded on, and the test skips where no recording matches.

The same torch and CPU capability are not enough to name a machine type: oneMKL picks its kernels by CPU model, and two
AVX-512 machines gave different bits in 12 of the cases (session 11). So each recording also
carries `kernel_fingerprint`, the bits a few BLAS / LAPACK calls return on fixed inputs, and lives
in its own file ``tests/golden/hashes-<fingerprint>.json``. The test replays the recording whose
environment equals this machine's; ``tests/golden/hashes.json``, recorded before fingerprints were,
serves a machine with its torch and capability that has no recording of its own.

``--record`` (an intended change of result) writes this machine's recording and deletes the others,
which no longer describe the code. ``--record-machine`` adds this machine's recording beside the
others, for unchanged code on another machine type (say so in the commit).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import runpy
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GOLDEN_DIR = HERE / "golden"
sys.path.insert(0, str(HERE))

from conftest import build_tiny_llama

Hashes = dict[str, str]
OFT_ADAPTER_METHODS = {
    "orthomerge": {},
    "orthomerge_block": {"granularity": "block"},
    "mean_q": {"method": "mean_q"},
    "product_r": {"method": "product_r"},
    "karcher": {"method": "karcher"},
    "orthomerge_exact_scaled": {"cayley": "exact", "scale": 0.5},
    "orthomerge_neumann": {"cayley": "neumann"},
}
OFT_FOLDED_METHODS = ("orthomerge", "mean_r", "ta", "ties", "dare_ta", "dare_ties", "tsvm", "fisher_rao", "karcher")
RESIDUALS = ("ta", "ties", "dare_ta", "dare_ties", "tsvm", "fisher_rao")
TARGETS = ("global", "conflict")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def kernel_fingerprint() -> str:
    """The first 12 hex digits of a sha256 of what matrix products and LAPACK factorizations (the
    calls the merges make: SVD, eigh, QR and Householder products, LU and solves, Cholesky; and the
    Bernoulli draws of DARE) return on fixed float32 and float64 inputs of three sizes, on one
    thread: machines whose math libraries run other kernels give other bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(0)
        digest = hashlib.sha256()
        for dtype, n in itertools.product((torch.float32, torch.float64), (24, 192, 520)):
            tall = torch.randn(2 * n, n, generator=gen, dtype=dtype)
            square = torch.randn(n, n, generator=gen, dtype=dtype)
            gram = tall.T @ tall
            h, tau = torch.geqrf(tall)
            outputs = [
                tall @ square,
                gram,
                *torch.linalg.svd(square),
                torch.linalg.svd(tall, full_matrices=False).U,
                *torch.linalg.eigh(gram),
                torch.linalg.qr(tall).Q,
                torch.linalg.householder_product(h, tau),
                torch.ormqr(h, tau, square.T.contiguous().repeat(2, 1), left=True),
                *torch.linalg.lu_factor(square),
                torch.linalg.solve(square, tall.T),
                torch.linalg.cholesky(gram),
                torch.bernoulli(torch.full((n, n), 0.3, dtype=dtype), generator=gen),  # DARE's masks
            ]
            for t in outputs:
                digest.update(t.contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:12]
    finally:
        torch.set_num_threads(threads)


def environment() -> dict[str, str]:
    return {
        "torch": torch.__version__.split("+")[0],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "kernels": kernel_fingerprint(),
    }


def recording_file(env: dict[str, str]) -> Path:
    return GOLDEN_DIR / f"hashes-{env['kernels']}.json"


def recordings() -> list[dict]:
    """Every recording: ``{"environment": ..., "cases": {case: hashes}}``."""
    return [json.loads(p.read_text()) for p in sorted(GOLDEN_DIR.glob("hashes*.json"))]


def matching_recording(env: dict[str, str]) -> dict | None:
    """The recording made on this machine type (``env`` equal), else the one recorded before kernel
    fingerprints with ``env``'s torch and CPU capability, else ``None``."""
    found = recordings()
    for rec in found:
        if rec["environment"] == env:
            return rec
    legacy = {k: v for k, v in env.items() if k != "kernels"}
    return next((rec for rec in found if rec["environment"] == legacy), None)


def tensor_hash(tensor: torch.Tensor) -> str:
    t = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:20]


def hash_state(state: dict[str, torch.Tensor], prefix: str = "") -> Hashes:
    return {f"{prefix}{k}": tensor_hash(v) for k, v in sorted(state.items())}


def hash_dir(directory: Path, prefix: str = "") -> Hashes:
    from safetensors.torch import load_file

    out: Hashes = {}
    for file in sorted(Path(directory).rglob("*.safetensors")):
        rel = file.relative_to(directory).as_posix()
        out.update(hash_state(load_file(file), f"{prefix}{rel}:"))
    return out


# -- inputs ----------------------------------------------------------------------------------------
class Inputs:
    """Tiny inputs built once per run (seeded; identical on every run)."""

    def __init__(self, root: Path) -> None:
        from _lora_utils import make_lora_adapter, perturbed_state
        from _oft_utils import make_oft_adapter

        self.root = root
        self.base = root / "base"
        build_tiny_llama().save_pretrained(self.base)
        self.oft = [
            make_oft_adapter(root / "oft-a", seed=1, neumann=True),
            make_oft_adapter(
                root / "oft-b", seed=2, neumann=False, targets=("q_proj", "v_proj", "down_proj", "up_proj")
            ),
            make_oft_adapter(root / "oft-c", seed=3, neumann=True, targets=("q_proj", "k_proj", "o_proj")),
        ]
        self.lora = [
            root / "lora-a",
            root / "lora-b",
            root / "lora-c",
        ]
        make_lora_adapter(build_tiny_llama, self.lora[0], 11, target_modules=LORA_TARGETS)
        make_lora_adapter(build_tiny_llama, self.lora[1], 12, r=8, target_modules=LORA_TARGETS)
        make_lora_adapter(build_tiny_llama, self.lora[2], 13, r=2, target_modules=["q_proj", "down_proj"])
        model = build_tiny_llama()
        self.full = []
        for i, seed in enumerate((21, 22, 23)):
            expert = build_tiny_llama()
            expert.load_state_dict(perturbed_state(model, seed))
            path = root / f"full-{i}"
            expert.save_pretrained(path)
            self.full.append(path)


_OUTPUTS = iter(range(10**6))


def _out(inputs: Inputs, name: str) -> Path:
    return inputs.root / "out" / name


def oft_adapter_case(name: str, kwargs: dict) -> Callable[[Inputs], Hashes]:
    def run(inputs: Inputs) -> Hashes:
        from peft_orthomerge import merge_oft_checkpoints

        out = _out(inputs, f"oft-adapter-{name}")
        merge_oft_checkpoints(inputs.oft, out, [0.5, 0.3, 0.2], **kwargs)
        return hash_dir(out)

    return run


def oft_folded_case(method: str) -> Callable[[Inputs], Hashes]:
    def run(inputs: Inputs) -> Hashes:
        from peft_orthomerge import merge_oft_checkpoints

        out = _out(inputs, f"oft-folded-{method}")
        merge_oft_checkpoints(inputs.oft, out, [0.5, 0.3, 0.2], method=method, fold_into=inputs.base)
        return hash_dir(out)

    return run


def oft_in_memory(inputs: Inputs) -> Hashes:
    from peft_orthomerge import merge_oft_adapters

    model = merge_oft_adapters(build_tiny_llama(), [str(p) for p in inputs.oft], [0.2, 0.3, 0.5], granularity="block")
    return hash_state(model.state_dict())


def lora_case(target: str | None, residual: str, **kwargs) -> Callable[[Inputs], Hashes]:
    def run(inputs: Inputs) -> Hashes:
        from peft_orthomerge import merge_lora_adapters

        model = merge_lora_adapters(
            build_tiny_llama(),
            [str(p) for p in inputs.lora],
            [0.5, 0.3, 0.2],
            target=target,
            residual=residual,
            **kwargs,
        )
        return hash_state(model.state_dict())

    return run


def full_case(target: str | None, residual: str, **kwargs) -> Callable[[Inputs], Hashes]:
    def run(inputs: Inputs) -> Hashes:
        from peft_orthomerge import merge_models

        out = _out(inputs, f"full-{target}-{residual}-{next(_OUTPUTS)}")
        merge_models(inputs.base, inputs.full, out, [0.5, 0.3, 0.2], target=target, residual=residual, **kwargs)
        return hash_dir(out)

    return run


def legacy_fold(inputs: Inputs) -> Hashes:
    from peft_orthomerge import merge_oft_checkpoints

    fixtures = HERE / "fixtures" / "legacy-oft-peft-0.15.2"
    out = _out(inputs, "legacy-folded")
    merge_oft_checkpoints(
        [fixtures / "legacy-oft-s1", fixtures / "legacy-oft-scaled"], out, fold_into=fixtures / "base"
    )
    return hash_dir(out)


# -- examples and demo: every public merge call they make is recorded ------------------------------
@contextlib.contextmanager
def recording_api(record: Hashes):
    """Wrap the public merge functions so that each call's output is hashed into ``record``."""
    import peft_orthomerge

    names = ("merge_oft_adapters", "merge_oft_checkpoints", "merge_lora_adapters", "merge_models")
    originals = {name: getattr(peft_orthomerge, name) for name in names}
    counter = iter(range(1000))

    def wrap(name: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            result = fn(*args, **kwargs)
            call = f"{next(counter)}:{name}:"
            if hasattr(result, "state_dict"):
                record.update(hash_state(result.state_dict(), call))
            else:
                out = kwargs.get("output_dir", args[1] if name == "merge_oft_checkpoints" else args[2])
                record.update(hash_dir(Path(out), call))
            return result

        return wrapper

    for name, fn in originals.items():
        setattr(peft_orthomerge, name, wrap(name, fn))
    try:
        yield
    finally:
        for name in names:
            delattr(peft_orthomerge, name)  # the package's lazy lookup serves them again


def example_case(script: str) -> Callable[[Inputs], Hashes]:
    def run(inputs: Inputs) -> Hashes:
        record: Hashes = {}
        with recording_api(record), contextlib.redirect_stdout(open(os.devnull, "w")):
            runpy.run_path(str(ROOT / "examples" / script), run_name="__main__")
        return record

    return run


def recipe_cli_example(inputs: Inputs) -> Hashes:
    workdir = inputs.root / "recipe-cli"
    workdir.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PEFT_ORTHOMERGE_QUIET="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "recipe_cli.py"), str(workdir)],
        check=True, env=env, capture_output=True,
    )  # fmt: skip
    return {**hash_dir(workdir / "merged-adapter", "merged:"), **hash_dir(workdir / "reproduced", "reproduced:")}


def demo_case(inputs: Inputs) -> Hashes:
    """The demo's merge (the public function it calls is recorded; the demo prints only)."""
    import peft_orthomerge
    from peft_orthomerge import demo

    record: Hashes = {}
    original = peft_orthomerge.merge_oft_adapters

    def recorded(*args, **kwargs):
        model = original(*args, **kwargs)
        record.update(hash_state(model.state_dict()))
        return model

    module = sys.modules[original.__module__]
    module.merge_oft_adapters = recorded
    try:
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            demo.run_demo()
    finally:
        module.merge_oft_adapters = original
    return record


def cases() -> dict[str, Callable[[Inputs], Hashes]]:
    out: dict[str, Callable[[Inputs], Hashes]] = {}
    for name, kwargs in OFT_ADAPTER_METHODS.items():
        out[f"oft_adapter_{name}"] = oft_adapter_case(name, kwargs)
    for method in OFT_FOLDED_METHODS:
        out[f"oft_folded_{method}"] = oft_folded_case(method)
    out["oft_in_memory_block"] = oft_in_memory
    out["oft_legacy_folded"] = legacy_fold
    for target in TARGETS:
        for residual in RESIDUALS:
            out[f"lora_{target}_{residual}"] = lora_case(target, residual)
            out[f"full_{target}_{residual}"] = full_case(target, residual)
    out["lora_euclidean_ta"] = lora_case(None, "ta")
    out["lora_euclidean_ties"] = lora_case(None, "ties")
    out["lora_global_ta_float32"] = lora_case("global", "ta", precision="float32")
    out["lora_export_rank8"] = lora_case("global", "ties", export="lora", rank=8)
    out["full_euclidean_ta"] = full_case(None, "ta")
    out["full_euclidean_tsvm"] = full_case(None, "tsvm")
    out["full_global_ta_float32"] = full_case("global", "ta", precision="float32")
    out["full_conflict_ties_float32"] = full_case("conflict", "ties", precision="float32")
    out["full_conflict_dare_ties_kwargs"] = full_case("conflict", "dare_ties", residual_kwargs={"p": 0.3, "seed": 7})
    out["full_global_ta_exclude"] = full_case("global", "ta", exclude="lm_head|embed", include=r"layers\.")
    out["full_global_ties_newton_schulz"] = full_case("global", "ties", solver="newton_schulz")
    for script in sorted(p.name for p in (ROOT / "examples").glob("*.py")):
        if script != "recipe_cli.py":
            out[f"example_{script[:-3]}"] = example_case(script)
    out["example_recipe_cli"] = recipe_cli_example
    out["demo"] = demo_case
    return out


def run_all(selected: list[str] | None = None) -> dict[str, Hashes]:
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PEFT_ORTHOMERGE_QUIET", "1")
    results = {}
    with tempfile.TemporaryDirectory(prefix="orthomerge-golden-") as tmp:
        inputs = Inputs(Path(tmp))
        for name, case in cases().items():
            if selected and name not in selected:
                continue
            results[name] = case(inputs)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--record", action="store_true", help="record this machine, delete the other recordings")
    mode.add_argument("--record-machine", action="store_true", help="add this machine's recording (unchanged code)")
    parser.add_argument("cases", nargs="*")
    args = parser.parse_args()
    env = environment()
    if (args.record or args.record_machine) and args.cases:
        parser.error("a recording holds every case: name none")
    results = run_all(args.cases or None)
    if args.record or args.record_machine:
        GOLDEN_DIR.mkdir(exist_ok=True)
        target = recording_file(env)
        if args.record:
            for stale in GOLDEN_DIR.glob("hashes*.json"):
                stale.unlink()
        target.write_text(json.dumps({"environment": env, "cases": results}, indent=1, sort_keys=True) + "\n")
        print(f"recorded {len(results)} cases, {sum(map(len, results.values()))} tensors -> {target}")
        return
    rec = matching_recording(env)
    if rec is None:
        sys.exit(f"no recording for this machine ({env}); see --record-machine")
    bad = [name for name, hashes in results.items() if rec["cases"].get(name) != hashes]
    print(f"{len(results) - len(bad)} of {len(results)} cases match" + (f"; differ: {', '.join(bad)}" if bad else ""))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
