"""Tiny random models built in code (no hub): Llama with GQA, Mistral, Qwen2 with q/k/v bias.

Each family is saved once per session as an HF directory, with a peft LoRA adapter whose B
factors are non-zero (so the adapter really changes the outputs), and lowered once.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch


@dataclasses.dataclass
class TinyModel:
    """A saved tiny model, its adapter, and the reference PyTorch objects."""

    family: str
    model_dir: Path
    adapter_dir: Path
    base: torch.nn.Module  # the HF model without adapter
    peft: torch.nn.Module  # the PeftModel (shares base weights; eval mode)


def tiny_config(family: str, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if family == "llama":
        cfg = LlamaConfig(**{**common, "tie_word_embeddings": True, **overrides})
    elif family == "mistral":
        cfg = MistralConfig(**{**common, "num_hidden_layers": 3, "sliding_window": None,
                               "tie_word_embeddings": False, **overrides})
    elif family == "qwen2":
        cfg = Qwen2Config(**{**common, "hidden_size": 96, "num_attention_heads": 6,
                             "num_key_value_heads": 3, "intermediate_size": 128,
                             "tie_word_embeddings": True, **overrides})
    elif family == "llama-mha":
        cfg = LlamaConfig(**{**common, "num_key_value_heads": 4, "tie_word_embeddings": False,
                             **overrides})
    else:
        raise ValueError(family)
    return cfg


def build_tiny(family: str, root: Path, *, seed: int = 0, lora_targets=None,
               config_overrides=None) -> TinyModel:
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(tiny_config(family, **(config_overrides or {})),
                                            attn_implementation="sdpa").eval()
    model_dir = root / f"{family}-model"
    base.save_pretrained(model_dir)
    targets = lora_targets or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapter_dir = root / f"{family}-adapter"
    peft_model = with_lora(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=targets),
                           adapter_dir)
    return TinyModel(family, model_dir, adapter_dir, base, peft_model)


def with_lora(base, lora_config, adapter_dir: Path | None = None):
    """``base`` wrapped by peft with ``lora_config``, its ``lora_B`` factors drawn from N(0, 0.05)
    (peft starts them at zero, where an adapter changes nothing), saved to ``adapter_dir`` when
    given; in eval mode."""
    from peft import get_peft_model

    peft_model = get_peft_model(base, lora_config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    if adapter_dir is not None:
        peft_model.save_pretrained(adapter_dir)
    return peft_model.eval()


FAMILIES = ("llama", "mistral", "qwen2")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, TinyModel]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: build_tiny(family, root) for family in FAMILIES}


@pytest.fixture(scope="session")
def lowered(tiny_models):
    """(family, with_lora) -> lowered Module, computed once per session."""
    from lorashear.frontend.pretrained import lower_pretrained

    cache = {}

    def get(family: str, with_lora: bool):
        key = (family, with_lora)
        if key not in cache:
            tm = tiny_models[family]
            cache[key] = lower_pretrained(tm.model_dir, adapter=tm.adapter_dir if with_lora else None)
        return cache[key]

    return get


def random_batch(vocab: int, batch: int = 3, seq: int = 11, seed: int = 1):
    """Random ids and a mask with left padding in row 1 and right padding in row 2."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1:
        mask[1, :3] = 0
    if batch > 2:
        mask[2, seq - 3:] = 0
    return ids, mask


def markov_tokens(n: int, multiplier: int = 5, offset: int = 3, seed: int = 0,
                  vocab: int = 128) -> torch.Tensor:
    """A learnable token stream: next = (multiplier * prev + offset) % vocab, 10% random."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, dtype=torch.long)
    out[0] = 1
    noise = torch.rand(n, generator=g) < 0.1
    rand = torch.randint(0, vocab, (n,), generator=g)
    for i in range(1, n):
        out[i] = rand[i] if noise[i] else (multiplier * out[i - 1] + offset) % vocab
    return out


def train_all_weights(model, windows: torch.Tensor, steps: int, seed: int, lr: float = 3e-3) -> None:
    """Train every non-LoRA weight of an HF model on random batches of 8 windows (AdamW)."""
    weights = [p.requires_grad_(True) for n, p in model.named_parameters() if "lora" not in n]
    opt = torch.optim.AdamW(weights, lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = windows[torch.randint(0, len(windows), (8,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def save_base_and_lower(base, model_dir: Path, adapter_dir: Path):
    """Overwrite ``model_dir``'s weights with ``base``'s (a peft-wrapped HF model, tied
    embeddings) and lower it with the adapter in ``adapter_dir``."""
    from safetensors.torch import save_file

    from lorashear.frontend.lower import canonical_param_name
    from lorashear.frontend.pretrained import lower_pretrained

    state = {canonical_param_name(n): p.detach().clone().contiguous()
             for n, p in base.named_parameters() if "lora_" not in n}
    state.pop("lm_head.weight", None)  # tied to the embedding
    save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    return lower_pretrained(model_dir, adapter=adapter_dir)


def save_word_tokenizer(model_dir: Path, corpus: list[str], vocab_size: int) -> None:
    """Train a word-level fast tokenizer on ``corpus`` (offline, the `tokenizers` library) and
    save it in ``model_dir``, so that passes reading text find it through the module's source."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(corpus, trainers.WordLevelTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<unk>", "</s>"]))
    assert tokenizer.get_vocab_size() <= vocab_size
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>",
                            eos_token="</s>").save_pretrained(model_dir)


