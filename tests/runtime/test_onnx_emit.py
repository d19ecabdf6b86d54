"""ONNX emission from the IR: ONNX Runtime logits against the torch executor.

The tiny Llama-GQA, Mistral and Qwen2 models (with and without LoRA) run in ONNX Runtime at
two batch/sequence sizes through one session (the dynamic axes must really be dynamic), with
and without padding; a layer with a hand-pruned MLP checks non-uniform shapes. Single-op
graphs cover the translations the three model families do not use.
"""

from __future__ import annotations

import dataclasses

import onnx
import pytest
import torch

from lorashear.errors import EmissionError
from lorashear.ir.core import Graph, Module, Op, Value, clone_module
from lorashear.ir.interpret import resolve_arg
from lorashear.ir.ops import op_def
from lorashear.ir.storage import DataStorage
from lorashear.ir.types import TensorType, dtype_name
from lorashear.ir.verifier import verify
from lorashear.runtime.executor import emit_torch
from lorashear.runtime.onnx_emit import emit_onnx
from tests.conftest import FAMILIES, random_batch

ort = pytest.importorskip("onnxruntime")

TOLERANCE = 1e-4
SIZES = ((3, 11), (2, 6))  # (batch, sequence): two shapes through the same session


def _session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _max_diff(got, want, mask=None) -> float:
    diff = (torch.as_tensor(got) - want).abs()
    if mask is not None:  # padded query positions are undefined in HF too
        diff = diff[mask.bool()]
    return diff.max().item()


def _assert_matches_torch(module: Module, path, vocab: int, **emit_options) -> None:
    """ONNX Runtime and the torch executor agree, with and without a padding mask."""
    emit_onnx(module, path, **emit_options)
    session = _session(path)
    model = emit_torch(module)
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    assert session.get_inputs()[0].shape == ["B", "S"]
    for batch, seq in SIZES:
        ids, mask = random_batch(vocab, batch, seq)
        for feed_mask in (torch.ones_like(mask), mask):
            with torch.no_grad():
                want = model(ids, attention_mask=feed_mask).logits
            (got,) = session.run(["logits"], {"input_ids": ids.numpy(),
                                              "attention_mask": feed_mask.numpy()})
            assert got.shape == (batch, seq, vocab)
            assert _max_diff(got, want, feed_mask) <= TOLERANCE, (batch, seq)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("with_lora", [False, True])
def test_onnx_matches_torch(lowered, tiny_models, family, with_lora, tmp_path):
    module = lowered(family, with_lora)
    _assert_matches_torch(module, tmp_path / "model.onnx", tiny_models[family].base.config.vocab_size)


def test_unmerged_lora_matches_torch(lowered, tiny_models, tmp_path):
    """merge_lora=False keeps the adapters as their own MatMuls, under their own names."""
    module = lowered("qwen2", True)
    path = tmp_path / "model.onnx"
    _assert_matches_torch(module, path, tiny_models["qwen2"].base.config.vocab_size,
                          merge_lora=False)
    names = {t.name for t in onnx.load(str(path)).graph.initializer}
    assert names == set(module.params)


def test_initializers_keep_parameter_names(lowered, tmp_path):
    module = lowered("llama", True)
    assert emit_onnx(module, tmp_path) == tmp_path / "model.onnx"  # a directory: model.onnx in it
    names = [t.name for t in onnx.load(str(tmp_path / "model.onnx")).graph.initializer]
    assert len(names) == len(set(names))
    assert set(names) == {n for n in module.params if ".lora_" not in n}
    assert "model.embed_tokens.weight" in names  # tied: one initializer, read twice


def test_external_data_below_threshold(lowered, tiny_models, tmp_path):
    module = lowered("mistral", False)
    path = tmp_path / "model.onnx"
    _assert_matches_torch(module, path, tiny_models["mistral"].base.config.vocab_size,
                          external_data_threshold=0)
    data = tmp_path / "model.onnx.data"
    assert data.is_file() and data.stat().st_size > path.stat().st_size
    proto = onnx.load(str(path), load_external_data=False)
    external = {t.name for t in proto.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL}
    assert "model.layers.0.mlp.down_proj.weight" in external
    # emitting again without external data removes the now stale weights file
    emit_onnx(module, path)
    assert not data.exists()


