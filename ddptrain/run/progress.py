"""Training progress on rank 0: a live bar on a terminal, plain periodic lines elsewhere.

SLURM output files and CI logs are not terminals: there a line every
``--log-every`` steps is what a reader wants, not a bar redrawn with ``\\r``.
Under an MPI launcher the lines too: Hydra (MPICH) hands the ranks pipes, and
Open MPI's mpirun a terminal of its own even when its output goes to a file.
"""

from __future__ import annotations

import sys
import time

from ddptrain.distributed.launcher import output_is_open_mpis_terminal


def format_seconds(seconds):
    seconds = int(round(seconds))
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class Progress:
    """``update`` is called after every step; it draws or prints only when it is time to."""

    BAR_WIDTH = 24
    REDRAW_SECONDS = 0.1

    def __init__(self, log_every, stream=None, interactive=None, quiet=False):
        self.stream = stream or sys.stdout
        if interactive is None:
            interactive = self.stream.isatty() and not output_is_open_mpis_terminal()
        self.interactive = interactive
        self.log_every, self.quiet = log_every, quiet
        self._drawn = False
        self._last_draw = 0.0

    def update(self, epoch, epochs, step_in_epoch, steps_in_epoch, global_step, total_steps, loss,
               accuracy, lr, samples_per_second, seconds_per_step):
        if self.quiet:
            return
        last_of_epoch = step_in_epoch == steps_in_epoch
        now = time.perf_counter()
        # Decide first, format after: this runs after every step.
        if self.interactive:
            if now - self._last_draw < self.REDRAW_SECONDS and not last_of_epoch:
                return
        elif global_step % self.log_every and not last_of_epoch:
            return
        eta = format_seconds((total_steps - global_step) * seconds_per_step)
        stats = (f"loss {loss:.4f}  acc {100 * accuracy:.2f}%  lr {lr:.4g}  "
                 f"{samples_per_second:,.0f} samples/s  {eta} left")
        if self.interactive:
            done = int(self.BAR_WIDTH * step_in_epoch / steps_in_epoch)
            bar = "#" * done + "." * (self.BAR_WIDTH - done)
            self.stream.write(f"\r\033[Kepoch {epoch}/{epochs} [{bar}] "
                              f"{step_in_epoch}/{steps_in_epoch}  {stats}")
            self.stream.flush()
            self._drawn, self._last_draw = True, now
        else:
            print(f"epoch {epoch}/{epochs}  step {step_in_epoch}/{steps_in_epoch}  {stats}",
                  file=self.stream, flush=True)

    def clear(self):
        """Erase the bar before another line is printed."""
        if self._drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._drawn = False