def fork_run(body, stderr_path: Path) -> int:
    """Run ``body()`` in a forked child (it inherits the imported modules and the torch thread
    count, so it starts at once and computes as this process does); its ``sys.stderr`` goes
    line-buffered to ``stderr_path``. Returns the child's pid; its exit code is 0 on success."""
    import os
    import sys

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 3
        try:
            sys.stderr = sys.stdout = open(stderr_path, "w", buffering=1)  # noqa: SIM115
            code = int(body() or 0)
        except BaseException:  # noqa: BLE001 - a child must never return into pytest
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def kill_when(pid: int, path: Path, stderr_path: Path, timeout: float = 120) -> None:
    """SIGKILL the child ``pid`` as soon as ``path`` exists; fail if the child ended first."""
    import os
    import signal
    import time

    deadline = time.time() + timeout
    while not path.exists() and time.time() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.002)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert path.exists(), f"{path.name} never appeared: {stderr_path.read_text()[-2000:]}"


def pytest_addoption(parser):
    parser.addoption("--fuzz-examples", type=int, default=None, metavar="N",
                     help="mutants the .ir fuzz test runs (default: a quick few for `make test`)")


def training_setup(module, root):
    """The tiny Llama ``module`` made ready for the LoRA-training tests: LoRA dropout off (a
    slice of a batch then sees exactly what it sees inside the whole batch), discovered, two
    token streams with a data spec naming them, and the module saved as the KD reference."""
    from lorashear.ir.core import clone_module
    from lorashear.ir.fileformat import save_ir
    from lorashear.passes import PassManager

    for op in module.graph.ops:
        if op.kind == "lora_linear":
            op.kwargs["dropout"] = 0.0
    PassManager.parse("discover").run(module)
    for name, seed in (("a", 0), ("b", 1)):
        tokens = markov_tokens(2000, 5 + 2 * seed, 3 + 8 * seed, seed=seed)
        (root / f"{name}.ids").write_text(" ".join(map(str, tokens.tolist())))
    (root / "spec.yaml").write_text("sources:\n  - path: a.ids\n    name: a\n  - path: b.ids\n    name: b\n")
    save_ir(clone_module(module), root / "reference.ir")
    return module, root


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a test module (``pytestmark = pytest.mark.usefixtures(...)``):
    the tiny matmuls crawl when threads wait on a busy shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def compress_exactly(model, module, vocab: int, removals: dict, tmp_path: Path, seqs=(7, 10)):
    """The lowered ``module`` gives ``model``'s logits; removing ``removals`` (family id ->
    units) masks and compresses to the same logits with fewer parameters, and ONNX Runtime
    agrees with the compressed model at each sequence length of ``seqs``. Returns the
    compressed module."""
    pytest.importorskip("onnxruntime")
    from lorashear.analysis.masking import zero_groups
    from lorashear.ir.core import clone_module
    from lorashear.passes.compress import compress_module
    def logits(m, ids):
        return ir_logits(m, ids, torch.ones_like(ids))

    ids, _ = random_batch(vocab, batch=2, seq=seqs[0])
    with torch.no_grad():
        want = model(ids, attention_mask=torch.ones_like(ids)).logits
    assert (logits(module, ids) - want).abs().max().item() <= 1e-5
    groups = module.attributes["groups"]
    masked, compressed = clone_module(module), clone_module(module)
    zero_groups(masked, groups, removals)
    compress_module(compressed, groups, removals)
    assert (logits(masked, ids) - logits(compressed, ids)).abs().max().item() <= 1e-4
    assert compressed.num_parameters() < module.num_parameters()
    run_onnx = onnx_runner(compressed, tmp_path / "model.onnx")
    for seq in seqs:
        ids, _ = random_batch(vocab, batch=2, seq=seq)
        assert (run_onnx(ids, torch.ones_like(ids)) - logits(compressed, ids)).abs().max().item() <= 1e-4
    return compressed


def ir_logits(module, ids, mask=None):
    """``module``'s logits on ``ids`` through the executor, without gradients."""
    from lorashear.runtime.executor import emit_torch

    with torch.no_grad():
        return emit_torch(module)(ids, attention_mask=mask).logits


def lower_exactly(model, vocab: int, seq: int = 7):
    """``lower(model)``, checked to give ``model``'s own logits (1e-4) on a random batch of two
    ``seq``-token rows; returns ``(module, ids, mask)``."""
    from lorashear.frontend.lower import lower

    module = lower(model)
    ids, mask = random_batch(vocab, batch=2, seq=seq)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    assert (ir_logits(module, ids, mask) - want).abs()[mask.bool()].max().item() <= 1e-4
    return module, ids, mask


def onnx_runner(module, path):
    """``module`` emitted to ONNX at ``path`` and opened in ONNX Runtime (one thread): a
    function of ``(ids, mask)`` to the logits, as a tensor. Skips the test without onnxruntime."""
    ort = pytest.importorskip("onnxruntime")
    from lorashear.runtime.onnx_emit import emit_onnx

    emit_onnx(module, path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(ids, mask):
        (got,) = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        return torch.as_tensor(got)

    return run

