"""Run EleutherAI lm-eval tasks on an in-memory model, hub tasks and our local task alike.

Hub tasks (BoolQ, PIQA, HellaSwag, WinoGrande, ARC, OpenBookQA, the LoRAShear paper's table)
download their data from the Hugging Face hub, so they run only where the hub is reachable.
The local HellaSwag-style task (:mod:`lorashear.eval.local_task`) is handed to lm-eval as an
inline task config whose ``custom_dataset`` returns the items from memory: no file, no
download, so it runs offline and is scored by lm-eval's own multiple-choice code (a cross-check
of our scorer).

A transformers model goes through lm-eval's ``HFLM``; any other causal LM callable (such as the
module lorashear emits for a non-uniform pruned model) goes through :class:`CallableLM`, which
scores with the same code as our own evaluators.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from lorashear.errors import DataError, LorashearError
from lorashear.eval._scoring import model_device, score_continuations
from lorashear.eval.local_task import LOCAL_TASK_NAME, MultipleChoiceItem

#: The zero-shot commonsense tasks of the LoRAShear paper, by their lm-eval names.
HUB_TASKS: tuple[str, ...] = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy",
                              "arc_challenge", "openbookqa")
#: lm-eval's name for our local task (lm-eval task names use underscores).
LM_EVAL_LOCAL_TASK = "lorashear_local_hellaswag"
#: Metrics worth reporting, in this order, when lm-eval returns them.
REPORTED_METRICS: tuple[str, ...] = ("acc", "acc_norm", "word_perplexity", "byte_perplexity")


class HarnessError(LorashearError):
    """lm-eval is missing, a task is unknown, or a hub task's data cannot be fetched."""


def _import_lm_eval() -> Any:
    try:
        import lm_eval  # noqa: F401
        from lm_eval.api.model import TemplateLM  # noqa: F401
    except ImportError as exc:
        raise HarnessError("lm-eval tasks need the 'lm-eval' package",
                           hint="run `pip install lm-eval`") from exc
    return lm_eval


def _make_callable_lm_class() -> type:
    """Define :class:`CallableLM` on first use, so importing this module needs no lm-eval."""
    from lm_eval.api.model import TemplateLM

    class CallableLM(TemplateLM):
        """lm-eval's view of any causal LM callable ``model(input_ids, attention_mask)``.

        Supports the log-likelihood request types (multiple choice and rolling perplexity),
        which is what every task of the paper's table uses, and generation tasks
        (``generate_until``) for a model with a ``generate`` method.
        """

        def __init__(self, model: object, tokenizer: Any, *, batch_size: int = 16,
                     max_length: int = 2048) -> None:
            super().__init__()
            self.model = model
            self.tokenizer = tokenizer
            self.batch_size = batch_size
            self.max_length = max_length
            self._device = model_device(model)

        @property
        def eot_token_id(self) -> int:
            for token_id in (self.tokenizer.eos_token_id, self.tokenizer.bos_token_id):
                if token_id is not None:
                    return int(token_id)
            return 0

        def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                       **kwargs: Any) -> list[int]:
            return list(self.tokenizer(string, add_special_tokens=bool(add_special_tokens),
                                       verbose=False)["input_ids"])

        def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False,
                                  **kwargs: Any) -> list[tuple[float, bool]]:
            pairs = [(context, continuation) for _, context, continuation in requests]
            scores = score_continuations(self.model, pairs, batch_size=self.batch_size,
                                         max_length=self.max_length, progress=not disable_tqdm,
                                         description="lm-eval loglikelihood")
            return [(score.loglikelihood, score.is_greedy) for score in scores]

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
            from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

            totals = []
            for request in requests:
                (string,) = request.args
                # lm-eval's own windows (context length 1), so numbers match HFLM's.
                pairs = [make_disjoint_window(window) for window in get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)]
                scores = score_continuations(self.model, pairs, batch_size=self.batch_size,
                                             max_length=self.max_length)
                totals.append(sum(score.loglikelihood for score in scores))
            return totals

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
            """Each request's continuation, by the model's ``generate`` (lorashear's emitted
            models have transformers' own; see :func:`generate_continuation`), one request at a
            time in their order, so no padding enters a prompt."""
            if not callable(getattr(self.model, "generate", None)):
                raise HarnessError("generation tasks need a model with a generate() method",
                                   hint="load it with lorashear.load_pretrained, or use "
                                   "multiple-choice or perplexity tasks")
            from tqdm.auto import tqdm

            eos = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
            results = []
            for request in tqdm(requests, disable=disable_tqdm, desc="lm-eval generate_until"):
                context, gen_kwargs = request.args
                text = generate_continuation(self.model, self.tokenizer, self.tok_encode(context),
                                             gen_kwargs, eos=eos, max_length=self.max_length,
                                             device=self._device)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            return results

    return CallableLM


#: lm-eval's default cap on new tokens of a generation request (its ``HFLM.max_gen_toks``).
DEFAULT_MAX_GEN_TOKS = 256


