"""Evaluation of a checkpoint: EleutherAI's lm-evaluation-harness (offline) and perplexity.

    python -m pretrain.evaluate CKPT_OR_DIR --tasks xlstm_heldout [--ppl-shards SPEC]
        [--task-shards SPEC] [--num-examples 200] [--limit N] [--batch-size 16]
        [--include-path DIR] [--output results.json] [--no-mlflow]

CKPT_OR_DIR: a checkpoint folder or root (any backend, any world size), a
folder written by ``pretrain.convert --to safetensors`` or a transformers
xLSTM folder: every architecture (NeurIPS with sLSTM blocks included).

The model adapter `XLSTMEvalLM` is registered with lm-eval as
``xlstm-pretrain`` (import this module, then
``lm_eval.simple_evaluate(model="xlstm-pretrain", model_args="pretrained=PATH")``).
It implements lm-eval's three request types on our models:

- ``loglikelihood``: contexts and continuations scored in batches (sorted by
  length, right-padded; padding never reaches a real position of a causal
  model). Nothing is truncated: a sequence longer than ``max_length`` (the
  model's context length) runs in windows of that size with the recurrent
  state carried from window to window, so the score is the full-context score.
- ``loglikelihood_rolling``: a whole document, the first token conditioned on
  EOS (the document separator our data uses; the state is reset after it, as
  in training), then windows with the carried state: exact, in bounded memory.
- ``generate_until``: batched, left-padded prompts with the recurrent state
  reset at each prompt's first token (so the padding has no effect), one
  chunkwise prefill, then one recurrent step per new token (fixed-size
  state); stops at the request's ``until`` strings, EOS or ``max_gen_toks``.
  Greedy unless the request asks for sampling (temperature, top_k, top_p).

Tasks: the project ships its own under ``pretrain/eval_tasks/`` (tag
``xlstm_heldout``: ``xlstm_nextword``, ``xlstm_cloze``, ``xlstm_nextline``,
``xlstm_heldout_ppl``), built at run time from held-out token shards
(``--task-shards``; default: the checkpoint's validation shards ``data.val``).
Any task a user has locally works too (``--include-path``). Nothing is
downloaded: ``HF_HUB_OFFLINE`` and ``HF_DATASETS_OFFLINE`` default to 1.

``--ppl-shards URL_SPEC``: token-weighted perplexity over every token of those
shards (each document from the zero state as in training, its tokens after the
first and its EOS the targets, long documents with their full context through
the carried state), reported with the token and document counts.

Results: a table on stdout, a JSON file (``--output``), and the MLflow run the
checkpoint came from (its run id is in trainer_state.json): metrics
``eval/<task>/<metric>`` at the checkpoint's step and the JSON as an artifact.
A missing or unreachable store costs a warning, never the evaluation.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from .extras import missing_extra_message  # noqa: E402

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ModuleNotFoundError as _err:
    if _err.name is None or _err.name.split(".")[0] != "lm_eval":
        raise
    _line = missing_extra_message("lm_eval", "pretrain.evaluate")
    if __name__ == "__main__":  # a command line gets one line, no traceback
        raise SystemExit(_line) from None
    raise ModuleNotFoundError(_line, name="lm_eval") from None

from model import sample_next  # noqa: E402

from .checkpoint import CheckpointError, Source, load_model, load_tokenizer  # noqa: E402

TASKS_DIR = Path(__file__).resolve().parent / "eval_tasks"
MODEL_NAME = "xlstm-pretrain"
log = logging.getLogger(__name__)


# ============================================================================ scoring


def _run_windows(model: torch.nn.Module, idx: torch.Tensor, reset: torch.Tensor | None,
                 window: int, on_logits: Callable[[int, torch.Tensor], None], state=None):
    """Run idx (B, S) through `model` in windows of `window` tokens, carrying the
    recurrent state; `on_logits(start, logits (B, w, V))` sees each window's
    logits. Returns the final state."""
    S = idx.shape[1]
    for lo in range(0, S, window):
        hi = min(S, lo + window)
        r = None if reset is None else reset[:, lo:hi]
        if r is not None and not bool(r.any()):
            r = None
        logits, state = model(idx[:, lo:hi], state, reset=r, return_state=True)
        on_logits(lo, logits)
    return state


@torch.no_grad()
def score_sequences(
    model: torch.nn.Module,
    seqs: Sequence[Sequence[int]],
    starts: Sequence[int],
    *,
    batch_size: int = 16,
    window: int = 2048,
    pad_id: int = 0,
    reset_at: Sequence[int | None] | None = None,
    device: torch.device | str = "cpu",
    progress: str | None = None,
) -> list[tuple[float, bool]]:
    """For each token sequence s: (sum_{t >= start} log p(s[t] | s[:t]), whether
    every such s[t] is the argmax). `starts[i] >= 1`. `reset_at[i]`: a position
    where the state is reset (a document start), or None.

    Batches of `batch_size` sequences of similar length, right-padded with
    `pad_id`; windows of `window` tokens with the state carried. `progress`: a label for
    a progress bar over the sequences (shown on a terminal only), or None for none."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out: list[tuple[float, bool]] = [(0.0, True)] * len(seqs)
    bar = tqdm(total=len(seqs), desc=progress, unit="req", disable=None if progress else True)
    for b in range(0, len(order), batch_size):
        rows = order[b:b + batch_size]
        L = max(len(seqs[i]) for i in rows)
        if L < 2:
            raise ValueError("a sequence to score needs at least 2 tokens (context + 1)")
        ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, :len(seqs[i])] = torch.tensor(list(seqs[i]), dtype=torch.long)
        inp, tgt = ids[:, :-1].to(device), ids[:, 1:].to(device)
        # position t of inp predicts seqs[t + 1]; it counts if t + 1 in [start, len)
        pos = torch.arange(L - 1, device=device)
        lo = torch.tensor([starts[i] for i in rows], device=device)[:, None]
        hi = torch.tensor([len(seqs[i]) for i in rows], device=device)[:, None]
        mask = (pos >= lo - 1) & (pos < hi - 1)
        reset = None
        if reset_at is not None and any(reset_at[i] is not None for i in rows):
            reset = torch.zeros_like(inp, dtype=torch.bool)
            for r, i in enumerate(rows):
                if reset_at[i] is not None:
                    reset[r, reset_at[i]] = True
        logp_sum = torch.zeros(len(rows), dtype=torch.float64, device=device)
        greedy = torch.ones(len(rows), dtype=torch.bool, device=device)

        def take(start: int, logits: torch.Tensor, tgt=tgt, mask=mask, logp_sum=logp_sum,
                 greedy=greedy) -> None:
            w = logits.shape[1]
            t, m = tgt[:, start:start + w], mask[:, start:start + w]
            lp = torch.log_softmax(logits.float(), dim=-1)
            tok_lp = lp.gather(-1, t[..., None])[..., 0]
            logp_sum.add_((tok_lp.double() * m).sum(1))
            greedy.logical_and_(((lp.argmax(-1) == t) | ~m).all(1))

        _run_windows(model, inp, reset, window, take)
        for r, i in enumerate(rows):
            out[i] = (float(logp_sum[r]), bool(greedy[r]))
        bar.update(len(rows))
    bar.close()
    return out


