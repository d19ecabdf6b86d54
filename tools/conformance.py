"""Conformance sweep: every causal-LM architecture of the installed transformers, at toy size.

For each model type in transformers' causal-LM mapping, in its own subprocess with a timeout
(some models hang or eat memory at odd sizes): build the model from a shrunk config with random
weights, put a peft LoRA adapter (random B) on every linear layer, save both, then check

- lower: ``lower_pretrained(model dir, adapter=adapter dir)`` gives peft's logits (1e-4);
- groups: the group kinds ``discover`` finds (attention, MLP, hidden);
- compress: ``prune{metric=random}`` over the kinds found, then ``compress``: the masked and the
  compressed logits agree (1e-4) and the compressed model has fewer parameters;
- onnx: ONNX Runtime on the compressed model agrees with the torch executor (1e-4).

Each row says where an architecture stops and why (the first line of the error, prefixed with
the exception type when it is not one of lorashear's own errors, which would be a bug).

    python tools/conformance.py                     # all, writes docs/architectures.md
    python tools/conformance.py --only llama,gpt2   # a few, rows as JSON on stdout
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-4
ROW_PREFIX = "CONFORMANCE-ROW "

#: Toy sizes for the config attributes that set a model's size, by the names transformers'
#: configs use for them. Only attributes a config already has are set.
TOY_SIZES: dict[str, int] = {
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "emb_dim", "embed_dim", "dim"), 64),
    **dict.fromkeys(("intermediate_size", "n_inner", "ffn_dim", "d_ff", "ffn_hidden_size",
                     "decoder_ffn_dim", "encoder_ffn_dim", "inner_hidden_size", "dim_ff"), 96),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size",
                     "expert_intermediate_size"), 32),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers",
                     "encoder_layers"), 2),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "num_heads",
                     "decoder_attention_heads", "encoder_attention_heads"), 4),
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads", "multi_query_group_num", "n_kv_heads"), 2),
    **dict.fromkeys(("head_dim", "kv_channels", "attention_head_dim"), 16),
    "vocab_size": 128,
    # multi-head latent attention (DeepSeek-V2/V3, MiniCPM3) and grouped routing
    "kv_lora_rank": 32, "q_lora_rank": 48, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
    "v_head_dim": 16, "n_group": 1, "topk_group": 1,
    "rotary_dim": 8,
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len",
                     "max_sequence_length"), 256),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "top_k", "moe_k"), 2),
}

#: Sizes some default configs leave ``None`` where their model reads a number (Ministral's and
#: HunYuan's ``head_dim``, Nemotron's ``num_key_value_heads``); every real checkpoint sets them.
NONE_SIZES = ("head_dim", "num_key_value_heads")

#: Token ids a config names: kept inside the toy vocabulary.
TOKEN_ID_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id",
                 "sep_token_id", "cls_token_id", "mask_token_id", "unk_token_id")

#: Per-architecture config overrides where the generic shrink does not give a valid toy model.
OVERRIDES: dict[str, dict[str, Any]] = {
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "window_size": 4},
    "ctrl": {"dff": 96},
    "mamba2": {"head_dim": 32, "n_groups": 1},
    "reformer": {"is_decoder": True, "axial_pos_embds": False},  # its causal-LM head refuses an encoder
    "big_bird": {"attention_type": "original_full"},  # block-sparse needs sequences of 700+ tokens
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}},
    "gemma3n_text": {"num_kv_shared_layers": 0},  # 15 of its 35 layers share caches; 2 layers here
}

#: How every stage of a row can end.
STAGES = ("builds", "lower", "compress", "onnx")


# --- one architecture (runs in a child process) ------------------------------------------------
def _shrunk(config_dict: dict[str, Any], layers_before: int | None) -> dict[str, Any]:
    """Overrides that shrink one (sub-)config given as its ``to_dict()``."""
    out: dict[str, Any] = {}
    for key, value in config_dict.items():
        if key in NONE_SIZES and value is None:
            out[key] = TOY_SIZES[key]  # left to the model's defaults, which it does not fill in
        elif key in TOY_SIZES and isinstance(value, int) and not isinstance(value, bool):
            out[key] = min(value, TOY_SIZES[key]) if key.endswith("_tok") or key in ("top_k", "moe_k", "moe_topk") \
                else TOY_SIZES[key]
        elif key in TOKEN_ID_KEYS and isinstance(value, int) and value >= TOY_SIZES["vocab_size"]:
            out[key] = TOY_SIZES["vocab_size"] - 1 - TOKEN_ID_KEYS.index(key)
        elif key in TOKEN_ID_KEYS and isinstance(value, list):
            out[key] = [v if v < TOY_SIZES["vocab_size"] else TOY_SIZES["vocab_size"] - 1 for v in value]
        elif isinstance(value, list) and layers_before and len(value) == layers_before and layers_before > 2:
            # per-layer lists (layer_types, ...): the first layer and the first of another kind,
            # so a hybrid keeps both kinds of layer
            other = next((v for v in value[1:] if v != value[0]), value[1])
            out[key] = [value[0], other]
    return out


def _kept_layers(config_dict: dict[str, Any], layers: int) -> list[int]:
    """The two original layers the shrunk config keeps, as :func:`_shrunk` picks per-layer
    lists: the first, and the first of another kind (the second where all are alike)."""
    for value in config_dict.values():
        if isinstance(value, list) and len(value) == layers and layers > 2:
            other = next((i for i, v in enumerate(value) if v != value[0]), 1)
            return [0, other]
    return [0, 1]


def _shrunk_with_layers(config_dict: dict[str, Any], layers: int | None) -> dict[str, Any]:
    """:func:`_shrunk`, and the per-layer overrides (Gemma 4's wider full-attention heads),
    keyed by layer index, of the layers kept, renumbered."""
    out = _shrunk(config_dict, layers)
    if isinstance(config_dict.get("per_layer_config"), dict) and layers:
        kept = _kept_layers(config_dict, layers)
        out["per_layer_config"] = {str(new): {**value, **_shrunk(value, None)}
                                   for key, value in config_dict["per_layer_config"].items()
                                   for new, old in enumerate(kept) if int(key) == old}
    return out


def toy_config(model_type: str):
    """The default config of ``model_type`` with its sizes shrunk (sub-configs too)."""
    from transformers import AutoConfig, PretrainedConfig

    default = AutoConfig.for_model(model_type)
    data = default.to_dict()
    layers = next((data[k] for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
                   if isinstance(data.get(k), int)), None)
    overrides = _shrunk_with_layers(data, layers)
    for key in list(data):
        try:
            sub = getattr(default, key, None)
        except Exception:  # noqa: BLE001 - an attribute that varies per layer has no one value
            continue
        if isinstance(sub, PretrainedConfig):
            sub_data = sub.to_dict()
            sub_layers = next((sub_data[k] for k in ("num_hidden_layers", "n_layer", "num_layers")
                               if isinstance(sub_data.get(k), int)), None)
            overrides[key] = {**sub_data, **_shrunk_with_layers(sub_data, sub_layers)}
    if data.get("num_experts_per_tok", 0) is None and data.get("n_routed_experts"):
        overrides["num_experts_per_tok"] = 2
    if "kv_lora_rank" in data and "num_key_value_heads" in overrides:  # latent attention: no GQA
        overrides["num_key_value_heads"] = overrides.get("num_attention_heads", 4)
    if "qk_rope_head_dim" in data and "head_dim" in data:  # latent attention: RoPE's head_dim is the rotary part
        overrides["head_dim"] = overrides.get("qk_rope_head_dim", data["qk_rope_head_dim"])
    overrides.update(OVERRIDES.get(model_type, {}))
    return AutoConfig.for_model(model_type, **overrides)


def _inputs(vocab: int):
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in row 1: compared on the real positions only
    return ids, mask


def _max_diff(a, b, mask) -> float:
    import torch

    a, b = torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
    if a.shape != b.shape:
        raise AssertionError(f"logits shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a - b).abs()[mask.bool()].max().item()


def _reason(exc: BaseException) -> str:
    from lorashear.errors import LorashearError, first_line

    line = first_line(exc)
    if isinstance(exc, LorashearError):
        return line
    return f"{type(exc).__name__}: {line}"


def first_line_of(exc: BaseException) -> str:
    from lorashear.errors import first_line

    return first_line(exc)


def _num_params(module) -> int:
    import math

    return sum(math.prod(p.type.shape) for p in module.params.values() if not p.buffer)


def check_architecture(model_type: str, work: Path) -> dict[str, Any]:
    """Run the whole check on one architecture; a row for the table."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    row: dict[str, Any] = {"architecture": model_type, "builds": False, "lower": None, "groups": {},
                           "compress": None, "onnx": None, "reason": "", "lorashear_error": True}

    def fail(stage: str, exc: BaseException) -> dict[str, Any]:
        from lorashear.errors import LorashearError

        row[stage] = False if stage != "builds" else False
        row["stage"] = stage
        row["reason"] = _reason(exc)
        if stage != "builds" and not isinstance(exc, LorashearError):
            row["lorashear_error"] = False
            row["traceback"] = traceback.format_exc(limit=-6)
        from lorashear.errors import UnsupportedModelError

        if isinstance(exc, UnsupportedModelError):
            row["refused"] = True
        return row

    # build (transformers and peft, not ours: a failure here is the sweep's, not lorashear's)
    base = None
    try:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        from lorashear.frontend.pretrained import model_from_config

        config = toy_config(model_type)
        base = model_from_config(AutoModelForCausalLM, config).eval()
        vocab = base.get_output_embeddings().weight.shape[0] if base.get_output_embeddings() is not None \
            else config.get_text_config().vocab_size
        model_dir, adapter_dir = work / "model", work / "adapter"
        base.save_pretrained(model_dir)
        peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        peft_model.save_pretrained(adapter_dir)
        peft_model.eval()
        ids, mask = _inputs(vocab)
        with torch.no_grad():
            want = peft_model(input_ids=ids, attention_mask=mask).logits
    except Exception as exc:
        fail("builds", exc)
        if base is not None:  # what lowering would say of the model transformers built
            from lorashear.errors import UnsupportedModelError
            from lorashear.frontend.scope import refuse_out_of_scope

            try:
                refuse_out_of_scope(base)
            except UnsupportedModelError as refusal:
                row["refused"] = True
                row["reason"] = f"{first_line_of(refusal)} (the toy model does not run: {row['reason']})"
        return row
    row["builds"] = True

    from lorashear.frontend.pretrained import lower_pretrained
    from lorashear.ir.core import clone_module
    from lorashear.passes import PassManager
    from lorashear.runtime.executor import emit_torch

    try:
        module = lower_pretrained(model_dir, adapter=adapter_dir)
        with torch.no_grad():
            got = emit_torch(module)(ids, attention_mask=mask).logits
        diff = _max_diff(got, want, mask)
        if not diff <= TOLERANCE:
            raise AssertionError(f"lowered logits differ from peft's by {diff:.3g}")
        row["lower"] = True
        PassManager.parse("discover").run(module)
        groups = module.attributes["groups"]
        row["groups"] = dict(sorted(Counter(f.kind for f in groups.families).items()))
    except Exception as exc:
        return fail("lower", exc)

    kinds = [k for k in ("attn", "mlp", "hidden", "expert") if k in row["groups"]]
    if not kinds:
        row["compress"] = False
        row["stage"] = "compress"
        row["reason"] = "discover found no attention, MLP, hidden or expert groups"
        return row
    try:
        PassManager.parse(f"prune{{ratio=0.3,metric=random,kinds={','.join(kinds)}}}").run(module)
        with torch.no_grad():
            masked = emit_torch(module)(ids, attention_mask=mask).logits
        compressed = clone_module(module)
        PassManager.parse("compress").run(compressed)
        with torch.no_grad():
            small = emit_torch(compressed)(ids, attention_mask=mask).logits
        diff = _max_diff(small, masked, mask)
        before, after = _num_params(module), _num_params(compressed)
        row["params"] = [before, after]
        if not diff <= TOLERANCE:
            raise AssertionError(f"compressed logits differ from the masked model's by {diff:.3g}")
        if not after < before:
            raise AssertionError(f"compress kept all {before} parameters")
        row["compress"] = True
    except Exception as exc:
        return fail("compress", exc)

    try:
        import onnxruntime as ort

        from lorashear.runtime.onnx_emit import emit_onnx

        path = work / "model.onnx"
        emit_onnx(compressed, path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        (onnx_logits,) = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        diff = _max_diff(onnx_logits, small, mask)
        if not diff <= TOLERANCE:
            raise AssertionError(f"ONNX Runtime logits differ from torch's by {diff:.3g}")
        row["onnx"] = True
    except Exception as exc:
        return fail("onnx", exc)
    return row


def _child(model_types: list[str]) -> None:
    """Check ``model_types`` one after another in this process (the imports are paid once),
    printing each row as it is done."""
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for model_type in model_types:
        start = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f"conformance-{model_type}-") as tmp:
            row = check_architecture(model_type, Path(tmp))
        row["seconds"] = round(time.monotonic() - start, 1)
        print(ROW_PREFIX + json.dumps(row), flush=True)


