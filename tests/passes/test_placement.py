"""Device, precision and layer-wise calibration of the passes that run the model without
training it (``saliency``, ``knowledge``, ``prune``, ``reconstruct``, ``lhspg``'s scoring) and of
``lorashear eval``: the options parse and print back, ``device=cpu`` and ``layerwise=false``
give bitwise the default's result, a low precision on the CPU is refused naming the pass and
the option, and layer-wise calibration (one decoder layer at a time, weights read from their
files) equals whole-model calibration within 1e-5 on every tiny family."""

from __future__ import annotations

import pytest
import torch

from lorashear.analysis.layerwise import use_layerwise
from lorashear.analysis.placement import Placement, read_stored
from lorashear.errors import PassError
from lorashear.ir.core import Module, clone_module
from lorashear.ir.storage import FileStorage
from lorashear.passes import PassManager, parse_pipeline
from lorashear.passes.pipeline import format_pass
from tests.conftest import FAMILIES

MODEL_PASSES = ("saliency", "knowledge", "prune", "reconstruct")
RESULT_ATTRIBUTES = ("saliency", "knowledge", "prune-mask")


@pytest.fixture(scope="module")
def discovered(lowered):
    cache = {}

    def get(family: str = "llama", with_lora: bool = True) -> Module:
        key = (family, with_lora)
        if key not in cache:
            module = clone_module(lowered(family, with_lora))
            module.attributes.pop("groups", None)
            PassManager.parse("discover").run(module)
            cache[key] = module
        return clone_module(cache[key])

    return get


@pytest.fixture(scope="module")
def ids_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("placement") / "tokens.ids"
    ids = torch.randint(0, 128, (1200,), generator=torch.Generator().manual_seed(7))
    path.write_text(" ".join(map(str, ids.tolist())))
    return path


def data(path) -> str:
    return f'data="{path}",batches=2,batch=2,seq-len=16'


def pass_text(name: str, path, **options: str) -> str:
    extra = "".join(f",{k}={v}" for k, v in options.items())
    if name == "saliency":
        return f"saliency{{metric=wanda,{data(path)}{extra}}}"
    if name == "knowledge":
        return f"knowledge{{{data(path)},progress=false{extra}}}"
    if name == "prune":
        return f"prune{{metric=wanda,ratio=0.3,attn-share=auto,{data(path)}{extra}}}"
    return f"reconstruct{{{data(path)}{extra}}}"


def with_live_mask(module: Module, path) -> Module:
    """``module`` with the prune-mask of a wanda prune set but its units still alive: what
    ``reconstruct`` folds without a reference."""
    pruned = clone_module(module)
    PassManager.parse(pass_text("prune", path)).run(pruned)
    module.attributes["prune-mask"] = pruned.attributes["prune-mask"]
    return module


def run(module: Module, text: str) -> tuple[dict, dict]:
    """(result attributes as JSON-able values, parameter tensors) after running ``text``."""
    PassManager.parse(text).run(module)
    attributes = {k: module.attributes[k] for k in RESULT_ATTRIBUTES if k in module.attributes}
    tensors = {n: p.storage.load() for n, p in module.params.items()}
    return attributes, tensors