@torch.no_grad()
def generate_batch(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    stop: Callable[[int, list[int]], bool] | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
    window: int = 2048,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    device: torch.device | str = "cpu",
) -> list[list[int]]:
    """Continue each prompt by up to `max_new_tokens` tokens (returned without
    the prompt). Prompts are left-padded and the state is reset at each
    prompt's first token, so row i gets exactly what it would get alone.
    Prefill in windows, then one recurrent `model.step` per token. A row stops
    at `eos_id` (not returned) or when `stop(i, tokens so far)` is true."""
    B = len(prompts)
    L = max(len(p) for p in prompts)
    if min(len(p) for p in prompts) < 1:
        raise ValueError("every prompt needs at least one token")
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    reset = torch.zeros(B, L, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(list(p), dtype=torch.long)
        reset[i, L - len(p)] = True
    ids, reset = ids.to(device), reset.to(device)
    last: dict[str, torch.Tensor] = {}

    def keep(start: int, logits: torch.Tensor) -> None:
        last["logits"] = logits[:, -1]

    state = _run_windows(model, ids, reset, window, keep)
    logits = last["logits"]
    gen = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    for t in range(max_new_tokens):
        token = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                            generator=gen)
        for i in range(B):
            if done[i]:
                continue
            tid = int(token[i])
            if eos_id is not None and tid == eos_id:
                done[i] = True
                continue
            out[i].append(tid)
            if stop is not None and stop(i, out[i]):
                done[i] = True
        if all(done) or t + 1 == max_new_tokens:
            break
        logits, state = model.step(token, state)
    return out


