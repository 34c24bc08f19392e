"""log.profile: a torch.profiler window over a range of train steps, one trace and op table per rank.

    profiler = cleanup.enter_context(StepProfiler(range(10, 13), run_dir / "profile", rank, device, say))
    with profiler.step(n):       # around train step n: recorded when the window holds it
        train_step(...)
    profiler.write()             # after each step: the files, once the window's last step has run

What the trace holds: each step's batch from the loader, forward, backward and optimizer step, as a
"train_step#N" range, and between the window's steps the loop's logging (and an evaluation or
checkpoint due at those steps: not paused around them, which would take torch's experimental
toggle_collection_dynamic, untested here on CUDA). Collection stops at the end of the window's last step; write() then
exports, which the trainer times as a pause, not as training. Leaving the context inside the window
(an error, Ctrl-C) stops the profiler and writes the steps run so far.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

TABLE_ROWS = 20  # the .txt's ops: the top of the table is what a reader looks at first


class StepProfiler:
    def __init__(self, window: range | None, out_dir: Path, rank: int, device: torch.device, say):
        self.window, self.out_dir, self.rank, self.device, self.say = window, out_dir, rank, device, say
        self.prof = None  # started, not yet written
        self.stopped = False  # its collection is over
        self.first = self.last = None  # the steps run inside the window (a resume may start inside it)

    @contextlib.contextmanager
    def step(self, n: int):
        """Runs train step n, recorded when the window holds it: the profiler starts at the window's first
        step (or the first a resume runs) and stops after its last."""
        if self.window is None or n not in self.window:
            yield
            return
        if self.prof is None:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            # (acc_events: one start and one stop, so it changes nothing; without it torch 2.11 warns at start()
            # that "Profiler clears events at the end of each cycle")
            self.prof = profile(activities=activities, acc_events=True)
            self.prof.start()
            self.first = n
        self.last = n
        with record_function(f"train_step#{n}"):
            yield
        if n == self.window.stop - 1:
            self.prof.stop()
            self.stopped = True

    def write(self) -> None:
        """After the window's last step, the trace and table; nothing otherwise."""
        if self.stopped:
            name = self._export()
            self.say(f"profile of train steps {self.first} to {self.last}: {self.out_dir}/{name}.json (one per rank; "
                     f"open it in https://ui.perfetto.dev), the top ops in {name}.txt")

    def __enter__(self) -> StepProfiler:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """A run that ended inside the window (an error, Ctrl-C, train.max_skipped): the profiler stopped and the
        steps it ran written, the one that raised up to where it did. A failed export is said, not raised: it
        would hide what ended the run."""
        if self.prof is None:
            return
        try:
            if not self.stopped:
                self.prof.stop()
            name = self._export()
        except Exception as e:  # noqa: BLE001 - said, see above
            self.say(f"warning: the profile of train steps {self.first} to {self.last} could not be written: {e}")
            return
        self.say(f"profile of train steps {self.first} to {self.last} (the run ended in step {self.last}): "
                 f"{self.out_dir}/{name}.json, the top ops in {name}.txt")

    def _export(self) -> str:
        """Writes rank<R>-steps<first>-<last + 1>.json and .txt; returns that name."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        name = f"rank{self.rank}-steps{self.first}-{self.last + 1}"
        self.prof.export_chrome_trace(str(self.out_dir / f"{name}.json"))
        by = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = self.prof.key_averages().table(sort_by=by, row_limit=TABLE_ROWS)
        (self.out_dir / f"{name}.txt").write_text(f"steps {self.first} to {self.last}, rank {self.rank}, by {by}\n"
                                                  f"{table}\n")
        self.prof, self.stopped = None, False
        return name
