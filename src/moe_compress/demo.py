"""The embedded demo model: a small Qwen3-MoE causal LM and its byte-level BPE tokenizer, trained here.

Everything is trained offline on the bundled C4 sample, so the pipeline can run end to end without
the Hugging Face hub. The last ``heldout_docs`` documents (``calibration.split_documents``) are never
seen by the tokenizer or the model; they measure the model's perplexity against an add-one unigram
baseline and how often each expert is chosen.

``build_demo_model`` runs the stages in order: data (``prepare_data``), model (``model_config``,
``init_model``), training (``train``), measurement (``measure``) and saving (``save_demo``); every setting
they read is a field of one ``DemoSettings``.

Determinism: the tokenizer trainer is deterministic, weights are initialised after
``torch.manual_seed(seed)``, the data order comes from ``numpy.random.default_rng(seed)`` and torch runs
with deterministic algorithms, so two runs with the same settings (and thread count) give identical
weights.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# transformers is imported where a model or tokenizer is built: the planner reads this module's model type and layers
# at every parse, and transformers' model classes would cost it seconds
if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

from moe_compress.atomic import atomic_directory
from moe_compress.calibration import read_documents, split_documents
from moe_compress.errors import DataError
from moe_compress.evaluate.perplexity import next_token_loss

EOS_TOKEN = "<|endoftext|>"
METRICS_FILE = "training_metrics.json"
EVAL_BATCH = 32

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSettings:
    """Every setting of a demo build. The defaults of the fields that the config's ``demo_model``
    section can set are the schema's defaults; ``text_field``, ``documents`` and ``heldout_docs`` are the
    first calibration source's, so the demo model never trains on the documents that measure it.
    """

    # data
    text_field: str | list[str] = "text"
    heldout_docs: int = 100
    documents: str = "paragraphs"
    vocab_size: int = 4096
    seq_len: int = 128
    # model
    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    num_experts: int = 16
    top_k: int = 4
    moe_intermediate_size: int = 64
    tie_word_embeddings: bool = True
    # training
    seed: int = 0
    batch_size: int = 8
    steps: int = 1300
    learning_rate: float = 3e-3
    min_lr_fraction: float = 0.1  # cosine decays to this fraction of the peak learning rate
    weight_decay: float = 0.1
    adam_betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    router_aux_loss_coef: float = 0.0
    # not a field: the metrics record the warmup_steps it gives
    warmup_fraction: ClassVar[float] = 0.05

    def __post_init__(self):
        _check_vocab_size(self.vocab_size)
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise DataError(
                f"demo hidden_size={self.hidden_size} must be divisible by "
                f"num_attention_heads={self.num_attention_heads}, "
                f"and that by num_key_value_heads={self.num_key_value_heads}"
            )
        if not 1 <= self.top_k <= self.num_experts:
            raise DataError(f"demo top_k={self.top_k} must be between 1 and num_experts={self.num_experts}")
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 2:
            raise DataError(
                f"demo steps={self.steps}, batch_size={self.batch_size} must be >= 1 "
                f"and seq_len={self.seq_len} >= 2"
            )

    @property
    def warmup_steps(self) -> int:
        return max(1, round(self.warmup_fraction * self.steps))


@dataclass(frozen=True)
class DemoData:
    """The tokenizer and the token data of one build."""

    tokenizer: PreTrainedTokenizerFast
    train_ids: np.ndarray  # the training documents as one token stream
    eval_windows: torch.Tensor  # the held-out documents as non-overlapping windows [n, seq_len]


# ---------------------------------------------------------------------------------------------- data


def _check_vocab_size(vocab_size: int) -> None:
    if vocab_size < 257:
        raise DataError(f"demo vocab_size={vocab_size} must be at least 257 (256 bytes + {EOS_TOKEN})")


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts``; ``<|endoftext|>`` is its eos, bos, pad and unk token.

    Byte level means every string is encodable (no real unknowns); the vocabulary may come out smaller
    than ``vocab_size`` when the texts support fewer merges.
    """
    from transformers import PreTrainedTokenizerFast

    _check_vocab_size(vocab_size)
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