# ============================================================================ lm-eval adapter


@register_model(MODEL_NAME, "xlstm_pretrain")
class XLSTMEvalLM(TemplateLM):
    """lm-eval model adapter for our xLSTM models (every architecture).

    model_args: ``pretrained=PATH`` (checkpoint folder or root, --to safetensors
    folder, transformers folder), ``batch_size``, ``max_length`` (window of the
    recurrent forward; default the model's context length), ``device``,
    ``dtype`` (float32, bfloat16), ``max_gen_toks`` (default 256), ``seed``.
    Or pass a built ``model=`` and ``tokenizer=`` (a `data.Tokenizer`)."""

    def __init__(self, pretrained: str | None = None, *, model: torch.nn.Module | None = None,
                 tokenizer: Any = None, batch_size: int | str = 16, max_length: int | None = None,
                 device: str | None = None, dtype: str = "float32", max_gen_toks: int = 256,
                 seed: int = 0, **kwargs: Any) -> None:
        super().__init__()
        self.device_ = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.source: Source | None = None
        if model is None:
            if pretrained is None:
                raise ValueError(f"{MODEL_NAME}: model_args needs pretrained=PATH")
            model, self.source = load_model(pretrained, device=str(self.device_), deepspeed=True)
            if self.source.tokenizer is None:
                raise ValueError(f"{pretrained}: no tokenizer (tokenizer/tokenizer.model) to evaluate with")
            tokenizer = load_tokenizer(self.source.tokenizer)
        if tokenizer is None:
            raise ValueError(f"{MODEL_NAME}: a model needs its tokenizer")
        dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[str(dtype)]
        self.model = model.to(self.device_, dt).eval()
        self.tok = tokenizer
        self._batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self._max_length = int(max_length or getattr(model.cfg, "context_length", 2048))
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)

    # ------------------------------------------------------------ lm-eval interface
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self.device_

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return list(self.tok.encode(string))

    def tok_decode(self, tokens: Sequence[int], **kwargs: Any) -> str:
        return self.tok.decode(list(tokens))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any):
        seqs = [list(ctx) + list(cont) for _, ctx, cont in requests]
        starts = [len(ctx) for _, ctx, _ in requests]
        res = score_sequences(self.model, seqs, starts, batch_size=self.batch_size,
                              window=self.max_length, pad_id=self.tok.pad_id, device=self.device,
                              progress=None if disable_tqdm else "loglikelihood")
        for (key, _, _), r in zip(requests, res):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, r)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [req.args[0] for req in requests]
        seqs = [[self.eot_token_id, *self.tok_encode(t)] for t in texts]
        res = score_sequences(self.model, seqs, [1] * len(seqs), batch_size=self.batch_size,
                              window=self.max_length, pad_id=self.tok.pad_id,
                              reset_at=[1 if len(s) > 1 else None for s in seqs], device=self.device,
                              progress=None if disable_tqdm else "loglikelihood_rolling")
        out = [lp for lp, _ in res]
        for req, lp in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), lp)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        bar = tqdm(total=len(requests), desc="generate_until", unit="req",
                   disable=True if disable_tqdm else None)
        for key, members in groups.items():
            kw = dict(json.loads(key))
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            sample = bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 1.0 if sample else 0.0) or 0.0)
            if not sample:
                temperature = 0.0
            top_k = kw.pop("top_k", None)
            top_p = kw.pop("top_p", None)
            members = sorted(members, key=lambda i: -len(requests[i].args[0]))
            for b in range(0, len(members), self.batch_size):
                rows = members[b:b + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0]) or [self.eot_token_id] for i in rows]

                def stop(r: int, toks: list[int], _until=until) -> bool:
                    text = self.tok_decode(toks)
                    return any(u and u in text for u in _until)

                outs = generate_batch(
                    self.model, prompts, max_new, stop=stop if until else None,
                    eos_id=self.eot_token_id, pad_id=self.tok.pad_id, window=self.max_length,
                    temperature=temperature, top_k=None if top_k is None else int(top_k),
                    top_p=None if top_p is None else float(top_p), seed=self.seed,
                    device=self.device)
                for i, toks in zip(rows, outs):
                    text = self.tok_decode(toks)
                    for u in until:
                        if u:
                            text = text.split(u)[0]
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(rows))
        bar.close()
        return [r or "" for r in results]


