"""The one default setting that the CLI and the dashboard share.

Two experiments share an original (and so can be paired window by window) only when they were
evaluated on the same setting; two analyses share a cache entry only when they calibrated on the
same windows. Every default of a calibration, a drop grid, an evaluation or a speed measurement
that the CLI's flags and the dashboard's widgets offer is read from here, so that an experiment
run from either face with the defaults meets the other's original, and ``plan`` reads the analysis
``analyze`` stored.
"""

from __future__ import annotations

# calibration (analyze, plan, the dashboard's sidebar): the validation split, seeded random windows
CALIB_SOURCE = "demo:all"
CALIB_SAMPLES = 64
CALIB_SEQ_LEN = 256

# the single-expert-drop grid (grid, the Drop grid page): the test split
GRID_SAMPLES = 16
GRID_SEQ_LEN = 256

# evaluation (eval, prune --ppl, the Run page): perplexity windows from each domain's start, lm-eval
# tasks (none unless asked for) with a sample limit per task, speed as the median of repeats
EVAL_SOURCE = "demo:all"
EVAL_SAMPLES = 96
EVAL_SEQ_LEN = 256
EVAL_TASKS: tuple[str, ...] = ()
TASK_LIMIT = 100.0  # a float, as the flag and the widget give it (the spec stores it as given)
SPEED_REPEATS = 5
PROMPT_TOKENS = 128
NEW_TOKENS = 32
