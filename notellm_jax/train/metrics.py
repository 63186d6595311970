"""Training metrics: model FLOPs (for MFU), and a writer for the console, JSONL and TensorBoard.

Only process 0 writes; the other processes get a writer that drops everything.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from notellm_jax.model.families import LlamaConfig
from notellm_jax.model.notellm import needs_logits

logger = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per device, for MFU. CPU: the measured jitted fp32 matmul peak of this
# project's 2-core machines (ENVIRONMENT.md), per process (all cores form one device).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5p": 459e12,
              "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v6 lite": 918e12, "cpu": 2.0e11}


def peak_flops_per_device(device: jax.Device | None = None) -> float:
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return PEAK_FLOPS["cpu"] / max(1, len(jax.local_devices()))
    kind = getattr(device, "device_kind", "")
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    logger.warning("unknown device kind %r: MFU is reported against the H100 peak", kind)
    return PEAK_FLOPS["H100"]


def forward_flops_per_token(cfg: LlamaConfig, seq_len: int, layers: int) -> float:
    """Matmul FLOPs of one token through `layers` decoder layers (weights + attention scores)."""
    x, m, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    weights = x * d * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads) + 3 * x * m
    attention = 2 * seq_len * cfg.num_attention_heads * d  # QK^T and PV, each seq_len * heads * head_dim MACs
    return 2.0 * layers * (weights + attention)


def layer_flops_at_rows(cfg: LlamaConfig, seq_len: int, rows: int) -> float:
    """Matmul FLOPs of one sequence through one decoder layer that computes keys and values at all `seq_len`
    positions but queries, attention output and MLP only at `rows` of them (NoteLLM's last layer: `Llama`
    read_positions). With rows = seq_len it is seq_len x `forward_flops_per_token` of one layer."""
    x, m, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    keys_values = seq_len * x * d * 2 * cfg.num_key_value_heads
    per_row = x * d * 2 * cfg.num_attention_heads + 3 * x * m + 2 * seq_len * cfg.num_attention_heads * d
    return 2.0 * (keys_values + rows * per_row)


def train_step_flops(cfg: LlamaConfig, *, sequences: int, seq_len: int, targets: int, emb_dim: int,
                     trained_layers: int, forward_only_layers: int, read_rows: int | None = None) -> float:
    """Model FLOPs of one NoteLLM step: trained layers cost forward + backward (3x), frozen layers that
    are run (not read from the feature cache) cost a forward; plus the LM head at the `targets` supervised
    positions per sequence and the embedding projection. With `read_rows` the last trained layer is counted
    at those rows alone (keys and values at every position), as NoteLLM computes it when its layers are
    not scanned: MFU counts the work the step needs, never rows it does not compute."""
    if read_rows is not None and trained_layers:
        trained = (seq_len * forward_flops_per_token(cfg, seq_len, trained_layers - 1)
                   + layer_flops_at_rows(cfg, seq_len, read_rows))
    else:
        trained = seq_len * forward_flops_per_token(cfg, seq_len, trained_layers)
    frozen = seq_len * forward_flops_per_token(cfg, seq_len, forward_only_layers)
    head = 2.0 * cfg.hidden_size * cfg.vocab_size * targets + 2.0 * cfg.hidden_size * emb_dim
    return sequences * (3 * trained + frozen + 3 * head)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the rows after `step` from a metrics.jsonl (a run resumed from the checkpoint at `step` logs them
    again), so each step appears once; a cut last line (a killed writer) goes too."""
    if not path.is_file():
        return
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)
        logger.info("%s: dropped %d rows after step %d (resumed there)", path, dropped, step)


