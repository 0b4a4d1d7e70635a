"""The embedded demo model: a small Qwen3-MoE causal LM and its byte-level BPE tokenizer, trained here.

Everything is trained offline on the bundled C4 sample, so the pipeline can run end to end without
the Hugging Face hub. The last ``heldout_docs`` documents (``calibration.split_documents``) are never
seen by the tokenizer or the model; they measure the model's perplexity against an add-one unigram
baseline and how often each expert is chosen.

Determinism: the tokenizer trainer is deterministic, weights are initialised after
``torch.manual_seed(seed)``, the data order comes from ``numpy.random.default_rng(seed)`` and torch runs
with deterministic algorithms, so two runs with the same arguments (and thread count) give identical
weights.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

from moe_compress.calibration import read_documents, split_documents
from moe_compress.errors import DataError
from moe_compress.io import atomic_directory

EOS_TOKEN = "<|endoftext|>"
METRICS_FILE = "training_metrics.json"

# Optimiser settings that are not worth exposing as arguments (recorded in the metrics all the same).
WARMUP_FRACTION = 0.05
MIN_LR_FRACTION = 0.1  # cosine decays to this fraction of the peak learning rate
WEIGHT_DECAY = 0.1
ADAM_BETAS = (0.9, 0.95)
GRAD_CLIP = 1.0
EVAL_BATCH = 32

log = logging.getLogger(__name__)


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts``; ``<|endoftext|>`` is its eos, bos, pad and unk token.

    Byte level means every string is encodable (no real unknowns); the vocabulary may come out smaller
    than ``vocab_size`` when the texts support fewer merges.
    """
    if vocab_size < 257:
        raise DataError(f"demo vocab_size={vocab_size} must be at least 257 (256 bytes + {EOS_TOKEN})")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],  # id 0
        # all 256 byte symbols up front, so text unseen in training still encodes
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,
    )


def token_stream(tokenizer: PreTrainedTokenizerFast, docs: list[str]) -> np.ndarray:
    """All documents as one int64 token stream, each followed by EOS (the usual packing for LM training)."""
    encoded = tokenizer(docs, add_special_tokens=False)["input_ids"]
    eos = np.array([tokenizer.eos_token_id], dtype=np.int64)
    return np.concatenate([part for ids in encoded for part in (np.asarray(ids, dtype=np.int64), eos)])


def unigram_perplexity(train_ids: np.ndarray, eval_ids: np.ndarray, vocab_size: int) -> float:
    """Perplexity on ``eval_ids`` of the add-one smoothed unigram model fitted on ``train_ids``."""
    counts = np.bincount(train_ids, minlength=vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts) - np.log(counts.sum())
    return float(np.exp(-log_probs[eval_ids].mean()))


def _windows(stream: np.ndarray, seq_len: int, offset: int = 0) -> torch.Tensor:
    """Non-overlapping ``seq_len`` windows of ``stream`` starting at ``offset``; the ragged tail is dropped."""
    count = (len(stream) - offset) // seq_len
    return torch.from_numpy(stream[offset : offset + count * seq_len].reshape(count, seq_len))


def _batches(stream: np.ndarray, seq_len: int, batch_size: int, rng: np.random.Generator):
    """Endless training batches [batch_size, seq_len].

    Each epoch cuts the stream at a fresh random offset (so later epochs see new window boundaries, not
    the same samples again) and visits the windows in a random order; ``rng`` makes both reproducible.
    """
    while True:
        windows = _windows(stream, seq_len, offset=int(rng.integers(seq_len)))
        order = torch.from_numpy(rng.permutation(len(windows)))
        for start in range(0, len(windows) - batch_size + 1, batch_size):
            yield windows[order[start : start + batch_size]]


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warmup to the peak learning rate, then cosine decay to MIN_LR_FRACTION of it."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return MIN_LR_FRACTION + (1.0 - MIN_LR_FRACTION) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross entropy: position t predicts token t+1."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1), reduction=reduction
    )