# ============================================================================ perplexity


def iter_documents(spec: str, vocab_size: int | None = None) -> Iterator[list[int]]:
    """Token ids of every document of the shards `spec` (any source spec), in order."""
    from data.sources import expand_source, open_shard
    from data.tarshard import iter_samples

    shards = expand_source(spec)
    for url in shards.urls:
        raw = open_shard(url)
        try:
            for _key, ids, _off in iter_samples(raw, url, vocab_size=vocab_size,
                                                expect_sha256=shards.sha256.get(url)):
                yield ids.tolist()
        finally:
            raw.close()


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokenizer: Any, spec: str, *, seq_len: int = 1024,
               batch_size: int = 8, device: torch.device | str = "cpu",
               docs_per_pass: int = 256) -> dict[str, float]:
    """Token-weighted perplexity over every document of the shards `spec`.

    Each document is scored whole, from the zero state as in training (state
    reset at its first token): every token after the first and the closing EOS
    is a target (so the count is the shards' token count, as the trainer's
    packed loss counts them); long documents run in windows of `seq_len` with
    the recurrent state carried, i.e. with their full context. Returns
    {"loss" (nats per token), "ppl", "tokens", "documents"}."""
    nll, count, docs = 0.0, 0, 0
    pending: list[list[int]] = []

    def flush() -> None:
        nonlocal nll, count, docs
        seqs = [d + [tokenizer.eos_id] for d in pending if d]
        res = score_sequences(model, seqs, [1] * len(seqs), batch_size=batch_size,
                              window=seq_len, pad_id=tokenizer.pad_id, device=device)
        nll -= sum(lp for lp, _ in res)
        count += sum(len(s) - 1 for s in seqs)
        docs += len(seqs)
        pending.clear()

    for ids in iter_documents(spec, tokenizer.vocab_size):
        pending.append(ids)
        if len(pending) >= docs_per_pass:
            flush()
    if pending:
        flush()
    if count == 0:
        raise ValueError(f"--ppl-shards {spec}: no tokens")
    loss = nll / count
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": count, "documents": docs}


# ============================================================================ reporting


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """{"<task>/<metric>": value} of lm-eval's results (filters dropped from names
    when 'none'), numbers only."""
    out: dict[str, float] = {}
    for task, metrics in results.get("results", {}).items():
        for name, value in metrics.items():
            if name == "alias" or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, _, filt = name.partition(",")
            label = metric if filt in ("", "none") else f"{metric}_{filt}"
            if not (isinstance(value, float) and math.isnan(value)):
                out[f"{task}/{label}"] = float(value)
    return out


def table(report: dict[str, Any]) -> str:
    """A plain text table of the report's metrics."""
    rows = [("metric", "value")]
    for key, value in report.get("metrics", {}).items():
        rows.append((key, f"{value:.6g}" if isinstance(value, float) else str(value)))
    width = max(len(r[0]) for r in rows)
    lines = [f"{a:<{width}}  {b}" for a, b in rows]
    lines.insert(1, "-" * (width + 12))
    return "\n".join(lines)


