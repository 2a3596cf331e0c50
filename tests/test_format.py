"""Round trips of real training states through pack/unpack, asserted bitwise."""

from __future__ import annotations

import math
import random
import struct
import subprocess
import sys
import warnings
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from snapstore.errors import FormatError, UnsupportedTypeError
from snapstore.format.pack import FORMAT_VERSION, pack, plan, read_manifest, unpack


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Equal types, structure, metadata and bytes (NaNs and -0.0 included)."""
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert a.stride() == b.stride(), f"{where}: strides {a.stride()} != {b.stride()}"
        assert a.requires_grad == b.requires_grad, where
        assert torch.equal(_bits(a), _bits(b)), f"{where}: bytes differ"
    elif isinstance(a, np.ndarray):
        assert a.dtype.str == b.dtype.str and a.shape == b.shape, where
        assert a.strides == b.strides, f"{where}: strides {a.strides} != {b.strides}"
        assert a.tobytes() == b.tobytes(), f"{where}: bytes differ"
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
        assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None), where
    elif isinstance(a, list | tuple) and not isinstance(a, torch.Size):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b), f"{where}: {a!r} != {b!r}"
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def roundtrip(state: Any, **kw: Any) -> Any:
    packed = pack(state)
    return unpack(packed.manifest, packed.data, **kw)


class TinyLM(nn.Module):
    """Embedding, one transformer block, final norm, output tied to the embedding."""

    def __init__(self, vocab: int = 37, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.block = nn.TransformerEncoderLayer(
            dim, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.block(self.embed(tokens))))


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tokens = torch.randint(0, 37, (4, 8), generator=gen)
        loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


def _trained() -> tuple[TinyLM, torch.optim.AdamW]:
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    _train(model, opt, 3, seed=1)
    return model, opt


def test_transformer_and_adamw_roundtrip_bitwise_and_resume_identically() -> None:
    model, opt = _trained()
    state: dict[str, Any] = {
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "step": 3,
        "torch_rng": torch.get_rng_state(),
    }
    assert isinstance(state["optim"]["param_groups"][0]["betas"], tuple)
    back = roundtrip(state)
    assert_same(state, back)
    sd = back["model"]
    # Tied weights come back sharing storage: writing one shows in the other.
    assert sd["embed.weight"].untyped_storage().data_ptr() == (
        sd["head.weight"].untyped_storage().data_ptr()
    )
    sd["embed.weight"][0, 0] = 123.0
    assert sd["head.weight"][0, 0] == 123.0
    sd["embed.weight"][0, 0] = state["model"]["embed.weight"][0, 0]

    # Resume from the restored state; training continues bit for bit.
    torch.manual_seed(5)
    model2 = TinyLM()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1.0)
    model2.load_state_dict(back["model"])
    opt2.load_state_dict(back["optim"])
    _train(model, opt, 2, seed=9)
    _train(model2, opt2, 2, seed=9)
    for (name, p), p2 in zip(model.named_parameters(), model2.parameters(), strict=True):
        assert torch.equal(_bits(p), _bits(p2)), name


def test_tied_weights_are_stored_once() -> None:
    model, _ = _trained()
    sd = model.state_dict()
    layout = plan(sd)
    unique = {t.untyped_storage().data_ptr(): t.nbytes for t in sd.values()}
    assert len(layout.regions) == len(unique) < len(sd)
    assert layout.nbytes < sum(unique.values()) + 64 * len(unique) + 64


def test_rng_states_roundtrip_and_reproduce_draws() -> None:
    rng = np.random.default_rng(7)
    rng.random(3)
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "generator": rng.bit_generator.state,
        "python": random.getstate(),
    }
    back = roundtrip(state)
    assert_same(state, back)
    assert isinstance(back["numpy"], tuple) and back["numpy"][1].dtype == np.uint32
    assert back["generator"]["state"]["state"] > 2**64  # 128-bit ints survive
    expected = (torch.rand(3), np.random.rand(3), rng.random(3), random.random())
    torch.set_rng_state(back["torch"])
    np.random.set_state(back["numpy"])
    rng2 = np.random.default_rng()
    rng2.bit_generator.state = back["generator"]
    random.setstate(back["python"])
    again = (torch.rand(3), np.random.rand(3), rng2.random(3), random.random())
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1]) and np.array_equal(expected[2], again[2])
    assert expected[3] == again[3]


SCALARS: list[Any] = [
    0,
    -1,
    2**63 - 1,
    2**64 - 1,
    2**64,
    -(2**63),
    -(2**63) - 1,
    2**200 + 12345,
    -(2**130),
    0.0,
    -0.0,
    math.inf,
    -math.inf,
    math.nan,
    struct.unpack("<d", b"\x01\x00\x00\x00\x00\x00\xf8\x7f")[0],  # NaN with a payload
    1e-310,
    "",
    "héllo ✓",
    "\ud800",  # lone surrogate
    b"",
    b"\x00\xff" * 10,
    None,
    True,
    False,
    [],
    (),
    ((),),
    [1, (2, [3, (4,)])],
    {"a": {1: {"b": [None]}}, 2: "x", -5: 1.5},
    OrderedDict([("z", 1), ("a", 2)]),
    np.float32(1.5),
    np.float64(-0.0),
    np.float16(3.0),
    np.int8(-3),
    np.uint64(2**64 - 1),
    np.bool_(True),
    np.complex64(1 - 2j),
    np.longdouble(1) / 3,
    torch.float8_e4m3fn,
    torch.bfloat16,
    torch.Size([2, 0, 5]),
    torch.Size([]),
    torch.device("cpu"),
    torch.device("cuda", 1),
]


@pytest.mark.parametrize("value", SCALARS, ids=[repr(v)[:30] for v in SCALARS])
def test_plain_values_roundtrip_with_their_types(value: Any) -> None:
    state = {"v": value, "in_list": [value], "in_tuple": (value, 1)}
    assert_same(state, roundtrip(state))


def test_state_dict_metadata_is_kept() -> None:
    sd = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).state_dict()
    assert hasattr(sd, "_metadata")
    back = roundtrip(sd)
    assert type(back) is OrderedDict
    # torch sets _metadata on the state dict at runtime; no type declares it.
    assert back._metadata == sd._metadata  # type: ignore[attr-defined]
    nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).load_state_dict(back)


def _dtypes() -> list[torch.dtype]:
    names = [
        "float32", "float16", "float64", "bfloat16", "complex64", "complex128",
        "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
        "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool",
    ]  # fmt: skip
    return [getattr(torch, n) for n in names if hasattr(torch, n)]


@pytest.mark.parametrize("dtype", _dtypes(), ids=str)
def test_every_trainer_dtype_roundtrips_bitwise(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        t = torch.randint(0, 2, (5, 7), generator=gen).bool()
    else:
        raw = torch.randint(0, 256, (5, 7 * dtype.itemsize), generator=gen, dtype=torch.uint8)
        t = raw.view(dtype)
    state = {"t": t, "col": t[:, 2], "tr": t.t(), "scalar": t[1, 1].clone()}
    back = roundtrip(state)
    assert_same(state, back)
    assert back["t"].untyped_storage().data_ptr() == back["tr"].untyped_storage().data_ptr()


@pytest.mark.parametrize("code", [c for c in np.typecodes["All"] if c in "?bhilqBHILQefdgFDG"])
def test_numpy_arrays_of_numeric_dtypes_roundtrip(code: str) -> None:
    a = (np.arange(24) % 7).astype(code).reshape(4, 6)
    state = {
        "a": a,
        "swapped": a.astype(a.dtype.newbyteorder()),
        "reversed": a[::-1, ::2],
        "zero_d": np.array(3, dtype=code),
        "empty": np.zeros((0, 3), dtype=code),
    }
    assert_same(state, roundtrip(state))


def test_numpy_views_of_one_base_share_memory_after_restore() -> None:
    base = np.arange(100, dtype=np.float64)
    state = {"head": base[:10], "tail": base[90:], "rev": base[::-1]}
    layout = plan(state)
    assert len(layout.regions) == 1
    back = roundtrip(state)
    assert_same(state, back)
    back["head"][0] = -1.0
    assert back["rev"][-1] == -1.0


def test_views_keep_shape_strides_and_store_only_used_bytes() -> None:
    big = torch.arange(10_000, dtype=torch.float32)
    grid = torch.arange(60, dtype=torch.float64).reshape(6, 10)
    state = {
        "slice": big[5000:5010],
        "strided": big[6000:6040:4],
        "transposed": grid.t(),
        "narrow": grid[:, 3:5],
        "expanded": torch.arange(3.0).expand(4, 3),
        "unsqueezed": torch.arange(4).unsqueeze(0).expand(5, 4),
        "empty": torch.empty(0, 4),
        "empty_strided": torch.empty_strided((0, 3), (1, 7)),
        "zero_d": torch.tensor(2.5),
    }
    layout = plan(state)
    # big: bytes 20000..24160 (slice up to the strided view's end), not 40000.
    assert layout.nbytes < 6000
    back = roundtrip(state)
    assert_same(state, back)
    back["slice"][0] = -1
    assert back["strided"][0] != -1  # different elements of one storage
    back["transposed"][1, 0] = -7.0
    assert back["narrow"][0, 0] == 3.0 and back["transposed"].t()[0, 1] == -7.0
    assert back["expanded"].stride() == (0, 1)


def test_requires_grad_and_parameters_are_kept() -> None:
    w = nn.Parameter(torch.randn(3, 3))
    frozen = nn.Parameter(torch.randn(2), requires_grad=False)
    leaf = torch.randn(4, requires_grad=True)
    state = {"w": w, "frozen": frozen, "leaf": leaf, "plain": torch.randn(2)}
    back = roundtrip(state)
    assert type(back["w"]) is nn.Parameter and back["w"].requires_grad
    assert type(back["frozen"]) is nn.Parameter and not back["frozen"].requires_grad
    assert type(back["leaf"]) is torch.Tensor and back["leaf"].requires_grad
    assert not back["plain"].requires_grad
    assert_same(state, back)


def test_one_tensor_at_two_paths_comes_back_as_one_object() -> None:
    t = torch.randn(4)
    state = {"a": t, "b": [t, (t,)]}
    back = roundtrip(state)
    assert back["a"] is back["b"][0] is back["b"][1][0]
    assert len(plan(state).leaves) == 1


class Foo:
    pass


def _quantized() -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # quantized tensors are deprecated
        return torch.quantize_per_tensor(torch.rand(3), 0.1, 0, torch.quint8)


@pytest.mark.parametrize(
    ("state", "message"),
    [
        (
            {"optim": {"state": {3: {"foo": Foo()}}}},
            "state['optim']['state'][3]['foo']: unsupported type Foo",
        ),
        ({"a": [1, {2, 3}]}, "state['a'][1]: unsupported type set"),
        ({"a": {(1, 2): 3}}, "state['a']: dict key (1, 2) has unsupported type tuple"),
        ({"a": {True: 3}}, "state['a']: dict key True has unsupported type bool"),
        ({"s": torch.randn(3, 3).to_sparse()}, "state['s']: unsupported torch.sparse_coo"),
        ({"m": [torch.empty(2, device="meta")]}, "state['m'][0]: unsupported meta tensor"),
        (
            {"q": _quantized()},
            "state['q']: unsupported quantized tensor",
        ),
        ({"c": torch.randn(2, dtype=torch.complex64).conj()}, "state['c']: unsupported tensor"),
        ({"o": np.array([1, "x"], dtype=object)}, "state['o']: numpy array of dtype object"),
        ({"u": np.array(["ab"])}, "state['u']: numpy array of dtype <U2"),
        ({"mm": np.ma.masked_array([1, 2])}, "state['mm']: unsupported type MaskedArray"),
        ({"nt": [torch.return_types.max((torch.ones(1), torch.zeros(1)))]}, "state['nt'][0]"),
        ({"f": 1j}, "state['f']: unsupported type complex"),
        ({"b": bytearray(b"x")}, "state['b']: unsupported type bytearray"),
    ],
)
def test_unsupported_values_name_their_path(state: Any, message: str) -> None:
    with pytest.raises(UnsupportedTypeError) as info:
        pack(state)
    assert str(info.value).startswith(message), str(info.value)
    with pytest.raises(UnsupportedTypeError) as plan_info:
        plan(state)
    assert str(plan_info.value) == str(info.value)


def test_read_manifest_summarizes() -> None:
    state = {"a": torch.zeros(3), "b": np.zeros(2), "c": torch.zeros(3).t(), "n": 1}
    packed = pack(state)
    info = read_manifest(packed.manifest)
    assert info.version == FORMAT_VERSION
    assert info.nbytes == packed.layout.nbytes == len(packed.data)
    assert (info.num_tensors, info.num_arrays, info.num_regions) == (2, 1, 3)
    assert info.manifest_nbytes == len(packed.manifest)


def test_state_without_tensors_and_bare_tensor_roots() -> None:
    for state in [{"step": 1}, 5, None, torch.arange(4), np.arange(3)]:
        packed = pack(state)
        assert_same(state, unpack(packed.manifest, packed.data))
    assert pack({"x": 1}).layout.nbytes == 0


def test_copy_false_views_the_data_buffer() -> None:
    state = {"a": torch.arange(8, dtype=torch.float32), "n": np.arange(4, dtype=np.int16)}
    packed = pack(state)
    back = unpack(packed.manifest, packed.data, copy=False)
    assert_same(state, back)
    packed.data[:] = 0
    assert float(back["a"].sum()) == 0.0 and int(back["n"].sum()) == 0


def test_copy_false_from_misaligned_data_still_restores() -> None:
    a = torch.arange(8, dtype=torch.float64)
    state = {"a": a, "b": a.view(2, 4)}
    packed = pack(state)
    shifted = torch.zeros(len(packed.data) + 1, dtype=torch.uint8)
    shifted[1:] = torch.from_numpy(packed.data)
    back = unpack(packed.manifest, shifted[1:], copy=False)  # float64 cannot view odd addresses
    assert_same(state, back)
    back["a"][0] = -1.0  # copied once per region, so the two still share storage
    assert back["b"][0, 0] == -1.0 and shifted[1:9].clone().view(torch.float64).item() == 0.0


def test_states_nested_too_deep_or_holding_themselves_are_refused() -> None:
    deep: list[Any] = []
    for _ in range(200):
        deep = [deep]
    with pytest.raises(FormatError, match="nested deeper than"):
        pack({"deep": deep})
    loop: list[Any] = [1]
    loop.append(loop)
    with pytest.raises(FormatError, match="holds itself"):
        plan({"loop": loop})


def test_reading_a_manifest_does_not_import_torch() -> None:
    """Node actors and tools read manifests; torch costs them seconds to import."""
    packed = pack({"w": torch.zeros(3), "step": 1})
    code = (
        "import sys; from snapstore.format.manifest import read_manifest; "
        "import snapstore.format.bytecopy; "
        "info = read_manifest(sys.stdin.buffer.read()); "
        "assert 'torch' not in sys.modules, 'torch was imported'; print(info.num_tensors)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], input=packed.manifest, capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.strip() == b"1"
