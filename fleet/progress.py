"""Progress bars for long CLI work: one per stage of a training or a benchmark."""

from __future__ import annotations

from typing import Any


class StageBars:
    """A progress bar per training stage, the previous one closed when the next begins:
    the ``on_step(stage, step, total, loss)`` of ``workers.digits``, ``workers.distill`` and
    ``workers.lora``, and the stages of ``fleet bench models``."""

    def __init__(self) -> None:
        self.bars: dict[str, Any] = {}

    def __call__(self, stage: str, step: int, total: int, loss: float) -> None:
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            self.close()
            bar = self.bars[stage] = tqdm(total=total, desc=stage, unit="step", dynamic_ncols=True)
        bar.update(1)
        if loss and (step % 25 == 0 or step == total):
            bar.set_postfix(loss=f"{loss:.4f}")

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
