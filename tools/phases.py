"""Peak memory of iqstar's main() by phase (loading, sampling, scoring, training, saving), in the same process.

main() looks its helpers up as module globals when it calls them, so wrapping iqstar.load_model,
iqstar.sample_responses, iqstar.superior_targets, ... (and DeepSpeed's unwrap_model_for_generation, which gathers
the policy before the first generate call) marks where each phase starts. Used by bench/memory.py (CPU: resident
memory) and tools/gpu_check.py (GPU: torch.cuda's allocator), with one meter each:

    meter = RSSMeter()                  # or CUDAMeter()
    with Phases(meter) as phases:
        iqstar.main(argv)
    phases.peaks                        # {"loading": bytes above the baseline, "sampling": ..., ...}
"""

import contextlib
import functools
import threading
import time

from tools.common import clean_env


def status_bytes(field):
    """A field of /proc/self/status (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


class RSSMeter:
    """Resident memory of this process. Two readings, the larger kept: the kernel's own high-water mark (VmHWM),
    reset at each phase mark through /proc/self/clear_refs, which misses nothing; and a thread sampling VmRSS every
    `interval` seconds, which still works where clear_refs is refused (it can miss a peak shorter than that)."""

    name = "peak RSS"

    def __init__(self, interval=0.002):
        self.interval, self.sampled, self.stop = interval, 0, threading.Event()
        try:
            self.reset_hwm()
            self.exact = True
        except OSError:
            self.exact = False
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self):
        while not self.stop.wait(self.interval):
            self.sampled = max(self.sampled, status_bytes("VmRSS"))

    @staticmethod
    def reset_hwm():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak resident set size to the current one (Linux >= 4.0)

    def current(self):
        return status_bytes("VmRSS")

    def peak_and_reset(self):
        """The peak since the last call, then start a new one from the current value."""
        peak = max(self.sampled, status_bytes("VmHWM") if self.exact else 0, self.current())
        if self.exact:
            self.reset_hwm()
        self.sampled = self.current()
        return peak

    def close(self):
        self.stop.set()
        self.thread.join()


class CUDAMeter:
    """Bytes held by torch.cuda's allocator (max_memory_allocated, reset at each mark); reserved beside it, as what
    the allocator took from the GPU (allocated + its cache and fragmentation)."""

    name = "peak GPU memory allocated"

    def __init__(self):
        import torch

        self.cuda = torch.cuda
        self.reserved = {}

    def current(self):
        return self.cuda.memory_allocated()

    def peak_and_reset(self):
        self.cuda.synchronize()
        peak, self.last_reserved = self.cuda.max_memory_allocated(), self.cuda.max_memory_reserved()
        self.cuda.reset_peak_memory_stats()
        return peak

    def close(self):
        pass


class Phases(contextlib.AbstractContextManager):
    """Wraps iqstar's module-level functions for the duration, so that a call of iqstar.main() records
    `peaks` (bytes above the baseline taken at the first load_model call) and `seconds` by phase."""

    def __init__(self, meter):
        import iqstar

        self.iqstar, self.meter = iqstar, meter
        self.phase, self.baseline, self.started = None, None, None
        self.peaks, self.seconds, self.reserved = {}, {}, {}
        self.saved = []

    def mark(self, phase):
        """Close the phase under way (its peak, its time) and start `phase`."""
        now = time.perf_counter()
        if self.phase is None and self.baseline is None:  # the first mark: nothing is loaded yet
            self.meter.peak_and_reset()
            self.baseline = self.meter.current()
        else:
            peak = self.meter.peak_and_reset() - self.baseline
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), peak)
            self.seconds[self.phase] = self.seconds.get(self.phase, 0.0) + now - self.started
            if hasattr(self.meter, "last_reserved"):
                self.reserved[self.phase] = max(self.reserved.get(self.phase, 0), self.meter.last_reserved)
        self.phase, self.started = phase, now

    def wrap(self, owner, name, enter, leave=None, once=False, context=False):
        """owner.name marks `enter` on each call (on the first only if once) and `leave` when it returns; a context
        manager (context=True) marks `enter` as it is entered."""
        original = getattr(owner, name)
        calls = [0]

        @functools.wraps(original)
        def wrapped(*args, **kwargs):
            calls[0] += 1
            if (calls[0] == 1 or not once) and self.phase != enter:
                self.mark(enter)
            try:
                return original(*args, **kwargs)
            finally:
                if leave and self.phase != leave:
                    self.mark(leave)

        @functools.wraps(original)
        @contextlib.contextmanager
        def wrapped_context(*args, **kwargs):
            if self.phase != enter:
                self.mark(enter)
            with original(*args, **kwargs) as value:
                yield value

        setattr(owner, name, wrapped_context if context else wrapped)
        self.saved.append((owner, name, original))

    def __enter__(self):
        import deepspeed.runtime.zero

        iq = self.iqstar
        self.wrap(iq, "load_model", "loading", once=True)
        # gathering the policy (all of it on every rank) is where sampling's memory starts
        self.wrap(deepspeed.runtime.zero, "unwrap_model_for_generation", "sampling", context=True)
        self.wrap(iq, "sample_responses", "sampling")  # --gather-for-generation off: no unwrap
        # scoring is superior_targets; what follows it until the next one (log π_θ, the loss, backward, the
        # optimizer's step) is training
        self.wrap(iq, "superior_targets", "scoring", leave="training")
        for name in ("save_checkpoint", "save_policy"):
            self.wrap(iq, name, "saving")
        return self

    def __exit__(self, *exc):
        if self.phase is not None:
            self.mark(None)
        for owner, name, original in reversed(self.saved):
            setattr(owner, name, original)
        self.meter.close()
        self.peaks.pop(None, None)
        return False


def child_env(env=None):
    """The environment of a measured child process: glibc malloc gives large freed blocks back to the OS
    (mmap above 64 KiB, two arenas), so that resident memory follows what is allocated rather than what malloc
    keeps cached; and no launcher variables, so that iqstar.py is a world of one."""
    return clean_env(env, MALLOC_ARENA_MAX="2", MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
