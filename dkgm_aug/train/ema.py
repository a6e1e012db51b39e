"""An exponential moving average of a network's weights, which the trainer saves and returns."""
import copy
from contextlib import contextmanager

import torch


class EMA:
    """The EMA of ``net``'s parameters; its buffers (BatchNorm statistics) are copied as they are.
    ``update(step)`` uses ``min(decay, (1 + step) / (10 + step))``: a warm-up, so that short runs
    still get an average of their recent weights rather than of their initial ones."""

    def __init__(self, net: torch.nn.Module, decay: float):
        self.net, self.decay = net, decay
        self.average = copy.deepcopy(net).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for pe, p in zip(self.average.parameters(), self.net.parameters()):
            pe.lerp_(p, 1 - decay)
        for be, b in zip(self.average.buffers(), self.net.buffers()):
            be.copy_(b)

    def state_dict(self) -> dict:
        return self.average.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.average.load_state_dict(state)

    def copy_to_net(self) -> None:
        self.net.load_state_dict(self.average.state_dict())

    @contextmanager
    def swapped(self):
        """Run with the EMA weights in ``net``, restoring the live weights after."""
        live = copy.deepcopy(self.net.state_dict())
        self.copy_to_net()
        try:
            yield
        finally:
            self.net.load_state_dict(live)