def prepare_data(corpus_path: str | Path, settings: DemoSettings, log: logging.Logger = log) -> DemoData:
    """Split the corpus, train the tokenizer on the training documents only and tokenize both parts."""
    docs = read_documents(corpus_path, settings.text_field, settings.documents)
    train_docs, eval_docs = split_documents(docs, settings.heldout_docs)
    tokenizer = train_tokenizer(train_docs, settings.vocab_size)
    train_ids = token_stream(tokenizer, train_docs)
    eval_ids = token_stream(tokenizer, eval_docs)
    eval_windows = _windows(eval_ids, settings.seq_len)
    if len(eval_windows) == 0:
        raise DataError(
            f"the {settings.heldout_docs} held-out documents yield {len(eval_ids)} tokens, "
            f"fewer than seq_len={settings.seq_len}"
        )
    # one batch more than the minimum: a random epoch offset can cost up to one window
    if len(train_ids) < (settings.batch_size + 1) * settings.seq_len:
        raise DataError(
            f"the training documents yield {len(train_ids)} tokens, too few for batch_size={settings.batch_size} "
            f"windows of seq_len={settings.seq_len}; use a larger corpus or smaller batches"
        )
    log.info(
        "demo tokenizer: %d tokens in the vocabulary; %d training and %d held-out tokens",
        len(tokenizer), len(train_ids), len(eval_ids),
    )
    return DemoData(tokenizer=tokenizer, train_ids=train_ids, eval_windows=eval_windows)


# --------------------------------------------------------------------------------------------- model


def demo_moe_layers(num_layers: int) -> list[int]:
    """The demo model's MoE layers, known before it is built: every layer is sparse (mlp_only_layers=[])."""
    return list(range(num_layers))


DEMO_MODEL_TYPE = "qwen3_moe"  # Qwen3MoeConfig.model_type


def model_config(settings: DemoSettings, tokenizer: PreTrainedTokenizerFast | None) -> Qwen3MoeConfig:
    """The Qwen3-MoE config of the demo model; its vocabulary is the tokenizer's actual size (without one, the
    configured ``vocab_size``, an upper bound: a tokenizer has fewer tokens where the texts support fewer merges)."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=len(tokenizer) if tokenizer is not None else settings.vocab_size,
        hidden_size=settings.hidden_size,
        intermediate_size=4 * settings.hidden_size,  # unused: every layer is sparse (mlp_only_layers=[])
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_attention_heads,
        num_key_value_heads=settings.num_key_value_heads,
        head_dim=settings.hidden_size // settings.num_attention_heads,
        max_position_embeddings=settings.seq_len,
        num_experts=settings.num_experts,
        num_experts_per_tok=settings.top_k,
        moe_intermediate_size=settings.moe_intermediate_size,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        # training needs the router logits for the load-balancing loss; save_demo turns them off
        output_router_logits=True,
        router_aux_loss_coef=settings.router_aux_loss_coef,
        tie_word_embeddings=settings.tie_word_embeddings,
        bos_token_id=getattr(tokenizer, "bos_token_id", None),
        eos_token_id=getattr(tokenizer, "eos_token_id", None),
        pad_token_id=getattr(tokenizer, "pad_token_id", None),
    )


def init_model(config: Qwen3MoeConfig, seed: int) -> Qwen3MoeForCausalLM:
    """A freshly initialised model in training mode; ``seed`` fixes its weights."""
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config)
    model.train()
    return model


# ------------------------------------------------------------------------------------------ training


def _optimizer(model: Qwen3MoeForCausalLM, settings: DemoSettings) -> torch.optim.AdamW:
    """AdamW with no weight decay on the norm gains (the only 1-D parameters)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.learning_rate,
        betas=settings.adam_betas,
    )


def _lr_factor(step: int, steps: int, warmup: int, min_lr_fraction: float) -> float:
    """Linear warmup to the peak learning rate, then cosine decay to ``min_lr_fraction`` of it."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_lr_fraction + (1.0 - min_lr_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))


def train(
    model: Qwen3MoeForCausalLM, train_ids: np.ndarray, settings: DemoSettings, log: logging.Logger = log
) -> list[float]:
    """Train ``model`` in place on ``train_ids`` for ``settings.steps`` steps; the LM loss of every step."""
    steps, warmup, min_lr = settings.steps, settings.warmup_steps, settings.min_lr_fraction
    aux_coef = settings.router_aux_loss_coef
    optimizer = _optimizer(model, settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, steps, warmup, min_lr))
    batches = _batches(train_ids, settings.seq_len, settings.batch_size, np.random.default_rng(settings.seed))
    started = time.perf_counter()
    losses = []
    log_every = max(1, steps // 10)
    for step in range(steps):
        batch = next(batches)
        # the router logits cost memory and time: ask for them only when the aux loss uses them
        out = model(input_ids=batch, output_router_logits=aux_coef > 0)
        lm_loss = next_token_loss(out.logits, batch)
        loss = lm_loss + aux_coef * out.aux_loss if aux_coef > 0 else lm_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(lm_loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            log.info(
                "demo step %d/%d: loss %.3f, lr %.2e, %.0fs",
                step + 1, steps, losses[-1], scheduler.get_last_lr()[0], time.perf_counter() - started,
            )
    return losses


# --------------------------------------------------------------------------------------- measurement


def unigram_perplexity(train_ids: np.ndarray, eval_ids: np.ndarray, vocab_size: int) -> float:
    """Perplexity on ``eval_ids`` of the add-one smoothed unigram model fitted on ``train_ids``."""
    counts = np.bincount(train_ids, minlength=vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts) - np.log(counts.sum())
    return float(np.exp(-log_probs[eval_ids].mean()))


@torch.no_grad()
def evaluate(model: Qwen3MoeForCausalLM, windows: torch.Tensor, batch_size: int = EVAL_BATCH) -> tuple[float, np.ndarray]:
    """(perplexity, expert selection frequency [layers, experts]) of ``model`` on ``windows``, in one pass.

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
        nll_sum += next_token_loss(out.logits, batch, reduction="sum").item()
        for layer, router_logits in enumerate(out.router_logits):
            chosen = router_logits.topk(config.num_experts_per_tok, dim=-1).indices.reshape(-1)
            counts[layer] += torch.bincount(chosen, minlength=config.num_experts).double()
    model.train(was_training)
    predicted = windows.shape[0] * (windows.shape[1] - 1)
    return math.exp(nll_sum / predicted), (counts / windows.numel()).numpy()


