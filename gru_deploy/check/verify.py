"""The int8 gate's inputs (check.compare.int8_gate): the same at `package` and at a bundle's
`verify`. (An export folder's `verify` is check.module_parity.verify_export.)"""

from __future__ import annotations

import numpy as np

from gru_deploy.check.grid import make_input
from gru_deploy.spec import INPUT_NAME, STATE_IN


# The int8 gate's inputs (compare.int8_gate): a few hundred sequences up to the grid's longest,
# (batch, seq) each: 64 samples at 1, 7, 25 and 100 steps, 16 at 1,000 and 8 at 2,048.
INT8_GATE_CASES = ((64, 1), (64, 7), (64, 25), (64, 100), (16, 1000), (8, 2048))


def int8_gate_feeds(input_size: int, state_shape: tuple[int, ...] | None = None,
                    seed: int = 5000) -> list[dict[str, np.ndarray]]:
    """The int8 gate's feeds: x per INT8_GATE_CASES (make_input), plus a state uniform in
    [-1, 1] where the model takes one (`state_shape` without the batch axis); fixed seeds, so a
    bundle's verify regenerates exactly the inputs its recorded reference answered."""
    feeds = []
    for index, (batch, seq) in enumerate(INT8_GATE_CASES):
        feed = {INPUT_NAME: make_input(batch, seq, input_size, seed + index)}
        if state_shape is not None:
            rng = np.random.default_rng(seed + 100 + index)
            feed[STATE_IN] = rng.uniform(-1, 1, size=(batch, *state_shape)).astype(np.float32)
        feeds.append(feed)
    return feeds
