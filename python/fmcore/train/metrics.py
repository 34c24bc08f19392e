"""What a run reports: a progress bar or plain lines, metrics.jsonl, TensorBoard, the loss curve, a summary.

Only rank 0 reports. metrics.jsonl holds one JSON object per logged step ({"step", "loss" (that
step's), "loss_avg" (the mean since the previous record), "lr", "grad_norm", "tok_s", "mfu", "step_s",
"loader_wait_s", "mem_mib", ...}; "mfu" is a percentage of log.peak_tflops per device, from
models.flops_per_token: 6N + 12 L H Q T FLOPs per token, PaLM's and nanoGPT's convention) and one
per evaluation ({"step", "eval_loss", "eval_ppl"}); losses
are written with full float precision (repr), so two runs can be compared bit for bit. On resume the lines after the resumed step are dropped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from pathlib import Path


class Reporter:
    def __init__(self, run_dir: Path, *, total_steps: int, start_step: int, progress: str, tensorboard: bool,
                 enabled: bool = True):
        self.enabled, self.run_dir, self.total = enabled, run_dir, total_steps
        self.path = run_dir / "metrics.jsonl"
        self.bar = self.tb = self.file = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        _truncate_after(self.path, start_step)
        if progress == "auto":
            progress = "bar" if sys.stderr.isatty() else "plain"
        self.progress = progress
        if progress == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=start_step + 1)
        self.file = open(self.path, "a")

    def log(self, record: dict) -> None:
        """One metrics record (a training log step or an evaluation)."""
        if not self.enabled:
            return
        self.file.write(to_json(record) + "\n")
        self.file.flush()
        step = record["step"]
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(k, v, step)
        if "eval_loss" in record:
            self.message(f"step {step}: eval loss {record['eval_loss']:.4f}, perplexity {record['eval_ppl']:.2f}")
            return
        if self.bar is not None:
            self.bar.set_postfix_str(_short(record), refresh=False)
        elif self.progress == "plain":
            eta = record.get("eta_s")
            print(f"step {step}/{self.total} | {_short(record)}" + (f" | eta {_fmt_time(eta)}" if eta else ""),
                  flush=True)

    def advance(self, steps: int = 1) -> None:
        if self.enabled and self.bar is not None:
            self.bar.update(steps)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        """Closes the bar, the TensorBoard writer and metrics.jsonl; a second close closes what an
        interrupted first one left open, else does nothing, and a closed Reporter reports nothing."""
        self.enabled = False
        # Each one is closed even when closing another raises, and forgotten only once closed: a second
        # Ctrl-C while TensorBoard's writer flushed (a slow filesystem) left metrics.jsonl open and the
        # writer's thread running, and the trainer's cleanup, calling close() again, did nothing.
        with contextlib.ExitStack() as stack:
            for name in ("file", "tb", "bar"):  # (closed in reverse order: the bar first)
                stack.callback(self._close, name)

    def _close(self, name: str) -> None:
        if getattr(self, name) is not None:
            getattr(self, name).close()
            setattr(self, name, None)


def _short(r: dict) -> str:
    parts = [f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}", f"{r['tok_s']:,.0f} tok/s"]
    if r.get("mfu") is not None:
        parts.append(f"MFU {r['mfu']:.1f}%")
    return " | ".join(parts)


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def _truncate_after(path: Path, step: int) -> None:
    """Drop records past ``step`` (left by a run that died after its last checkpoint), and a torn line:
    a run that died writing a record (a full disk) leaves half of it, which no later step follows."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            continue
        if record is not None and record["step"] <= step:
            keep.append(line)
    # Written aside and renamed: truncating in place, a crash here would lose the run's whole history.
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in keep))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def to_json(obj, **kwargs) -> str:
    """json.dumps with non-finite floats written as null: NaN and Infinity are not JSON (JavaScript's
    JSON.parse rejects them, jq reads null). A non-finite loss is a skipped step, counted apart."""
    return json.dumps(_finite_or_none(obj), allow_nan=False, **kwargs)


def _finite_or_none(v):
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite_or_none(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite_or_none(x) for x in v]
    return v


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss(metrics: list[dict], out: Path, title: str) -> Path | None:
    """The training (and evaluation) loss against the step, as a PNG."""
    # loss_avg: the mean over the steps since the previous record, a steadier curve than one step's loss.
    train = [(r["step"], r.get("loss_avg", r["loss"])) for r in metrics if "loss" in r]
    train = [(s, v) for s, v in train if v is not None and math.isfinite(v)]
    evals = [(r["step"], r["eval_loss"]) for r in metrics if "eval_loss" in r]
    if not train and not evals:
        return None
    # A Figure of its own, not pyplot's: matplotlib.use("Agg") switched the caller's backend (a notebook's
    # inline one: its later plt.show() displayed nothing). savefig picks the PNG canvas itself.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="val loss", lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def summary(metrics: list[dict], extra: dict) -> dict:
    """The end-of-run numbers: first/last/best losses, throughput, memory, counters."""
    train = [r for r in metrics if "loss" in r and r["loss"] is not None]
    evals = [r for r in metrics if "eval_loss" in r]
    out = dict(extra)
    if train:
        out["first_loss"], out["last_loss"] = train[0]["loss"], train[-1]["loss"]
        rates = [r["tok_s"] for r in train[1:]] or [train[0]["tok_s"]]  # the first step includes warm-up
        out["median_tok_s"] = sorted(rates)[len(rates) // 2]
        mfus = [r["mfu"] for r in train[1:] if r.get("mfu") is not None]
        if mfus:
            out["median_mfu"] = sorted(mfus)[len(mfus) // 2]
        mems = [r["mem_mib"] for r in train if r.get("mem_mib") is not None]
        if mems:
            out["peak_mem_mib"] = max(mems)
    if evals:
        out["eval_loss"], out["eval_ppl"] = evals[-1]["eval_loss"], evals[-1]["eval_ppl"]
        # A non-finite evaluation is null in metrics.jsonl: min() over it raised a TypeError at the run's end,
        # after training, and no summary.json was written.
        finite = [r["eval_loss"] for r in evals if r["eval_loss"] is not None]
        if finite:
            out["best_eval_loss"] = min(finite)
    return out


def format_summary(s: dict) -> str:
    lines = ["", "== summary =="]
    for k, v in s.items():
        lines.append(f"  {k:<18} {v:.6g}" if isinstance(v, float) else f"  {k:<18} {v}")
    return "\n".join(lines)
