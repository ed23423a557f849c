"""Calibration rows for the converter (QUANTIZER.md, pipeline §1).

trellm ships no third-party text: rows come from the user's file, or from text the model
itself generates from a few short neutral prompts, plus rows of random tokens so every
vocabulary entry is exercised (the embedding and head see all of them). Deterministic for a seed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from trellm.errors import ConfigError

NEUTRAL_PROMPTS = (
    "The history of", "In mathematics,", "def main():", "Once upon a time", "The following table",
    "Recent research shows", "Dear team,", "Chapter 1",
)
RANDOM_FRACTION = 0.1  # share of rows made of uniformly random tokens


def rows_from_text(tokenizer, text: str, rows: int, cols: int) -> torch.Tensor:
    """Tokenize `text` whole and cut it into `rows` rows of `cols` tokens (wrapping around if short)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < cols:
        raise ConfigError(f"the calibration text has {len(ids)} tokens; each row needs {cols}: give a longer file "
                          "or fewer --cols")
    need = rows * cols
    reps = -(-need // len(ids))
    return torch.tensor((ids * reps)[:need]).view(rows, cols)


def random_rows(vocab_size: int, rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, vocab_size, (rows, cols), generator=generator)


GENERATE_BATCH = 256  # most calibration rows written at once on a GPU
GENERATE_MEMORY = 0.4  # of the free GPU memory their KV cache may take


def generated_rows(model, tokenizer, rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """Rows the model writes itself: sampled continuations (temperature 1) of neutral prompts, each row
    with its own seed drawn from `generator`. On a GPU the rows run as one continuous batch through the
    Generator (as many at once as the cache memory allows, up to GENERATE_BATCH; rows with different
    seeds still sample in one batched draw per step); on the CPU, one row at a time through the simple
    loop. Each row's random draws come from its own seed, not from the rows beside it."""
    from trellm.engine.sampling import SamplingParams

    prompts = [tokenizer.encode(NEUTRAL_PROMPTS[i % len(NEUTRAL_PROMPTS)])[: cols - 1] for i in range(rows)]
    sampling = [SamplingParams(temperature=1.0, seed=int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
                for _ in range(rows)]
    if model.device.type == "cuda":
        from trellm.cache.paged import PagedKVCache
        from trellm.cache.pages import PAGE_SIZE
        from trellm.engine.generator import Generator, Job

        free, _ = torch.cuda.mem_get_info(model.device)
        fit = PagedKVCache.pages_for_memory(model.config, int(free * GENERATE_MEMORY), PAGE_SIZE, model.dtype)
        batch = max(1, min(rows, GENERATE_BATCH, fit * PAGE_SIZE // cols))
        engine = Generator(model, max_seq_len=cols, cache_tokens=batch * cols, max_seqs=batch)
        outs = engine.generate([Job(p, max_new_tokens=cols - len(p), sampling=s) for p, s in zip(prompts, sampling)])
        del engine  # its KV cache, before the converter needs the memory
        torch.cuda.empty_cache()
    else:
        from trellm.engine.generate import GenerationRequest, generate_tokens

        outs = [list(generate_tokens(model, GenerationRequest(p, max_new_tokens=cols - len(p), sampling=s)))
                for p, s in zip(prompts, sampling)]
    return torch.tensor([(p + o)[:cols] for p, o in zip(prompts, outs)])


def text_row_count(rows: int) -> int:
    """How many of calibration_rows' `rows` rows are text (they come first; the rest are random tokens)."""
    return rows - (max(1, round(rows * RANDOM_FRACTION)) if rows > 1 else 0)


def calibration_rows(model, tokenizer, *, rows: int, cols: int, text_file: str | Path | None, seed: int
                     ) -> torch.Tensor:
    """[rows, cols] token ids: the user's text (or model-generated text) plus ~10 % random-token rows."""
    if rows < 1 or cols < 2:
        raise ConfigError(f"calibration needs at least 1 row of 2 tokens, got {rows} × {cols}")
    g = torch.Generator().manual_seed(seed)
    n_text = text_row_count(rows)
    n_random = rows - n_text
    if text_file is not None:
        path = Path(text_file)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read calibration file {path}: {e.strerror or e}") from e
        body = rows_from_text(tokenizer, text, n_text, cols)
    else:
        body = generated_rows(model, tokenizer, n_text, cols, g)
    return torch.cat([body, random_rows(model.config.vocab_size, n_random, cols, g)]) if n_random else body
