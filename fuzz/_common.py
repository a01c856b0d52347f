"""Shared helpers of the fuzz entries: structure-aware input builders.

A fuzz entry turns the fuzzer's bytes into files (a safetensors file plus an ``adapter_config.json``,
or a YAML recipe), calls the library on them, and lets any exception other than `OrthoMergeError`
escape: the fuzzer (atheris) records that as a crash. Inputs are built half raw, half
structure-aware, so that the fuzzer gets past the safetensors header and the JSON syntax.
"""

from __future__ import annotations

import json
import struct

# Names and values a real PEFT OFT / LoRA adapter uses, so fuzzed files look plausible.
MODULES = (
    "base_model.model.model.layers.0.self_attn.q_proj",
    "base_model.model.model.layers.0.mlp.down_proj",
    "base_model.model.model.embed_tokens",
    "base_model.model.lm_head",
    "base_model.model.model.layers.1.self_attn.v_proj",
)
SUFFIXES = (
    ".oft_R.weight",
    ".oft_embedding_R.weight",
    ".oft_r",
    ".oft_s",
    ".bias",
    ".weight",
    "",
    ".lora_A.weight",
    ".lora_B.weight",
    ".lora_B.bias",
    ".lora_embedding_A",
    ".lora_embedding_B",
    ".lora_magnitude_vector",
    ".base_layer.weight",
)
DTYPES = (
    "F32",
    "F16",
    "BF16",
    "F64",
    "I64",
    "I32",
    "U8",
    "BOOL",
    "F8_E4M3",
    "F8_E5M2",
    "F8_E4M3FNUZ",
    "F8_E5M2FNUZ",
    "F8_E8M0",
    "F4",
    "C64",
    "U16",
    "U64",
    "I8",
    "Q99",
)
DTYPE_BYTES = {
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F64": 8,
    "I64": 8,
    "I32": 4,
    "U8": 1,
    "BOOL": 1,
    "I8": 1,
    "C64": 8,
    "U16": 2,
    "U64": 8,
}
PEFT_TYPES = ("OFT", "LORA", "oft", "lora", "BOFT", "", None, 3, ["OFT"])
CONFIG_KEYS = {
    "r": (0, 1, 2, 4, 8, -1, None, "8", 10**9),
    "oft_block_size": (0, 1, 2, 3, 4, 8, 32, -4, None, "4", 2.5),
    "target_modules": (["q_proj"], "q_proj", None, [], ["q_proj", "embed_tokens", "lm_head"], 5, ".*"),
    "use_cayley_neumann": (True, False, None, "yes", 1),
    "num_cayley_neumann_terms": (5, 0, 1, -3, 100, None, 2.5),
    "block_share": (False, True, None, "x"),
    "coft": (False, True, None),
    "eps": (6e-5, 0.0, -1.0, None, "nan", 1e308),
    "module_dropout": (0.0, 0.5, None),
    "bias": ("none", "all", "oft_only", None, 7),
    "modules_to_save": (None, ["lm_head"], "lm_head", 3),
    "base_model_name_or_path": ("../base", "org/base", None, "/etc", ""),
    "peft_version": ("0.21.2", "0.15.2", "0.13.0", None, "garbage", 0.17, "1"),
    "fan_in_fan_out": (False, True, None),
    "layers_to_transform": (None, [0], 0, "0"),
    "task_type": ("CAUSAL_LM", None, 1),
    "lora_alpha": (8, 16.0, 0, -1, None, "8"),
    "use_rslora": (False, True, None),
    "use_dora": (False, True),
    "rank_pattern": ({}, {"q_proj": 2}, {"q_proj": 0}, {"q_proj": "x"}, ["q_proj"], None, {"^model.*": 4}),
    "alpha_pattern": ({}, {"q_proj": 4}, {"q_proj": None}, [1], None),
    "init_lora_weights": (True, False, "pissa", "gaussian", None),
}


def safetensors_bytes(fdp) -> bytes:
    """A safetensors file built from fuzzed choices: a plausible header over fuzzed data bytes,
    with occasional lies (offsets, sizes, dtypes) and occasional raw bytes."""
    mode = fdp.ConsumeIntInRange(0, 9)
    if mode == 0:
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 512))
    header: dict = {}
    if fdp.ConsumeBool():
        header["__metadata__"] = {"format": fdp.PickValueInList(["pt", "np", "", "x" * 3])}
    offset = 0
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        name = fdp.PickValueInList(list(MODULES)) + fdp.PickValueInList(list(SUFFIXES))
        dtype = fdp.PickValueInList(list(DTYPES))
        shape = [fdp.ConsumeIntInRange(0, 12) for _ in range(fdp.ConsumeIntInRange(0, 3))]
        numel = 1
        for s in shape:
            numel *= s
        size = numel * DTYPE_BYTES.get(dtype, 1)
        if mode == 1:  # lie about the size
            size = max(0, size + fdp.ConsumeIntInRange(-8, 8))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    body = fdp.ConsumeBytes(offset)
    body += b"\x00" * (offset - len(body))
    if mode == 2:  # truncate
        body = body[: fdp.ConsumeIntInRange(0, len(body))]
    raw = json.dumps(header).encode()
    if mode == 3:  # corrupt the header text
        pos = fdp.ConsumeIntInRange(0, max(0, len(raw) - 1))
        raw = raw[:pos] + fdp.ConsumeBytes(4) + raw[pos + 1 :]
    length = len(raw)
    if mode == 4:  # lie about the header length
        length = fdp.ConsumeIntInRange(0, 2**63 - 1)
    return struct.pack("<Q", length) + raw + body