def measure(model: Qwen3MoeForCausalLM, data: DemoData, log: logging.Logger = log) -> dict:
    """Held-out perplexity of the model and of the unigram baseline, expert selection frequency and sizes."""
    heldout_ppl, frequency = evaluate(model, data.eval_windows)
    # the same predicted tokens as the model's: every window position but the first
    targets = data.eval_windows[:, 1:]
    unigram_ppl = unigram_perplexity(data.train_ids, targets.numpy().reshape(-1), len(data.tokenizer))
    log.info(
        "demo model: held-out perplexity %.1f (unigram %.1f), expert frequency min %.4f max %.4f",
        heldout_ppl, unigram_ppl, frequency.min(), frequency.max(),
    )
    return {
        "heldout_perplexity": heldout_ppl,
        "unigram_heldout_perplexity": unigram_ppl,
        "heldout_tokens": int(targets.numel()),
        "train_tokens": int(len(data.train_ids)),
        "tokenizer_vocab_size": len(data.tokenizer),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "expert_selection_frequency": frequency.tolist(),
    }


def hyperparameters(settings: DemoSettings, corpus_path: str | Path, threads: int | None) -> dict:
    """What the metrics record as the build's inputs: the settings, the corpus, the thread count (which
    the bits of the weights depend on) and the derived warmup steps."""
    return {
        "corpus_path": str(corpus_path),
        **dataclasses.asdict(settings),
        "threads": threads,
        "warmup_steps": settings.warmup_steps,
    }


# ---------------------------------------------------------------------------------------------- save


def save_demo(
    out_dir: str | Path, model: Qwen3MoeForCausalLM, tokenizer: PreTrainedTokenizerFast, metrics: dict
) -> None:
    """Write the model, tokenizer and metrics into ``out_dir`` atomically (all three or nothing)."""
    model.config.output_router_logits = False  # only training needs them
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")


# ------------------------------------------------------------------------------------------- compose


def build_demo_model(
    corpus_path: str | Path,
    out_dir: str | Path,
    settings: DemoSettings = DemoSettings(),
    *,
    threads: int | None = None,
    log: logging.Logger = log,
) -> dict:
    """Train the demo tokenizer and model on ``corpus_path``; save an HF model directory to ``out_dir``.

    ``out_dir`` also gets ``training_metrics.json`` (returned as a dict): steps, seconds, the training
    loss curve and its final value, held-out perplexity of the model and of an add-one unigram model,
    per-layer expert selection frequency on the held-out tokens, and every hyperparameter. ``threads``
    (torch's thread count for the build) and torch's deterministic-algorithms flags are restored after.
    """
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
        data = prepare_data(corpus_path, settings, log)
        model = init_model(model_config(settings, data.tokenizer), settings.seed)
        log.info("demo model: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
        losses = train(model, data.train_ids, settings, log)
        measured = measure(model, data, log)
        metrics = {
            "steps": settings.steps,
            "seconds": round(time.perf_counter() - started, 2),
            # the mean of the last 10% of steps: less noisy than the last batch alone
            "final_train_loss": float(np.mean(losses[-max(1, len(losses) // 10) :])),
            "train_loss_curve": losses,
            **measured,
            "hyperparameters": hyperparameters(settings, corpus_path, threads),
        }
        save_demo(out_dir, model, data.tokenizer, metrics)
        return metrics
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(previous_deterministic[0], warn_only=previous_deterministic[1])