def _tracking_uri(src: Source, override: str | None) -> str | None:
    """The MLflow store of the run the checkpoint came from (see the module docstring)."""
    if override:
        return override
    info = src.info
    run_id = info.get("run_id")
    candidates: list[Path] = []
    if info.get("run_dir"):
        candidates.append(Path(info["run_dir"]))
    if src.path is not None:  # default layout: <run_dir>/checkpoints/step-N
        candidates.append(src.path.resolve().parent.parent)
    for run_dir in candidates:
        record = run_dir / "mlflow_run.json"
        if record.is_file():
            try:
                rec = json.loads(record.read_text())
            except ValueError:
                continue
            if rec.get("run_id") == run_id and rec.get("uri"):
                return str(rec["uri"])
    tracking = info.get("tracking") or {}
    if tracking.get("uri"):
        return str(tracking["uri"])
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    for run_dir in candidates:
        if (run_dir / "mlflow.db").is_file():
            return f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
    return None


def log_to_mlflow(src: Source, metrics: dict[str, float], json_path: Path,
                  uri: str | None = None) -> str | None:
    """Log `metrics` (as eval/<name>) at the checkpoint's step and the JSON file to
    the checkpoint's MLflow run. Returns the run id, or None (with a warning)."""
    run_id = src.info.get("run_id")
    if not run_id:
        print("[evaluate] warning: the checkpoint names no MLflow run; results not tracked",
              file=sys.stderr)
        return None
    uri = _tracking_uri(src, uri)
    if uri is None:
        print(f"[evaluate] warning: no MLflow store found for run {run_id}; results not tracked "
              "(pass --tracking-uri)", file=sys.stderr)
        return None
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        step = int(src.info.get("step") or 0)
        now = int(time.time() * 1000)
        items = [Metric(f"eval/{k}", v, now, step) for k, v in metrics.items() if math.isfinite(v)]
        for i in range(0, len(items), 1000):
            client.log_batch(run_id, metrics=items[i:i + 1000])
        client.log_artifact(run_id, str(json_path), artifact_path=f"eval/step-{step:06d}")
    except Exception as err:  # noqa: BLE001 - tracking never costs the evaluation
        print(f"[evaluate] warning: could not log to MLflow run {run_id} at {uri}: {err}",
              file=sys.stderr)
        return None
    return run_id


# ============================================================================ entry


def task_manager(include: Sequence[str], metadata: dict[str, Any], tasks: Sequence[str] = ()):
    """lm-eval's TaskManager over the project's tasks and `include`; lm-eval's
    own task index (seconds to build) only when a requested name is not there."""
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR), *map(str, include)]
    tm = TaskManager(include_path=paths, metadata=metadata, include_defaults=False)
    if all(t in tm.all_tasks or Path(t).is_file() for t in tasks):
        return tm
    return TaskManager(include_path=paths, metadata=metadata)


def evaluate(path: str, *, tasks: Sequence[str] = ("xlstm_heldout",), ppl_shards: str | None = None,
             task_shards: str | None = None, num_examples: int = 200, limit: int | None = None,
             batch_size: int = 16, max_length: int | None = None, device: str | None = None,
             dtype: str = "float32", include: Sequence[str] = (), seed: int = 1234,
             ppl_seq_len: int | None = None, bootstrap_iters: int = 1000,
             num_fewshot: int | None = None) -> tuple[dict[str, Any], Source]:
    """Run the tasks (and perplexity) on the model at `path`. Returns (report, source)."""
    lm = XLSTMEvalLM(path, batch_size=batch_size, max_length=max_length, device=device,
                     dtype=dtype, seed=seed)
    src = lm.source
    report: dict[str, Any] = {"model": str(path), "step": src.info.get("step"),
                              "run_id": src.info.get("run_id"), "arch": src.cfg.arch,
                              "metrics": {}, "lm_eval": None, "perplexity": None}
    t0 = time.perf_counter()
    if tasks:
        import lm_eval

        shards = task_shards or _default_val(src)
        metadata = {"heldout_shards": shards, "tokenizer": str(src.tokenizer),
                    "num_examples": num_examples, "seed": seed}
        out = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot,
            bootstrap_iters=bootstrap_iters, log_samples=False,
            task_manager=task_manager(include, metadata, tasks), random_seed=seed,
            numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
        report["lm_eval"] = {k: out[k] for k in ("results", "n-samples", "configs", "versions")
                             if k in out}
        report["metrics"].update(flat_metrics(out))
    if ppl_shards:
        ppl = perplexity(lm.model, lm.tok, ppl_shards, seq_len=ppl_seq_len or lm.max_length,
                         batch_size=batch_size, device=lm.device)
        report["perplexity"] = {"shards": ppl_shards, **ppl}
        report["metrics"].update({"ppl/loss": ppl["loss"], "ppl/ppl": ppl["ppl"],
                                  "ppl/tokens": float(ppl["tokens"])})
    report["seconds"] = time.perf_counter() - t0
    return report, src


