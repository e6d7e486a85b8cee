"""Console metric logging in the official format (``SmoothedValue``, ``MetricLogger``).

Values may be passed as tensors; unlike the official logger they are not read back (``.item()``)
when updated but only when printed, so logging every N iterations costs one host sync per N steps.
"""
import datetime
import time
from collections import defaultdict, deque

import torch

from ibot.utils.distributed import all_reduce_sum, is_dist_avail_and_initialized


def _to_float(value):
    if isinstance(value, torch.Tensor):
        return value.item()
    return float(value)


class SmoothedValue:
    """Track a series of values: window median/average (last ``window_size``) and global average."""

    def __init__(self, window_size=20, fmt=None):
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt or "{median:.6f} ({global_avg:.6f})"
        self._pending = []  # tensors not yet read back from the device

    def update(self, value, n=1):
        if isinstance(value, torch.Tensor):
            self._pending.append((value.detach(), n))
            return
        self._add(float(value), n)

    def _add(self, value, n):
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def flush(self):
        """Read pending device values back to the host (one sync for all of them)."""
        if not self._pending:
            return
        values = torch.stack([v.float().reshape(()) for v, _ in self._pending]).cpu().tolist()
        for value, (_, n) in zip(values, self._pending):
            self._add(value, n)
        self._pending = []

    def synchronize_between_processes(self):
        """All-reduce count and total over ranks (the window is not synchronised)."""
        self.flush()
        if not is_dist_avail_and_initialized():
            return
        t = torch.tensor([self.count, self.total], dtype=torch.float64,
                         device="cuda" if torch.cuda.is_available() else "cpu")
        all_reduce_sum(t)
        self.count, self.total = int(t[0].item()), t[1].item()

    @property
    def median(self):
        self.flush()
        return torch.tensor(list(self.deque)).median().item()

    @property
    def avg(self):
        self.flush()
        return torch.tensor(list(self.deque), dtype=torch.float32).mean().item()

    @property
    def global_avg(self):
        self.flush()
        return self.total / max(self.count, 1)

    @property
    def max(self):
        self.flush()
        return max(self.deque)

    @property
    def value(self):
        self.flush()
        return self.deque[-1]

    def __str__(self):
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                               max=self.max, value=self.value)


class MetricLogger:
    """A dict of ``SmoothedValue`` meters printed as ``name: median (global_avg)`` joined by ``delimiter``."""

    def __init__(self, delimiter="\t"):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs):
        for name, value in kwargs.items():
            if value is None:
                continue
            if not isinstance(value, (torch.Tensor, float, int)):
                raise TypeError(f"meter {name!r} got a {type(value).__name__}; expected a number or tensor")
            self.meters[name].update(value)

    def __getattr__(self, attr):
        if attr in self.__dict__.get("meters", {}):
            return self.meters[attr]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{attr}'")

    def __str__(self):
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self):
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def log_every(self, iterable, print_freq, header=None):
        """Yield from ``iterable``; every ``print_freq`` items print progress, eta, meters and timings."""
        header = header or ""
        start_time = end = time.time()
        iter_time, data_time = SmoothedValue(fmt="{avg:.6f}"), SmoothedValue(fmt="{avg:.6f}")
        n = len(iterable)
        space_fmt = ":" + str(len(str(n))) + "d"
        fields = [header, "[{0" + space_fmt + "}/{1}]", "eta: {eta}", "{meters}", "time: {time}", "data: {data}"]
        if torch.cuda.is_available():
            fields.append("max mem: {memory:.0f}")
        log_msg = self.delimiter.join(fields)
        for i, obj in enumerate(iterable):
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == n - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (n - i)))
                extra = {}
                if torch.cuda.is_available():
                    extra["memory"] = torch.cuda.max_memory_allocated() / 1024.0 ** 2
                print(log_msg.format(i, n, eta=str(eta), meters=str(self), time=str(iter_time),
                                     data=str(data_time), **extra), flush=True)
            end = time.time()
        total = time.time() - start_time
        print(f"{header} Total time: {datetime.timedelta(seconds=int(total))} ({total / max(n, 1):.6f} s / it)")
