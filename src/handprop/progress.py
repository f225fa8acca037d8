"""What a run prints while it trains: a log that survives its reader, and the progress line with a steady eta."""

import math
import sys
import time

SPEED_MEMORY = 60.0         # seconds: the speed the eta uses forgets what came before, by e-fold, at this pace


class Log:
    """A text stream that goes quiet when its reader goes away (`handprop train | head`): the run matters more."""

    def __init__(self, stream, open=True):
        self.stream, self.open = stream, open   # open=False: silent from the start (ranks other than 0)

    def write(self, text):
        if self.open:
            try:
                self.stream.write(text)
                self.stream.flush()
            except BrokenPipeError:
                self.open = False

    def isatty(self):
        return self.stream.isatty()


class Speed:
    """Steps per second over the recent past: steps and seconds both summed with weights that fade with age.

    Each interval's time and steps are added to running sums after those sums decay by exp(-dt / memory), so the
    speed is the average over about the last `memory` seconds: a stall of a few seconds barely moves it, a
    lasting change of pace takes over within a few memories, and before that much time has passed it is simply
    the average since the start.
    """

    def __init__(self, memory=SPEED_MEMORY):
        self.memory = memory
        self.seconds, self.steps = 0.0, 0.0     # the faded sums

    def add(self, seconds, steps):
        fade = math.exp(-seconds / self.memory)
        self.seconds, self.steps = self.seconds * fade + seconds, self.steps * fade + steps

    def per_second(self):
        return self.steps / max(self.seconds, 1e-9)


class Progress:
    """Step, loss, learning rate and speed: one updating line on a terminal, else a line every log_every steps."""

    def __init__(self, max_steps, log_every, stream=None, start_step=0, clock=time.perf_counter):
        self.max_steps, self.log_every = max_steps, log_every
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.clock = clock
        self.last_time, self.last_step, self.last_draw = clock(), start_step, 0.0
        self.speed = Speed()
        self.val = None                         # val loss at the latest checkpoint, shown once known

    def due(self, step):
        """Whether update() should print at this step (the last step always prints)."""
        if step == self.max_steps:
            return True
        return self.clock() - self.last_draw > 0.2 if self.tty else step % self.log_every == 0

    def line(self, step, loss, lr):
        """The progress line at step, the speed and eta counted up to now."""
        now = self.clock()
        self.speed.add(now - self.last_time, step - self.last_step)
        self.last_time, self.last_step = now, step
        speed = self.speed.per_second()
        eta = (self.max_steps - step) / max(speed, 1e-9)
        line = (f"step {step:>{len(str(self.max_steps))}}/{self.max_steps} | loss {loss:.4f} | lr {lr:g} | "
                f"{speed:,.0f} steps/s | eta {eta:,.0f}s")
        return line + (f" | val {self.val:.4f} at the last save" if self.val is not None else "")

    def update(self, step, loss, lr):
        line = self.line(step, loss, lr)
        if self.tty:
            self.stream.write("\r" + line + "\033[K" + ("\n" if step == self.max_steps else ""))
        else:
            self.stream.write(line + "\n")
        self.last_draw = self.clock()


def wall_time(seconds, steps):
    """E.g. 'wall time 18 min 7 s for 30000 steps', from the command's start: data, saves and evaluation too."""
    minutes, rest = divmod(round(seconds), 60)
    return f"wall time {f'{minutes} min {rest} s' if minutes else f'{seconds:.1f} s'} for {steps} steps"