def _default_val(src: Source) -> str:
    spec = None
    if src.path is not None and (src.path / "trainer_state.json").is_file():
        state = json.loads((src.path / "trainer_state.json").read_text())
        spec = (state.get("config") or {}).get("data", {}).get("val")
    if not spec:
        raise CheckpointError(f"{src.path}: no validation shards recorded (data.val) to build the "
                           "xlstm_* tasks from; pass --task-shards SPEC")
    return str(spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pretrain.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="checkpoint folder or root, --to safetensors or transformers folder")
    ap.add_argument("--tasks", default="xlstm_heldout",
                    help="comma-separated lm-eval tasks, groups or tags ('' for none)")
    ap.add_argument("--task-shards", default=None,
                    help="held-out shards the xlstm_* tasks are built from (default: data.val)")
    ap.add_argument("--num-examples", type=int, default=200, help="examples per xlstm_* task")
    ap.add_argument("--limit", type=int, default=None, help="lm-eval's limit per task")
    ap.add_argument("--num-fewshot", type=int, default=None)
    ap.add_argument("--include-path", action="append", default=[], help="more task folders")
    ap.add_argument("--ppl-shards", default=None, help="shard spec for token-weighted perplexity")
    ap.add_argument("--ppl-seq-len", type=int, default=None, help="default: the model's context")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=None,
                    help="window of the recurrent forward (default: the model's context length)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--bootstrap-iters", type=int, default=1000)
    ap.add_argument("--output", default=None, help="JSON file (default: eval_results/<name>.json)")
    ap.add_argument("--tracking-uri", default=None, help="MLflow store (default: the run's)")
    ap.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    args = ap.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t.strip()]
    if not tasks and not args.ppl_shards:
        print("[evaluate] error: nothing to do (no --tasks and no --ppl-shards)", file=sys.stderr)
        return 2
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    try:
        report, src = evaluate(
            args.path, tasks=tasks, ppl_shards=args.ppl_shards, task_shards=args.task_shards,
            num_examples=args.num_examples, limit=args.limit, batch_size=args.batch_size,
            max_length=args.max_length, device=args.device, dtype=args.dtype,
            include=args.include_path, seed=args.seed, ppl_seq_len=args.ppl_seq_len,
            bootstrap_iters=args.bootstrap_iters, num_fewshot=args.num_fewshot)
    except (CheckpointError, ValueError, KeyError) as err:
        print(f"[evaluate] error: {err}", file=sys.stderr)
        return 1
    name = (src.path or Path(args.path)).name
    out = Path(args.output) if args.output else Path("eval_results") / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"[evaluate] {args.path} (step {report['step']}, {report['arch']}) "
          f"in {report['seconds']:.1f}s")
    print(table(report))
    if report["perplexity"]:
        p = report["perplexity"]
        print(f"[evaluate] perplexity {p['ppl']:.4f} (loss {p['loss']:.4f} nats/token) over "
              f"{p['tokens']} tokens ({p['documents']} documents) of {p['shards']}")
    print(f"[evaluate] results: {out}")
    if not args.no_mlflow:
        run = log_to_mlflow(src, report["metrics"], out, args.tracking_uri)
        if run:
            print(f"[evaluate] logged to MLflow run {run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