def generate_continuation(model: Any, tokenizer: Any, context_ids: list[int],
                          gen_kwargs: dict[str, Any], *, eos: str | None, max_length: int,
                          device: Any = None) -> str:
    """One lm-eval ``generate_until`` request on ``model.generate``, as lm-eval's HF backend
    runs it: ``until`` stop strings (plus the EOS token's text) end the decoding and are cut
    from the text, ``max_gen_toks`` caps the new tokens (default 256), decoding is greedy
    unless the task asks for sampling (``do_sample``, or a temperature above 0), and the
    prompt keeps its last ``max_length - max_gen_toks`` tokens."""
    import torch
    from lm_eval.models.utils import (
        handle_stop_sequences,
        normalize_gen_kwargs,
        postprocess_generated_text,
    )
    from lm_eval.models.utils_hf import stop_sequences_criteria

    kwargs = dict(normalize_gen_kwargs(dict(gen_kwargs), DEFAULT_MAX_GEN_TOKS))
    until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
    max_gen_toks = kwargs.pop("max_gen_toks")
    if max_gen_toks >= max_length:
        raise HarnessError(f"the task asks for {max_gen_toks} new tokens; the model's context "
                           f"is {max_length}", hint="raise max_length or lower max_gen_toks")
    kwargs.pop("max_length", None)
    if not kwargs.get("do_sample"):  # greedy: no sampling settings from the model's config
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    ids = torch.tensor([context_ids[-(max_length - max_gen_toks):]], dtype=torch.long, device=device)
    if ids.shape[1] == 0:
        raise HarnessError("a generation request has an empty context")
    eos_id = tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_gen_toks,
                             stopping_criteria=stop_sequences_criteria(tokenizer, until,
                                                                       ids.shape[1], 1),
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id
                             is not None else eos_id, **kwargs)
    text = tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
    return postprocess_generated_text(generation=text, stop=until, think_end_token=None)


def make_lm(model: object, tokenizer: Any, *, batch_size: int = 16, max_length: int = 2048,
            backend: str = "auto") -> Any:
    """Wrap an in-memory model for lm-eval.

    ``backend="auto"`` uses lm-eval's ``HFLM`` for a transformers model and
    :class:`CallableLM` for anything else; ``"hf"`` and ``"callable"`` force one.
    """
    _import_lm_eval()
    from transformers import PreTrainedModel

    if backend not in ("auto", "hf", "callable"):
        raise HarnessError(f"unknown lm-eval backend '{backend}'", hint="auto, hf or callable")
    if backend == "hf" or (backend == "auto" and isinstance(model, PreTrainedModel)):
        from lm_eval.models.huggingface import HFLM

        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                    max_length=max_length, device=str(model_device(model)))
    return _make_callable_lm_class()(model, tokenizer, batch_size=batch_size,
                                     max_length=max_length)


def local_task_config(items: Sequence[MultipleChoiceItem],
                      name: str = LM_EVAL_LOCAL_TASK) -> dict[str, Any]:
    """An lm-eval task config for our multiple-choice items, served from memory.

    The prompt is the context, the choices are the endings joined with one space: the same
    strings :func:`lorashear.eval.local_task.score_multiple_choice` scores.
    """
    if not items:
        raise DataError("no multiple-choice items for the lm-eval local task")
    rows = [item.to_dict() for item in items]

    def load_items(**_: Any) -> Any:
        import datasets

        return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})

    return {
        "task": name,
        "custom_dataset": load_items,
        "output_type": "multiple_choice",
        "validation_split": "validation",
        # Field names: lm-eval then takes the values as they are (the choices stay a list).
        "doc_to_text": "context",
        "doc_to_choice": "endings",
        "doc_to_target": "label",
        "target_delimiter": " ",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def run_lm_eval(model: object, tokenizer: Any, tasks: Sequence[str | dict[str, Any]], *,
                limit: int | None = None, num_fewshot: int | None = None, batch_size: int = 16,
                max_length: int = 2048, backend: str = "auto",
                bootstrap_iters: int = 0) -> dict[str, dict[str, float]]:
    """Run lm-eval ``tasks`` (hub names or inline configs) on an in-memory model.

    Returns ``{task: {metric: value}}`` with lm-eval's metric names (``acc``, ``acc_norm``,
    their ``_stderr``). ``limit`` caps the documents per task (for quick runs). A hub task
    whose data cannot be fetched raises :class:`HarnessError` saying so.
    """
    lm_eval = _import_lm_eval()
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    lm = make_lm(model, tokenizer, batch_size=batch_size, max_length=max_length, backend=backend)
    # Indexing lm-eval's built-in task folders is slow (it walks every task's YAML): only hub
    # names need it.
    needs_index = any(isinstance(task, str) for task in tasks)
    try:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot,
            task_manager=TaskManager(include_defaults=needs_index),
            bootstrap_iters=bootstrap_iters, log_samples=False)
    except KeyError as exc:
        raise HarnessError(f"lm-eval does not know the task {exc}",
                           hint=f"hub tasks: {', '.join(HUB_TASKS)}") from exc
    except (ConnectionError, OSError) as exc:
        raise HarnessError(f"could not fetch a task's data from the hub: {exc}",
                           hint=f"offline, use the local task '{LOCAL_TASK_NAME}'") from exc
    return {task: _clean_metrics(metrics) for task, metrics in results["results"].items()}


def _clean_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """lm-eval keys look like ``acc,none``; keep the numeric ones as ``acc``."""
    cleaned: dict[str, float] = {}
    for key, value in metrics.items():
        name = key.split(",")[0]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            cleaned[name] = float(value)
        elif isinstance(value, str) and name.endswith("_stderr"):
            cleaned[name] = math.nan
    return cleaned


def run_local_task_with_lm_eval(model: object, tokenizer: Any,
                                items: Sequence[MultipleChoiceItem], **kwargs: Any
                                ) -> dict[str, float]:
    """Score our local items through lm-eval; returns lm-eval's metrics for the task."""
    results = run_lm_eval(model, tokenizer, [local_task_config(items)], **kwargs)
    return results[LM_EVAL_LOCAL_TASK]
