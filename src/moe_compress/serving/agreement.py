"""Whether an engine serves a checkpoint as transformers runs it: greedy continuations of a fixed prompt set and
the log-probability of each generated token, compared token by token.

The prompts are token ids, so both sides see the same input whatever their tokenizer versions. Greedy decoding
of a random tiny model meets near ties (two tokens whose logits differ by less than the kernels' rounding); a
continuation that departs from the reference only where the reference's top two log-probabilities are within
the tolerance is a tie, not a disagreement, and the comparison stops there (after it the two continue from
different prefixes).

Pure Python on plain lists: used in the serving environment (vLLM side) and in the library's environment
(transformers side); only ``transformers_reference`` imports torch."""

from __future__ import annotations

# fp32 on both sides, different kernels (vLLM's fused MoE and attention against transformers' grouped_mm and
# sdpa) summing in other orders: log-probabilities agree to about 1e-5 on the tiny models; 1e-3 leaves room for
# larger models and bf16 checkpoints run in fp32
LOGPROB_TOLERANCE = 1e-3
PROMPT_TEXTS = (
    "The expert layers of a mixture-of-experts model",
    "Calibration data decides which experts are rarely used, and",
    "In 1905 the city council voted to",
    "def fibonacci(n):",
)
MAX_NEW_TOKENS = 12


def prompt_token_ids(tokenizer, texts=PROMPT_TEXTS) -> list[list[int]]:
    """The fixed prompts as token ids (no special tokens added: both engines get exactly these ids)."""
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def transformers_reference(model, prompts: list[list[int]], max_new_tokens: int = MAX_NEW_TOKENS) -> list[dict]:
    """Greedy continuation of each prompt by ``model`` (one prompt at a time: no padding), with the
    log-probability of each generated token and the margin between the top two."""
    import torch

    references = []
    for ids in prompts:
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids], device=model.device), max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=0)
        tokens = out.sequences[0, len(ids):].tolist()
        logprobs = torch.log_softmax(torch.stack(out.logits)[:, 0].float(), dim=-1)
        top2 = logprobs.topk(2, dim=-1).values
        references.append({"prompt": ids, "tokens": tokens,
                           "logprobs": [float(logprobs[step, token]) for step, token in enumerate(tokens)],
                           "top2_margin": (top2[:, 0] - top2[:, 1]).tolist()})
    return references


def compare(reference: dict, tokens: list[int], logprobs: list[float], tolerance: float = LOGPROB_TOLERANCE) -> dict:
    """One prompt's engine continuation against the reference: where it departs (None if never), whether that
    is a near tie, and the largest log-probability difference over the tokens both generated identically."""
    common = 0
    while common < min(len(tokens), len(reference["tokens"])) and tokens[common] == reference["tokens"][common]:
        common += 1
    departs = None if common == len(reference["tokens"]) == len(tokens) else common
    differences = [abs(logprobs[step] - reference["logprobs"][step]) for step in range(common)]
    tie = departs is not None and departs < len(reference["top2_margin"]) and reference["top2_margin"][departs] <= tolerance
    max_difference = max(differences, default=0.0)
    return {"tokens_equal": departs is None, "departs_at": departs, "near_tie": tie, "compared_tokens": common,
            "max_logprob_difference": max_difference,
            "agrees": (departs is None or tie) and max_difference <= tolerance}


def summarize(comparisons: list[dict], tolerance: float = LOGPROB_TOLERANCE) -> dict:
    """All prompts: the engine agrees when every prompt does."""
    return {"prompts": len(comparisons), "prompts_tokens_equal": sum(c["tokens_equal"] for c in comparisons),
            "near_ties": sum(c["near_tie"] for c in comparisons),
            "max_logprob_difference": max((c["max_logprob_difference"] for c in comparisons), default=0.0),
            "logprob_tolerance": tolerance, "agrees": all(c["agrees"] for c in comparisons)}