def assert_bitwise(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        assert torch.equal(a[1][name], b[1][name]), name


def prepared(name: str, discovered, path) -> Module:
    module = discovered()
    return with_live_mask(module, path) if name == "reconstruct" else module


# --- item 1: device and precision ---------------------------------------------------------------
@pytest.mark.parametrize("name", MODEL_PASSES)
def test_options_parse_and_print_back(name, ids_file):
    text = pass_text(name, ids_file, device="cpu", precision="fp32", layerwise="true")
    (parsed,) = parse_pipeline(text)
    assert (parsed.device, parsed.precision, parsed.layerwise) == ("cpu", "fp32", True)
    printed = format_pass(parsed)
    assert "device=cpu" in printed and "layerwise=true" in printed
    assert parse_pipeline(printed)[0] == parsed
    (default,) = parse_pipeline(pass_text(name, ids_file))
    assert (default.device, default.precision, default.layerwise) == ("auto", "fp32", "auto")


@pytest.mark.parametrize("name", MODEL_PASSES)
def test_device_cpu_is_bitwise_the_default(name, discovered, ids_file):
    default = run(prepared(name, discovered, ids_file), pass_text(name, ids_file))
    explicit = run(prepared(name, discovered, ids_file),
                   pass_text(name, ids_file, device="cpu", precision="fp32", layerwise="false"))
    assert_bitwise(default, explicit)


@pytest.mark.parametrize("metric", ["magnitude", "combined", "taylor", "random"])
def test_every_saliency_metric_takes_the_options(metric, discovered, ids_file):
    text = f"saliency{{metric={metric},{data(ids_file)}"
    default = run(discovered(), text + "}")
    explicit = run(discovered(), text + ",device=cpu,precision=fp32}")
    assert_bitwise(default, explicit)


@pytest.mark.parametrize("name", MODEL_PASSES)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_on_the_cpu_is_refused_naming_pass_and_option(name, precision, discovered, ids_file):
    module = prepared(name, discovered, ids_file)
    with pytest.raises(PassError, match=rf"{name}: precision={precision} needs a CUDA device; on cpu the pass runs in fp32"):
        PassManager.parse(pass_text(name, ids_file, device="cpu", precision=precision)).run(module)


@pytest.mark.parametrize("name", MODEL_PASSES)
def test_bad_device_and_precision_text_fail_at_parse(name, ids_file):
    with pytest.raises(PassError, match=rf"{name}: device='tpu' is not one of auto, cpu, cuda"):
        PassManager.parse(pass_text(name, ids_file, device="tpu"))
    with pytest.raises(PassError, match=r"precision|expected one of"):
        PassManager.parse(pass_text(name, ids_file, precision="int8"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_cuda_without_cuda_is_refused(discovered, ids_file):
    with pytest.raises(PassError, match="knowledge: device=cuda but CUDA is not available"):
        PassManager.parse(pass_text("knowledge", ids_file, device="cuda")).run(discovered())


def test_lhspg_scores_on_its_runtime_placement(discovered, ids_file, monkeypatch):
    """lhspg hands its runtime's device/precision to the group scoring."""
    import lorashear.passes.lhspg as lhspg

    seen = []
    original = lhspg.score_groups

    def spy(*args, **kwargs):
        seen.append(kwargs["placement"])
        return original(*args, **kwargs)

    monkeypatch.setattr(lhspg, "score_groups", spy)
    text = (f'lhspg{{ratio=0.2,periods=1,steps=1,data="{ids_file}",seq-len=16,batch=2,'
            "device=cpu,progress=false,attn-share=0}")
    PassManager.parse(text).run(discovered())
    assert seen == [Placement(torch.device("cpu"), None)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_on_cuda_the_passes_agree_with_the_cpu(precision, discovered, ids_file):
    """On a GPU: wanda scores, knowledge losses and the prune mask close to the CPU's (bf16:
    loosely, the forward runs in bf16)."""
    tolerance = 1e-4 if precision == "fp32" else 5e-2
    for name in ("saliency", "knowledge"):
        cpu = run(discovered(), pass_text(name, ids_file, device="cpu"))[0]
        gpu = run(discovered(), pass_text(name, ids_file, device="cuda", precision=precision))[0]
        if name == "saliency":
            for f, values in cpu["saliency"].as_dict().items():
                theirs = torch.tensor(gpu["saliency"].as_dict()[f])
                assert torch.allclose(theirs, torch.tensor(values), rtol=tolerance, atol=tolerance)
        else:
            assert abs(cpu["knowledge"].base_loss - gpu["knowledge"].base_loss) < tolerance * 10


# --- item 2: layer-wise calibration --------------------------------------------------------------
def close(a: tuple[dict, dict], b: tuple[dict, dict], tolerance: float = 1e-5) -> None:
    for key in a[0]:
        if key == "saliency":
            for f, values in a[0][key].as_dict().items():
                theirs = b[0][key].as_dict()[f]
                assert torch.allclose(torch.tensor(theirs), torch.tensor(values), rtol=tolerance, atol=tolerance)
        elif key == "knowledge":
            assert abs(a[0][key].base_loss - b[0][key].base_loss) <= tolerance
            for (f, x), (g, y) in zip(a[0][key].loss_increase, b[0][key].loss_increase, strict=True):
                assert f == g and abs(x - y) <= tolerance
            assert a[0][key].protected == b[0][key].protected
        else:
            assert a[0][key] == b[0][key]
    for name in a[1]:
        assert torch.allclose(a[1][name].double(), b[1][name].double(), rtol=tolerance, atol=tolerance), name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", MODEL_PASSES)
def test_layerwise_equals_whole_model(family, name, lowered, ids_file):
    def fresh() -> Module:
        module = clone_module(lowered(family, True))
        module.attributes.pop("groups", None)
        PassManager.parse("discover").run(module)
        return with_live_mask(module, ids_file) if name == "reconstruct" else module

    whole = run(fresh(), pass_text(name, ids_file, layerwise="false"))
    streamed = run(fresh(), pass_text(name, ids_file, layerwise="true"))
    close(whole, streamed)


def test_layerwise_saliency_covers_the_weight_metrics(discovered, ids_file):
    for metric in ("magnitude", "combined"):
        text = f"saliency{{metric={metric},{data(ids_file)}"
        close(run(discovered(), text + ",layerwise=false}"), run(discovered(), text + ",layerwise=true}"))


@pytest.mark.parametrize("family", FAMILIES)
def test_layerwise_taylor_equals_whole_model(family, lowered, ids_file):
    """The layer-by-layer forward and backward give the whole-model backward's scores."""
    def fresh() -> Module:
        module = clone_module(lowered(family, True))
        module.attributes.pop("groups", None)
        PassManager.parse("discover").run(module)
        return module

    text = f"saliency{{metric=taylor,{data(ids_file)}"
    whole = run(fresh(), text + ",layerwise=false}")
    streamed = run(fresh(), text + ",layerwise=true}")
    assert any(max(v) > 1e-3 for _, v in whole[0]["saliency"].scores)  # gradients that matter
    close(whole, streamed)


def test_layerwise_auto_follows_free_memory(discovered, monkeypatch):
    module = discovered()
    cpu = Placement()
    assert not use_layerwise("saliency", "auto", module, cpu)  # a tiny model fits
    monkeypatch.setattr("lorashear.analysis.placement.available_ram", lambda: 1024)
    assert use_layerwise("saliency", "auto", module, cpu)
    assert not use_layerwise("saliency", False, module, cpu)


def test_auto_streams_when_the_model_does_not_fit(discovered, ids_file, monkeypatch):
    """With too little memory, layerwise=auto gives the layer-wise walk's (equal) result."""
    whole = run(discovered(), pass_text("knowledge", ids_file, layerwise="false"))
    calls = []
    import lorashear.passes.knowledge as knowledge

    original = knowledge.variant_losses
    monkeypatch.setattr(knowledge, "variant_losses", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setattr("lorashear.analysis.placement.available_ram", lambda: 1024)
    auto = run(discovered(), pass_text("knowledge", ids_file))
    assert calls == [1]
    close(whole, auto)


def test_read_stored_reads_what_the_memory_map_reads(discovered):
    module = discovered()
    file_backed = [p for p in module.params.values() if isinstance(p.storage, FileStorage)]
    assert file_backed
    for param in file_backed:
        assert torch.equal(read_stored(param), param.storage.load()), param.name