@torch.no_grad()
def evaluate(model: Qwen3MoeForCausalLM, windows: torch.Tensor, batch_size: int = EVAL_BATCH) -> tuple[float, np.ndarray]:
    """(perplexity, expert selection frequency [layers, experts]) of ``model`` on ``windows``.

    The frequency of an expert is the fraction of tokens whose top-k routing includes it (each layer's
    row sums to top_k; uniform routing gives top_k / num_experts everywhere).
    """
    config = model.config
    was_training = model.training
    model.eval()
    nll_sum = 0.0
    counts = torch.zeros(config.num_hidden_layers, config.num_experts, dtype=torch.float64)
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        out = model(input_ids=batch, output_router_logits=True)
        nll_sum += _lm_loss(out.logits, batch, reduction="sum").item()
        for layer, router_logits in enumerate(out.router_logits):
            chosen = router_logits.topk(config.num_experts_per_tok, dim=-1).indices.reshape(-1)
            counts[layer] += torch.bincount(chosen, minlength=config.num_experts).double()
    model.train(was_training)
    predicted = windows.shape[0] * (windows.shape[1] - 1)
    return math.exp(nll_sum / predicted), (counts / windows.numel()).numpy()


def demo_moe_layers(num_layers: int) -> list[int]:
    """The demo model's MoE layers, known before it is built: every layer is sparse (mlp_only_layers=[])."""
    return list(range(num_layers))