def _slice_mlp(module: Module, layer: int, keep: int) -> Module:
    """A copy of ``module`` whose layer ``layer`` MLP keeps its first ``keep`` channels."""
    module = clone_module(module)
    prefix = f"model.layers.{layer}.mlp."
    for name, rows in ((f"{prefix}gate_proj.weight", True), (f"{prefix}up_proj.weight", True),
                       (f"{prefix}down_proj.weight", False)):
        param = module.params[name]
        data = param.storage.load()
        data = data[:keep].clone() if rows else data[:, :keep].clone()
        param.storage = DataStorage(data)
        param.type = TensorType(param.type.dtype, tuple(data.shape))
    users = module.graph.users()

    def narrow(value: Value) -> None:
        value.type = value.type.with_shape((*value.type.shape[:-1], keep))

    for op in module.graph.ops:
        if op.kind == "linear" and op.args[1].name in (f"{prefix}gate_proj.weight", f"{prefix}up_proj.weight"):
            narrow(op.result)
            for user in users[op.result]:
                if user.kind in ("silu", "mul"):
                    narrow(user.result)
                    for second in users[user.result]:
                        if second.kind == "mul":
                            narrow(second.result)
    verify(module)
    return module


def test_non_uniform_layer_shapes(lowered, tiny_models, tmp_path):
    module = _slice_mlp(lowered("llama", False), layer=0, keep=40)
    assert module.params["model.layers.0.mlp.down_proj.weight"].type.shape == (64, 40)
    assert module.params["model.layers.1.mlp.down_proj.weight"].type.shape == (64, 96)
    _assert_matches_torch(module, tmp_path / "model.onnx", tiny_models["llama"].base.config.vocab_size)