# --- the sweep (parent) --------------------------------------------------------------------------
def architectures() -> list[str]:
    """Every model type of the installed transformers' causal-LM mapping, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _failed_row(model_type: str, reason: str, *, lorashear_error: bool) -> dict[str, Any]:
    return {"architecture": model_type, "builds": None, "lower": None, "groups": {}, "compress": None,
            "onnx": None, "reason": reason, "lorashear_error": lorashear_error}


def run_batch(model_types: list[str], timeout: float) -> Iterator[dict[str, Any]]:
    """Rows for ``model_types``, checked in order by niced subprocesses: one process for as
    many as it gets through, a fresh one after an architecture that hangs past ``timeout``
    seconds (killed, a "timed out" row) or kills its process (a "child died" row)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    pending = list(model_types)
    while pending:
        cmd = ["nice", "-n", "10", sys.executable, str(Path(__file__).resolve()), "--child", ",".join(pending)]
        with tempfile.TemporaryFile("w+") as stderr:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, cwd=ROOT)
            lines: queue.Queue[str | None] = queue.Queue()
            threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
            while pending:
                try:
                    line = lines.get(timeout=timeout)
                except queue.Empty:
                    proc.kill()
                    proc.wait()
                    yield _failed_row(pending.pop(0), f"timed out after {timeout:.0f} s", lorashear_error=True)
                    break
                if line is None:  # the process ended before reporting the current architecture
                    proc.wait()
                    stderr.seek(0)
                    tail = (stderr.read().strip().splitlines() or ["no output"])[-1]
                    yield _failed_row(pending.pop(0), f"child died (exit {proc.returncode}): {tail}",
                                      lorashear_error=False)
                    break
                if line.startswith(ROW_PREFIX):
                    row = json.loads(line[len(ROW_PREFIX):])
                    pending.remove(row["architecture"])
                    yield row
            if proc.poll() is None and not pending:
                proc.wait()


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))
    lines.put(None)