def build_demo_model(
    corpus_path: str | Path,
    out_dir: str | Path,
    *,
    text_field: str = "text",
    heldout_docs: int = 100,
    seed: int = 0,
    num_layers: int = 4,
    hidden_size: int = 128,
    num_experts: int = 16,
    top_k: int = 4,
    moe_intermediate_size: int = 64,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    vocab_size: int = 4096,
    seq_len: int = 128,
    batch_size: int = 8,
    steps: int = 1300,
    learning_rate: float = 3e-3,
    router_aux_loss_coef: float = 0.0,
    tie_word_embeddings: bool = True,
    threads: int | None = None,
    log: logging.Logger = log,
) -> dict:
    """Train the demo tokenizer and model on ``corpus_path``; save an HF model directory to ``out_dir``.

    ``out_dir`` also gets ``training_metrics.json`` (returned as a dict): steps, seconds, final train
    loss, held-out perplexity of the model and of an add-one unigram model, per-layer expert selection
    frequency on the held-out tokens, and every hyperparameter.
    """
    hyperparameters = {
        "corpus_path": str(corpus_path),
        "text_field": text_field,
        "heldout_docs": heldout_docs,
        "seed": seed,
        "num_layers": num_layers,
        "hidden_size": hidden_size,
        "num_experts": num_experts,
        "top_k": top_k,
        "moe_intermediate_size": moe_intermediate_size,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "vocab_size": vocab_size,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "steps": steps,
        "learning_rate": learning_rate,
        "router_aux_loss_coef": router_aux_loss_coef,
        "threads": threads,
        "warmup_steps": max(1, round(WARMUP_FRACTION * steps)),
        "min_lr_fraction": MIN_LR_FRACTION,
        "weight_decay": WEIGHT_DECAY,
        "adam_betas": list(ADAM_BETAS),
        "grad_clip": GRAD_CLIP,
        "tie_word_embeddings": tie_word_embeddings,
    }
    if hidden_size % num_attention_heads or num_attention_heads % num_key_value_heads:
        raise DataError(
            f"demo hidden_size={hidden_size} must be divisible by num_attention_heads={num_attention_heads}, "
            f"and that by num_key_value_heads={num_key_value_heads}"
        )
    if not 1 <= top_k <= num_experts:
        raise DataError(f"demo top_k={top_k} must be between 1 and num_experts={num_experts}")
    if steps < 1 or batch_size < 1 or seq_len < 2:
        raise DataError(f"demo steps={steps}, batch_size={batch_size} must be >= 1 and seq_len={seq_len} >= 2")

    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    previous_deterministic = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    if threads is not None:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        train_docs, eval_docs = split_documents(read_documents(corpus_path, text_field), heldout_docs)
        tokenizer = train_tokenizer(train_docs, vocab_size)
        train_ids = token_stream(tokenizer, train_docs)
        eval_ids = token_stream(tokenizer, eval_docs)
        eval_windows = _windows(eval_ids, seq_len)
        if len(eval_windows) == 0:
            raise DataError(f"the {heldout_docs} held-out documents yield {len(eval_ids)} tokens, fewer than seq_len={seq_len}")
        if len(train_ids) < (batch_size + 1) * seq_len:
            raise DataError(
                f"the training documents yield {len(train_ids)} tokens, too few for batch_size={batch_size} "
                f"windows of seq_len={seq_len}; use a larger corpus or smaller batches"
            )
        log.info(
            "demo tokenizer: %d tokens in the vocabulary; %d training and %d held-out tokens",
            len(tokenizer), len(train_ids), len(eval_ids),
        )

        config = Qwen3MoeConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=4 * hidden_size,  # unused: every layer is sparse (mlp_only_layers=[])
            num_hidden_layers=num_layers,
            num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads,
            head_dim=hidden_size // num_attention_heads,
            max_position_embeddings=seq_len,
            num_experts=num_experts,
            num_experts_per_tok=top_k,
            moe_intermediate_size=moe_intermediate_size,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            # training needs the router logits for the load-balancing loss; the saved config turns them off
            output_router_logits=True,
            router_aux_loss_coef=router_aux_loss_coef,
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(seed)
        model = Qwen3MoeForCausalLM(config)
        model.train()
        log.info("demo model: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)

        # no weight decay on norm gains (the only 1-D parameters)
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
            lr=learning_rate,
            betas=ADAM_BETAS,
        )
        warmup = hyperparameters["warmup_steps"]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, steps, warmup))
        batches = _batches(train_ids, seq_len, batch_size, np.random.default_rng(seed))

        losses = []
        log_every = max(1, steps // 10)
        for step in range(steps):
            batch = next(batches)
            out = model(input_ids=batch, output_router_logits=router_aux_loss_coef > 0)
            lm_loss = _lm_loss(out.logits, batch)
            loss = lm_loss + router_aux_loss_coef * out.aux_loss if router_aux_loss_coef > 0 else lm_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            optimizer.step()
            scheduler.step()
            losses.append(lm_loss.item())
            if (step + 1) % log_every == 0 or step + 1 == steps:
                log.info(
                    "demo step %d/%d: loss %.3f, lr %.2e, %.0fs",
                    step + 1, steps, losses[-1], scheduler.get_last_lr()[0], time.perf_counter() - started,
                )

        heldout_ppl, frequency = evaluate(model, eval_windows)
        unigram_ppl = unigram_perplexity(train_ids, eval_windows[:, 1:].numpy().reshape(-1), len(tokenizer))
        # the last 10% of steps: a less noisy figure than the last batch alone
        tail = losses[-max(1, steps // 10) :]
        metrics = {
            "steps": steps,
            "seconds": round(time.perf_counter() - started, 2),
            "final_train_loss": float(np.mean(tail)),
            "train_loss_curve": losses,
            "heldout_perplexity": heldout_ppl,
            "unigram_heldout_perplexity": unigram_ppl,
            "heldout_tokens": int(eval_windows[:, 1:].numel()),
            "train_tokens": int(len(train_ids)),
            "tokenizer_vocab_size": len(tokenizer),
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "expert_selection_frequency": frequency.tolist(),
            "hyperparameters": hyperparameters,
        }
        log.info(
            "demo model: held-out perplexity %.1f (unigram %.1f), expert frequency min %.4f max %.4f",
            heldout_ppl, unigram_ppl, frequency.min(), frequency.max(),
        )

        model.config.output_router_logits = False
        with atomic_directory(out_dir) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        return metrics
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(previous_deterministic[0], warn_only=previous_deterministic[1])
