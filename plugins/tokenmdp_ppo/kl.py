"""PPO's KL coefficient ``beta``: fixed, or moved towards a KL target (Ziegler et al. 2019)."""

from __future__ import annotations


class KLController:
    """The KL coefficient beta. ``adaptive`` moves it towards a KL target (Ziegler et al.
    2019, eq. 2); otherwise it stays at its initial value."""

    def __init__(self, init: float, adaptive: bool, target: float, horizon: float):
        self.value, self.adaptive, self.target, self.horizon = init, adaptive, target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        if self.adaptive:
            error = min(max((kl - self.target) / self.target, -0.2), 0.2)
            self.value *= 1 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]
