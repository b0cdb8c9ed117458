"""lm-evaluation-harness driving a hemat model: `HematLM`, an `lm_eval.api.model.LM` registered under the
name "hemat". Log-likelihoods use hemat's scoring (hemat.eval.choice), generation goes through the
Engine. Needs the optional extra: pip install 'hemat[lm-eval]'. This module imports without it.

lm-eval finds the name "hemat" only once this module is imported, so run the harness through it:
    python -m hemat.eval.lm_eval_adapter run --model hemat --model_args pretrained=runs/x/final --tasks arc_easy
or from Python: `import hemat.eval.lm_eval_adapter` and then `lm_eval.simple_evaluate(model="hemat", ...)`."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from hemat.errors import HematError
from hemat.eval.choice import loglikelihoods, rolling_loglikelihood, with_document_start

try:
    import lm_eval.models  # noqa: F401  registers lm-eval's own models lazily; registering ours first would hide them
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model

    HAVE_LM_EVAL = True
except ImportError:
    HAVE_LM_EVAL = False
    LM = object

    def register_model(*names):
        return lambda cls: cls


DEFAULT_BATCH_SIZE = 16
log = logging.getLogger(__name__)


@register_model("hemat")
class HematLM(LM):
    """`pretrained`: a checkpoint directory (with its tokenizer), or a loaded CausalLM with `tokenizer`."""

    def __init__(self, pretrained, tokenizer=None, device: str | None = None, dtype: str | None = None,
                 batch_size: int | str | None = DEFAULT_BATCH_SIZE, max_batch_size: int | None = None,
                 max_length: int | None = None, max_gen_toks: int = 256):
        if not HAVE_LM_EVAL:
            raise HematError("the lm-evaluation-harness adapter needs lm-eval: pip install 'hemat[lm-eval]'")
        super().__init__()
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            log.warning("hemat: lm-eval asked for device %s but CUDA is not available; using the CPU", device)
            device = "cpu"
        if isinstance(pretrained, (str, Path)):
            from hemat.model.hf import from_pretrained
            from hemat.tokenizer import load_tokenizer

            self.name = str(pretrained)
            self.model = from_pretrained(pretrained, device=device, dtype=dtype)
            self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(pretrained)
        else:
            if tokenizer is None:
                raise HematError("HematLM with a model object needs its tokenizer too")
            self.name, self.model, self.tokenizer = "hemat-model", pretrained.eval(), tokenizer
        self._device = self.model.device
        self.batch_size = _batch_size(batch_size, max_batch_size)
        self.max_length = int(max_length or self.model.config.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)
        self._engine = None

    @property
    def engine(self):
        if self._engine is None:
            from hemat.infer.engine import Engine

            self._engine = Engine(self.model, self.tokenizer, max_batch_size=self.batch_size)
        return self._engine

    @property
    def tokenizer_name(self) -> str:
        return self.name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template or ""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args[:2]) for r in requests]
        results = loglikelihoods(self.model, self.tokenizer, pairs, self.max_length, self.batch_size)
        for pair, result in zip(pairs, results):
            self.cache_hook.add_partial("loglikelihood", pair, result)
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Each document on its own, in disjoint windows of the full context (lm-eval's convention)."""
        results = []
        for request in requests:
            (text,) = request.args[:1]
            logprob, _ = rolling_loglikelihood(self.model, self.tokenizer, text, self.max_length, self.max_length,
                                               self.batch_size)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), logprob)
            results.append(logprob)
        return results

    def generate_until(self, requests) -> list[str]:
        from hemat.infer.sampling import SamplingParams

        prompts, params = [], []
        for request in requests:
            context, gen_kwargs = request.args[0], dict(request.args[1] or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            sampling = gen_kwargs.pop("do_sample", False) and float(gen_kwargs.get("temperature", 1.0)) > 0
            ids = with_document_start(self.tokenizer, self.tokenizer.encode(context))
            max_new = max(1, min(max_new, self.max_length - 1))
            prompts.append(ids[-(self.max_length - max_new) :])  # keep the end of a context that does not fit
            params.append(SamplingParams(
                temperature=float(gen_kwargs.get("temperature", 1.0)) if sampling else 0.0,
                top_p=float(gen_kwargs.get("top_p", 1.0)) if sampling else 1.0,
                top_k=int(gen_kwargs.get("top_k", 0)) if sampling else 0,
                max_tokens=max_new, stop=[s for s in until if s],
            ))
        outputs = self.engine.generate(prompts, params) if prompts else []
        texts = []
        for request, out in zip(requests, outputs):
            if out.error:
                raise HematError(f"generation failed: {out.error}")
            texts.append(out.outputs[0].text)
            self.cache_hook.add_partial("generate_until", request.args, texts[-1])
        return texts


def _batch_size(batch_size, max_batch_size) -> int:
    """lm-eval passes ints, digit strings or "auto"/"auto:N"; hemat has no memory probe, so "auto" means
    max_batch_size or the default."""
    if isinstance(batch_size, str) and batch_size.startswith("auto"):
        return int(max_batch_size or DEFAULT_BATCH_SIZE)
    try:
        value = int(batch_size if batch_size is not None else DEFAULT_BATCH_SIZE)
    except ValueError:
        raise HematError(f"batch_size must be an integer or 'auto', got {batch_size!r}") from None
    if value < 1:
        raise HematError(f"batch_size must be >= 1, got {value}")
    return value


if __name__ == "__main__":
    if not HAVE_LM_EVAL:
        raise SystemExit("the lm-evaluation-harness adapter needs lm-eval: pip install 'hemat[lm-eval]'")
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