class StepFlops:
    """Model FLOPs of one step of a run: trained layers for every row (the last at its read rows, [EMB]'s and
    the supervised ones, unless the layers are scanned), the frozen bottom only for the rows it actually ran
    on (the others came from the feature cache). A "gcl_only" step computes no LM head and reads [EMB]'s row
    alone (`needs_logits`); with train.head_rows_per_note the head runs at that many rows per note (a batch
    that overflows them runs unpacked, more than counted here)."""

    def __init__(self, cfg: LlamaConfig, config: Any, frozen_layers: int):
        self.cfg, self.frozen_layers = cfg, frozen_layers
        self.rows, self.length = 2 * config.train.batch_pairs, config.prompt.max_length
        slots = config.prompt.max_targets if needs_logits(config.train.objective) else 0
        self.targets = min(slots, config.train.head_rows_per_note or slots)  # LM head rows per note
        self.emb_dim = config.model.emb_dim
        self.read_rows = None if cfg.scan_layers else 1 + slots

    def __call__(self, frozen_rows: int) -> float:
        trained = train_step_flops(self.cfg, sequences=self.rows, seq_len=self.length, targets=self.targets,
                                   emb_dim=self.emb_dim, trained_layers=self.cfg.num_hidden_layers - self.frozen_layers,
                                   forward_only_layers=0, read_rows=self.read_rows)
        bottom = train_step_flops(self.cfg, sequences=frozen_rows, seq_len=self.length, targets=0, emb_dim=0,
                                  trained_layers=0, forward_only_layers=self.frozen_layers)
        return trained + bottom


class MetricsWindow:
    """Step metrics of one logging window, kept on the device until `flush` (one sync per window)."""

    def __init__(self, step_flops: StepFlops):
        self.step_flops = step_flops
        self.peak = peak_flops_per_device() * jax.device_count()
        self._reset()

    def _reset(self) -> None:
        self.start, self.flops, self.tokens, self.metrics = time.time(), 0.0, 0, []

    def add(self, step: int, metrics: dict, local_batch: dict, frozen_rows: int) -> None:
        self.metrics.append((step, metrics))
        self.flops += self.step_flops(frozen_rows)
        self.tokens += int(local_batch["attention_mask"].sum()) * jax.process_count()

    def flush(self, discarded: set[int] = frozenset()) -> dict[str, float]:
        """Window means (single-step contrastive losses are noisy) over the steps not `discarded` (non-finite),
        the schedule's current value, speed."""
        fetched = jax.device_get(self.metrics)
        elapsed = time.time() - self.start
        rows = [m for step, m in fetched if step not in discarded] or [m for _, m in fetched]
        out = {k: float(np.mean([m[k] for m in rows])) for k in rows[-1]}
        out["learning_rate"] = float(fetched[-1][1]["learning_rate"])
        out.update(tokens_per_s=self.tokens / elapsed, step_time_s=elapsed / len(fetched),
                   mfu=self.flops / elapsed / self.peak)
        self._reset()
        return out


class MetricsWriter:
    """Progress line on the console, one JSON object per line in metrics.jsonl, TensorBoard scalars.

    metrics.jsonl is cut back to `start_step` first, so a resumed run's file has each step once."""

    def __init__(self, log_dir: Path, total_steps: int, enabled: bool = True, start_step: int = 0):
        self.enabled = enabled
        self.total_steps = total_steps
        self.start = time.time()
        self._jsonl = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        self._bar = tqdm(total=total_steps, initial=start_step, unit="step", file=sys.stderr, dynamic_ncols=True,
                         mininterval=5.0, disable=not sys.stderr.isatty())  # logs get the metric lines only
        log_dir.mkdir(parents=True, exist_ok=True)
        truncate_metrics(log_dir / "metrics.jsonl", start_step)
        self._jsonl = open(log_dir / "metrics.jsonl", "a", buffering=1)
        try:
            from tensorboardX import SummaryWriter  # optional: logged without it
            self._tb = SummaryWriter(str(log_dir / "tensorboard"))
        except ImportError:
            logger.warning("tensorboardX not installed: no TensorBoard summaries (metrics.jsonl is still written)")

    def write(self, step: int, metrics: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, "split": prefix, "time": time.time() - self.start, **scalars}) + "\n")
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(f"{prefix}/{key}", value, step)
        elapsed = time.time() - self.start
        shown = " ".join(f"{k}={v:.4g}" for k, v in scalars.items())
        self._bar.write(f"[{prefix} {step}/{self.total_steps} {elapsed:6.0f}s] {shown}", file=sys.stderr)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