def _mark(value: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "-"}[value]


def summary(rows: list[dict[str, Any]]) -> dict[str, int]:
    """The counts the README quotes."""
    built = [r for r in rows if r.get("builds")]
    full = [r for r in built if r.get("compress") and {"attn", "mlp"} <= set(r.get("groups", {}))]
    return {
        "architectures": len(rows),
        "build": len(built),
        "lower": sum(1 for r in built if r.get("lower")),
        "compress": sum(1 for r in built if r.get("compress")),
        "compress_attn_mlp": len(full),
        "onnx": sum(1 for r in built if r.get("onnx")),
        "refused": sum(1 for r in rows if r.get("refused")),
        "not_lorashear_errors": sum(1 for r in rows if not r.get("lorashear_error", True)),
    }


def stage_of(row: dict[str, Any]) -> str:
    """Where a row stopped: ``refused``, or the stage that failed."""
    return "refused" if row.get("refused") else row.get("stage") or "sweep"


def _causes(rows: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """The reasons of the rows that do not go all the way, cut to their kind and counted."""
    import re

    causes: Counter[str] = Counter()
    for r in rows:
        if r.get("onnx"):
            continue
        reason = r.get("reason", "") or "no error, but not all the way"
        reason = re.sub(r"model type '[^']*'", "model type X", reason)
        reason = re.sub(r"model /tmp/\S+", "model", reason)
        reason = re.sub(r" at module \S+| \(hint: .*", "", reason)
        reason = re.sub(r"(could not trace) \w+:", r"\1:", reason)
        reason = re.sub(r"stores \S+ as \S+", "stores a parameter as a key", reason)
        reason = re.sub(r"module \S+ \(\w+\) is ", "a layer is ", reason)
        cut = reason if stage_of(r) != "builds" else reason.split(":")[0]
        cut = re.split(r"[\"(]|, which", cut, maxsplit=1)[0].strip()[:110]
        causes[f"{stage_of(r)}: {cut}"] += 1
    return causes.most_common()


def markdown(rows: list[dict[str, Any]]) -> str:
    """docs/architectures.md: the counts, then one row per architecture."""
    import re

    import peft
    import torch
    import transformers

    s = summary(rows)
    lines = [
        "# Architectures: the conformance sweep",
        "",
        f"Written by `tools/conformance.py` (transformers {transformers.__version__}, peft "
        f"{peft.__version__}, torch {torch.__version__}): every model type in transformers' causal-LM "
        "mapping, built at toy size (hidden 64, 2 layers, 4 heads, vocabulary 128) with random "
        "weights and a peft LoRA adapter on every linear layer, then lowered, discovered, pruned "
        "(`prune{metric=random}` over the group kinds found, whole experts included) and compressed, and the compressed "
        "model run in ONNX Runtime. Tolerance 1e-4 on the logits throughout.",
        "",
        f"- {s['architectures']} model types; {s['build']} build and run at toy size with LoRA "
        "(the others fail in transformers or peft, see *reason*)",
        f"- {s['lower']} of those lower exactly (logits equal peft's)",
        f"- {s['compress']} prune + compress exactly with fewer parameters, {s['compress_attn_mlp']} "
        "of them with both attention and MLP groups",
        f"- {s['onnx']} run in ONNX Runtime, compressed, with the torch executor's logits",
        f"- {s['refused']} refused as out of scope (state-space, recurrent or encoder-decoder "
        "layers) with `UnsupportedModelError`, among them those whose toy model does not run",
        f"- {s['not_lorashear_errors']} end in an exception that is not a `LorashearError`",
        "",
        "Columns: *builds* (transformers + peft at toy size), *lower* (lowered logits == peft's), "
        "*groups* (families `discover` finds, by kind), *compress* (masked == compressed, fewer "
        "parameters), *onnx* (ONNX Runtime == torch on the compressed model), *reason* (where it "
        "stops: the first line of the error).",
        "",
        "Where the others stop, most frequent first (reasons shortened; the table has them whole):",
        "",
        *[f"- {count} x {cause}" for cause, count in _causes(rows)],
        "",
        "| architecture | builds | lower | groups | compress | onnx | reason |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["architecture"]):
        groups = ", ".join(f"{k} {v}" for k, v in sorted(r.get("groups", {}).items())) or "-"
        reason = re.sub(r"/tmp/conformance-[^/\s]*/", "", r.get("reason", ""))  # the temporary directory
        reason = reason.replace("|", "\\|").replace("\n", " ")
        if len(reason) > 160:
            reason = reason[:157] + "..."
        lines.append(f"| {r['architecture']} | {_mark(r.get('builds'))} | {_mark(r.get('lower'))} | "
                     f"{groups} | {_mark(r.get('compress'))} | {_mark(r.get('onnx'))} | {reason} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated model types (default: all of "
                        "transformers' causal-LM mapping)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds one architecture may take before it counts as hung")
    parser.add_argument("--results", type=Path, default=None,
                        help="JSON-lines file of rows: rows already there are kept (resume), "
                        "new rows appended as they finish")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="write the table here (default: docs/architectures.md for a full sweep)")
    parser.add_argument("--child", metavar="MODEL_TYPES", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child.split(","))
        return 0
    names = [n for n in args.only.split(",") if n] if args.only else architectures()
    rows: dict[str, dict[str, Any]] = {}
    if args.results is not None and args.results.is_file():
        for line in args.results.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["architecture"]] = row
    for row in run_batch([n for n in names if n not in rows], args.timeout):
        name = row["architecture"]
        rows[name] = row
        if args.results is not None:
            with args.results.open("a") as f:
                f.write(json.dumps(row) + "\n")
        print(json.dumps({k: row.get(k) for k in ("architecture", "builds", "lower", "groups", "compress",
                                                  "onnx", "reason", "seconds")}), flush=True)
    selected = [rows[n] for n in names]
    out = args.markdown or (ROOT / "docs" / "architectures.md" if not args.only else None)
    if out is not None:
        out.write_text(markdown(selected))
    print(json.dumps(summary(selected)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