def config_bytes(fdp) -> bytes:
    """An ``adapter_config.json``: usually a JSON object with fuzzed field values, sometimes raw bytes."""
    mode = fdp.ConsumeIntInRange(0, 7)
    if mode == 0:
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 256))
    if mode == 1:
        return json.dumps(fdp.PickValueInList([[], None, 1, "OFT", [{"peft_type": "OFT"}]])).encode()
    config: dict = {"peft_type": fdp.PickValueInList(list(PEFT_TYPES))}
    for key, values in CONFIG_KEYS.items():
        if fdp.ConsumeIntInRange(0, 3):
            config[key] = fdp.PickValueInList(list(values))
    return json.dumps(config).encode()


class BytesProvider:
    """A pure-Python stand-in for `atheris.FuzzedDataProvider` (the methods used here), so that the
    same entries run under hypothesis where atheris is not installed."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def _take(self, n: int) -> bytes:
        chunk = self._data[self._pos : self._pos + n]
        self._pos += len(chunk)
        return chunk

    def ConsumeBytes(self, count: int) -> bytes:
        return self._take(max(0, count))

    def ConsumeIntInRange(self, low: int, high: int) -> int:
        span = high - low
        if span <= 0:
            return low
        nbytes = (span.bit_length() + 7) // 8
        return low + int.from_bytes(self._take(nbytes).ljust(nbytes, b"\x00"), "little") % (span + 1)

    def ConsumeBool(self) -> bool:
        return bool(self.ConsumeIntInRange(0, 1))

    def PickValueInList(self, values):
        return values[self.ConsumeIntInRange(0, len(values) - 1)]

    def ConsumeUnicodeNoSurrogates(self, count: int) -> str:
        return self._take(max(0, count)).decode("utf-8", errors="replace")

    def remaining_bytes(self) -> int:
        return len(self._data) - self._pos


def provider(data: bytes):
    """atheris' provider when atheris is importable, else `BytesProvider`."""
    try:
        import atheris
    except ImportError:
        return BytesProvider(data)
    return atheris.FuzzedDataProvider(data)


def run_atheris(one_input) -> None:
    """Run ``one_input`` under atheris (libFuzzer flags from ``sys.argv``)."""
    import sys

    import atheris

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


# Recipe building blocks: valid values mixed with hostile ones.
RECIPE_VALUES = {
    "kind": ["oft", "lora", "full", "OFT", "", None, 1, ["oft"]],
    "base_model": ["base", "../base", "/etc", "org/base", "org/..", "a\x00b", "~nobody/x", None, 3, ""],
    "path": [
        "a",
        "b",
        "../a",
        "/a",
        "a/../b",
        "org/name",
        "org/..",
        "..",
        ".",
        "",
        "a\x00b",
        "~root",
        "a/adapter_config.json",
        5,
        None,
    ],
    "weight": [1, 0, -1, 0.5, 1e308, 1e-320, float("nan"), float("inf"), "1", None, True, [1]],
    "method_name": ["orthomerge", "mean_q", "mean_r", "product_r", "euclidean", "karcher", "x", None],
    "granularity": ["module", "block", "row", None, 1],
    "cayley": ["auto", "exact", "neumann", "x", True],
    "scale": [1.0, 0, -1, 1e308, float("nan"), "x"],
    "target": ["global", "conflict", None, "x"],
    "residual": ["ta", "ties", "dare_ta", "dare_ties", "tsvm", "x"],
    "residual_kwargs": [None, {"lam": 0.5}, {"density": 2}, {"x": [1]}, "lam", {1: 2}],
    "solver": ["auto", "svd", "newton_schulz", "x"],
    "rank": [None, 1, 0, -3, 4, "4", 2**70],
    "regex": [None, "q_proj", "([", ".*", "(a+)+$", 3],
    "out_path": ["merged", "./m", "sub/../m", "../m", "/tmp/m", ".", "a", "a/m", "recipe.yaml", "", "m\x00", 7],
    "format": ["adapter", "folded", "model", "lora", "x", None],
}