def test_unsupported_op_names_kind_and_module(tmp_path, monkeypatch):
    """A kind without a translation (``roll`` was one; every IR kind now has one, so a made-up
    kind stands in) is an error naming it and its module, and the reason for an opt-out."""
    from lorashear.runtime import onnx_ops

    x = Value("x", TensorType("f32", (2, 3)))
    y = Value("y", TensorType("f32", (2, 3)))
    op = Op("my_roll", [x, [1]], {}, [y], loc="model.layers.0.mlp")
    module = Module(Graph([x], [op], [y], ["out"]))
    with pytest.raises(EmissionError, match=r"my_roll.*model\.layers\.0\.mlp"):
        emit_onnx(module, tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    monkeypatch.setitem(onnx_ops.NO_TRANSLATION, "my_roll", "it rolls dice")
    with pytest.raises(EmissionError, match=r"my_roll.*model\.layers\.0\.mlp.*: it rolls dice"):
        emit_onnx(module, tmp_path / "model.onnx")


def test_symbolic_size_arithmetic(tmp_path):
    """dim/sym.* ops stay dynamic: one ONNX model, two input shapes, the interpreter's answers."""
    from lorashear.ir.core import DTypeArg
    from lorashear.ir.interpret import run_op
    from lorashear.ir.types import SYM

    x = Value("x", TensorType("f32", ("B", "S")))
    ops, counter = [], iter(range(100))

    def emit(kind, args, ty, **kwargs):
        value = Value(f"s{next(counter)}", ty)
        ops.append(Op(kind, args, kwargs, [value], loc="sizes"))
        return value

    batch, seq = emit("dim", [x, 0], SYM), emit("dim", [x, -1], SYM)
    half = emit("sym.floordiv", [seq, 2], SYM)
    rest = emit("sym.mod", [seq, 3], SYM)
    total = emit("sym.mul", [emit("sym.neg", [emit("sym.add", [half, rest], SYM)], SYM), -1], SYM)
    positions = emit("arange", [total], TensorType("i64", ("N",)))
    window = emit("narrow", [x, 1, rest, half], TensorType("f32", ("B", "H")))
    ones = emit("new_ones", [x, [batch, total]], TensorType("f32", ("B", "N")), dtype=DTypeArg("f32"))
    grid = emit("reshape", [emit("expand", [x, [2, batch, -1]], TensorType("f32", (2, "B", "S"))),
                            [-1, seq]], TensorType("f32", ("2*B", "S")))
    outputs = [positions, window, ones, grid]
    module = Module(Graph([x], ops, outputs, [f"out{i}" for i in range(len(outputs))]))
    emit_onnx(module, tmp_path / "sizes.onnx")
    session = _session(tmp_path / "sizes.onnx")
    for shape in ((2, 7), (3, 10)):
        data = torch.randn(*shape)
        env = {id(x): data}
        for op in ops:
            run_op(op, env, None, device=torch.device("cpu"))
        got = session.run(None, {"x": data.numpy()})
        for g_out, value in zip(got, outputs, strict=True):
            assert torch.equal(torch.as_tensor(g_out), env[id(value)]), (shape, value.name)


# --- single-op graphs ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class In:
    """Placeholder for graph input ``name`` in a single-op case."""

    name: str


def _single_op_module(kind: str, args: list, kwargs: dict, inputs: dict[str, torch.Tensor]):
    """A module of one op over ``inputs``, and the op's torch results (the reference)."""
    values = {n: Value(n, TensorType(dtype_name(t.dtype), tuple(t.shape))) for n, t in inputs.items()}

    def ref(arg):
        if isinstance(arg, In):
            return values[arg.name]
        return [ref(a) for a in arg] if isinstance(arg, list) else arg

    args, kwargs = [ref(a) for a in args], {k: ref(v) for k, v in kwargs.items()}
    env = {id(values[n]): t for n, t in inputs.items()}
    definition = op_def(kind)
    call_kwargs = {k: resolve_arg(v, env, None) for k, v in kwargs.items()}
    if definition.creates_tensor:
        call_kwargs["device"] = "cpu"
    out = definition.fn(*[resolve_arg(a, env, None) for a in args], **call_kwargs)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    results = [Value(f"r{i}", TensorType(dtype_name(o.dtype), tuple(o.shape))) for i, o in enumerate(outs)]
    op = Op(kind, args, kwargs, results, loc="case")
    graph = Graph(list(values.values()), [op], results, [f"out{i}" for i in range(len(results))])
    return Module(graph), outs


g = torch.Generator().manual_seed(0)
X = torch.randn(2, 3, 4, 5, generator=g)
M = torch.randn(3, 5, generator=g)
IDX = torch.tensor([[0, 2], [1, 1]])
Q, K, K4 = (torch.randn(2, h, s, 8, generator=g) for h, s in ((4, 5), (2, 7), (4, 7)))
CAUSAL_Q, CAUSAL_K = torch.randn(1, 2, 5, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g)
FLOAT_MASK = torch.where(torch.rand(5, 7, generator=g) > 0.3, 0.0, float("-inf"))
FLOAT_MASK[1] = float("-inf")  # one fully masked row: zeros, as torch
INTS = torch.tensor([[-7, 5, 6], [7, -5, 3]])

SINGLE_OP_CASES = {
    "gelu": ("gelu", [In("x")], {}, {"x": X}),
    "gelu-tanh": ("gelu", [In("x")], {"approximate": "tanh"}, {"x": X}),
    "layer_norm": ("layer_norm", [In("x"), [5], In("w"), In("b")], {}, {"x": X, "w": M[0], "b": M[1]}),
    "rms_norm": ("rms_norm", [In("x"), [5], In("w"), 1e-6], {}, {"x": X, "w": M[0]}),
    "log_softmax": ("log_softmax.int", [In("x"), 1], {}, {"x": X}),
    "cumsum": ("cumsum", [In("x"), 2], {}, {"x": X}),
    "split": ("split", [In("x"), 2, 2], {}, {"x": X}),
    "split_with_sizes": ("split_with_sizes", [In("x"), [1, 4], -1], {}, {"x": X}),
    "chunk": ("chunk", [In("x"), 2, 3], {}, {"x": X}),
    "unbind": ("unbind", [In("x"), 1], {}, {"x": X}),
    "index-after-none": ("index", [In("x"), [None, In("i")]], {}, {"x": X, "i": IDX}),
    "index-two-adjacent": ("index", [In("x"), [None, In("i"), In("j")]], {},
                           {"x": X, "i": IDX, "j": IDX.T.contiguous()}),
    "index-apart": ("index", [In("x"), [In("i"), None, In("j")]], {},
                    {"x": X, "i": IDX % 2, "j": IDX}),
    "gather": ("gather", [In("x"), 1, In("i")], {}, {"x": M, "i": IDX.repeat(2, 1)[:3]}),
    "index_select": ("index_select", [In("x"), 2, In("i")], {}, {"x": X, "i": IDX[0]}),
    "triu": ("triu", [In("x"), 1], {}, {"x": X}),
    "flip": ("flip", [In("x"), [1, -1]], {}, {"x": X}),
    "roll": ("roll", [In("x"), [2, -7], [1, -1]], {}, {"x": X}),
    "roll-flat": ("roll", [In("x"), [3]], {}, {"x": X}),
    "diff": ("diff", [In("x"), 2, 1], {}, {"x": X}),
    "diff-append": ("diff", [In("x"), 1, -1, In("p"), In("q")], {}, {"x": X, "p": X[..., :2], "q": X[..., :1]}),
    "diff-bool": ("diff", [In("x")], {}, {"x": X > 0}),
    "stack": ("stack", [[In("x"), In("y")], 1], {}, {"x": M, "y": M * 2}),
    "repeat": ("repeat", [In("x"), [2, 1, 3]], {}, {"x": M}),
    "flatten": ("flatten", [In("x"), 1, 2], {}, {"x": X}),
    "select": ("select", [In("x"), 1, -1], {}, {"x": X}),
    "narrow": ("narrow", [In("x"), 3, 1, 3], {}, {"x": X}),
    "squeeze": ("squeeze", [In("x"), 1], {}, {"x": X[:, :1]}),
    "masked_fill": ("masked_fill", [In("x"), In("m"), -1.5], {}, {"x": M, "m": M > 0}),
    "where-scalar": ("where.scalar_other", [In("m"), In("x"), 0.0], {}, {"x": M, "m": M > 0}),
    "clamp": ("clamp", [In("x"), -0.5, 0.5], {}, {"x": X}),
    "softplus": ("softplus", [In("x")], {}, {"x": X * 30}),
    "softplus-beta": ("softplus", [In("x"), 2.0, 5.0], {}, {"x": X * 4}),
    "square": ("square", [In("x")], {}, {"x": X}),
    "floor": ("floor", [In("x")], {}, {"x": X * 3}),
    "log1p": ("log1p", [In("x")], {}, {"x": X.abs()}),
    "clamp_max": ("clamp_max", [In("x"), 0.25], {}, {"x": X}),
    "clamp_min": ("clamp_min", [In("x"), -0.25], {}, {"x": X}),
    "log_sigmoid": ("log_sigmoid", [In("x")], {}, {"x": X * 60}),  # far into both tails
    "floor_divide-float": ("floor_divide", [In("x"), In("y")], {}, {"x": M * 5, "y": M.abs() + 0.5}),
    "floor_divide-int": ("floor_divide", [In("x"), In("y")], {}, {"x": INTS, "y": INTS.flip(1).abs()}),
    "vector_norm-2": ("linalg_vector_norm", [In("x"), 2, [-1], True], {}, {"x": X}),
    "vector_norm-1": ("linalg_vector_norm", [In("x"), 1, [1, 2]], {}, {"x": X}),
    "vector_norm-inf": ("linalg_vector_norm", [In("x"), float("inf"), [-1]], {}, {"x": X}),
    "vector_norm-3-all": ("linalg_vector_norm", [In("x"), 3], {}, {"x": X}),
    "scatter_add": ("scatter_add", [In("x"), 1, In("i"), In("s")], {},
                    {"x": M, "i": torch.tensor([[0, 0], [4, 2], [1, 1]]), "s": M[:, :2]}),
    "scatter-value": ("scatter.value", [In("x"), 1, In("i"), 1.0], {}, {"x": M, "i": IDX.repeat(2, 1)[:3]}),
    "slice_scatter": ("slice_scatter", [In("x"), In("s"), -1, 1, None, 2], {}, {"x": X, "s": X[..., 1::2] * 3}),
    "slice_scatter-neg": ("slice_scatter", [In("x"), In("s"), 1, -2, 9, 1], {}, {"x": X, "s": X[:, -2:] + 1}),
    "select_scatter": ("select_scatter", [In("x"), In("s"), 0, -1], {}, {"x": X, "s": X[0] * 2}),
    "erfinv": ("erfinv", [In("x")], {}, {"x": torch.tanh(X) * 0.999}),
    "std": ("std", [In("x"), [-1], True, True], {}, {"x": X}),
    "std-biased": ("std", [In("x"), [1, 2], False], {}, {"x": X}),
    "div-floor-int": ("div.mode", [In("x"), 2], {"rounding_mode": "floor"}, {"x": INTS}),
    "div-trunc-float": ("div.mode", [In("x"), 0.7], {"rounding_mode": "trunc"}, {"x": M}),
    "div-int-true": ("div", [In("x"), 4], {}, {"x": INTS}),
    "rsub": ("rsub", [In("x"), 2.0, 3], {}, {"x": M}),
    "add-alpha": ("add", [In("x"), In("y")], {"alpha": 2}, {"x": M, "y": M}),
    "pow-float": ("pow", [In("x"), 0.5], {}, {"x": M.abs()}),
    "ne-scalar": ("ne.scalar", [In("x"), 5], {}, {"x": INTS}),
    "not-bool": ("not", [In("x")], {}, {"x": M > 0}),
    "logical_or": ("logical_or", [In("x"), In("y")], {}, {"x": M > 0, "y": M < -1}),
    "any": ("any", [In("x"), 1], {}, {"x": M > 1}),
    "amax": ("amax", [In("x"), [1, 2], True], {}, {"x": X}),
    "sum-int": ("sum", [In("x"), [0]], {}, {"x": INTS}),
    "zeros_like": ("zeros_like", [In("x")], {}, {"x": M}),
    "full": ("full", [[2, 3], 1.5], {}, {}),
    "arange-float": ("arange.start_step", [0.5, 3.0, 0.5], {}, {}),
    "baddbmm": ("baddbmm", [In("b"), In("x"), In("y")], {"beta": 0.5, "alpha": 2},
                {"b": X[0, :, :, :4], "x": X[0], "y": X[1].transpose(1, 2)}),
    "sdpa-gqa": ("sdpa", [Q, K, K * 0.5], {"enable_gqa": True}, {}),
    "sdpa-causal": ("sdpa", [CAUSAL_Q, CAUSAL_K, CAUSAL_K], {"is_causal": True, "scale": 0.3}, {}),
    "sdpa-float-mask": ("sdpa", [Q, K4, K4 * 0.5, FLOAT_MASK], {}, {}),
}


def _lift_tensors(case):
    """Tensors written inline in a case become graph inputs q0, q1, ..."""
    kind, args, kwargs, inputs = case
    inputs = dict(inputs)
    lifted = []
    for i, arg in enumerate(args):
        if isinstance(arg, torch.Tensor):
            inputs[f"q{i}"] = arg
            arg = In(f"q{i}")
        lifted.append(arg)
    return kind, lifted, kwargs, inputs


@pytest.mark.parametrize("case", sorted(SINGLE_OP_CASES))
def test_single_op_matches_torch(case, tmp_path):
    kind, args, kwargs, inputs = _lift_tensors(SINGLE_OP_CASES[case])
    module, want = _single_op_module(kind, args, kwargs, inputs)
    emit_onnx(module, tmp_path / "op.onnx")
    got = _session(tmp_path / "op.onnx").run(None, {n: t.numpy() for n, t in inputs.items()})
    assert len(got) == len(want)
    for g_out, w_out in zip(got, want, strict=True):
        assert g_out.shape == tuple(w_out.shape)
        assert str(torch.as_tensor(g_out).dtype) == str(w_out.dtype)
        if w_out.dtype == torch.bool:
            assert torch.equal(torch.as_tensor(g_out), w_out)
        else:
            assert _max_diff(g_out, w_out.to(torch.float64).to(w_out.dtype)) <= TOLERANCE