def recipe_text(fdp) -> str | bytes:
    """A YAML recipe: a fuzzed mapping dumped with yaml, occasionally raw bytes or spliced YAML."""
    import yaml

    mode = fdp.ConsumeIntInRange(0, 9)
    if mode == 0:
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 400))
    pick = lambda key: fdp.PickValueInList(list(RECIPE_VALUES[key]))  # noqa: E731
    data: dict = {}
    if fdp.ConsumeIntInRange(0, 7):
        data["kind"] = pick("kind")
    if fdp.ConsumeBool():
        data["base_model"] = pick("base_model")
    if fdp.ConsumeIntInRange(0, 7):
        inputs = []
        for _ in range(fdp.ConsumeIntInRange(0, 3)):
            spec: dict = {}
            if fdp.ConsumeIntInRange(0, 7):
                spec["path"] = pick("path")
            if fdp.ConsumeBool():
                spec["weight"] = pick("weight")
            if fdp.ConsumeIntInRange(0, 15) == 0:
                spec["extra"] = 1
            inputs.append(spec if fdp.ConsumeIntInRange(0, 9) else pick("path"))
        data["inputs"] = inputs
    if fdp.ConsumeBool():
        method: dict = {}
        for key, pool in (
            ("name", "method_name"),
            ("granularity", "granularity"),
            ("cayley", "cayley"),
            ("scale", "scale"),
            ("target", "target"),
            ("residual", "residual"),
            ("residual_kwargs", "residual_kwargs"),
            ("solver", "solver"),
            ("rank", "rank"),
            ("include", "regex"),
            ("exclude", "regex"),
        ):
            if fdp.ConsumeIntInRange(0, 3) == 0:
                method[key] = pick(pool)
        data["method"] = method
    if fdp.ConsumeIntInRange(0, 7):
        output: dict = {}
        if fdp.ConsumeIntInRange(0, 7):
            output["path"] = pick("out_path")
        if fdp.ConsumeBool():
            output["format"] = pick("format")
        data["output"] = output
    if fdp.ConsumeIntInRange(0, 15) == 0:
        data[fdp.PickValueInList(["methd", "input", "outputs", "__class__"])] = {}
    text = yaml.safe_dump(data, allow_unicode=True)
    if mode == 1:  # splice fuzzed bytes into valid YAML
        pos = fdp.ConsumeIntInRange(0, len(text))
        return text[:pos].encode() + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 16)) + text[pos:].encode()
    if mode == 2:  # YAML features: tags, anchors, aliases, documents
        return text + fdp.PickValueInList(
            [
                "x: !!python/object/apply:os.system [true]\n",
                "y: &a [*a]\n",
                "---\nkind: oft\n",
                "z: !!binary AAAA\n",
                "w: !custom 1\n",
            ]
        )
    return text


def is_known_bug(exc: BaseException, known: list[tuple[type, str, str]]) -> bool:
    """True when ``exc`` matches a known, already reported bug ``(type, message fragment, function
    in the traceback)``: tolerated so that fuzzing can go past it (each one has its own strict
    xfail regression test; delete its entry when it is fixed)."""
    import traceback

    funcs = {frame.name for frame in traceback.extract_tb(exc.__traceback__)}
    return any(isinstance(exc, t) and frag in str(exc) and fn in funcs for t, frag, fn in known)


def _pack(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def coherent_adapter(fdp) -> tuple[bytes, bytes]:
    """A structurally valid OFT or LoRA adapter (config + weights) with fuzzed sizes, values and
    options, so that the readers' later stages (conversion, folding) are reached too."""
    kind = fdp.PickValueInList(["OFT", "LORA"])
    header: dict = {}
    body = b""

    def add(name: str, shape: list[int], dtype: str = "F32") -> None:
        nonlocal body
        size = DTYPE_BYTES[dtype]
        for s in shape:
            size *= s
        data = fdp.ConsumeBytes(size)
        data += b"\x00" * (size - len(data))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(body), len(body) + size]}
        body += data

    config: dict = {"peft_type": kind}
    for module in MODULES[: fdp.ConsumeIntInRange(1, 3)]:
        dtype = fdp.PickValueInList(["F32", "F16", "BF16", "F64"])
        if kind == "OFT":
            b = fdp.PickValueInList([2, 3, 4, 8])
            config["oft_block_size"] = b
            suffix = ".oft_embedding_R.weight" if "embed" in module else ".oft_R.weight"
            add(module + suffix, [fdp.ConsumeIntInRange(0, 4), b * (b - 1) // 2], dtype)
        else:
            r, fan_in, fan_out = fdp.ConsumeIntInRange(0, 4), fdp.ConsumeIntInRange(1, 6), fdp.ConsumeIntInRange(1, 6)
            add(module + ".lora_A.weight", [r, fan_in], dtype)
            add(module + ".lora_B.weight", [fan_out, r], dtype)
            if fdp.ConsumeIntInRange(0, 3) == 0:
                add(module + ".lora_magnitude_vector", [fan_out], dtype)
            config["r"] = r
    for key, values in CONFIG_KEYS.items():
        if key not in ("r", "oft_block_size") and fdp.ConsumeIntInRange(0, 3) == 0:
            config[key] = fdp.PickValueInList(list(values))
    return _pack(header, body), json.dumps(config).encode()
