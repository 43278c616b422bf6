"""The file of --json PATH: every measurement, with the figures and verdicts printed from them.

Its top-level keys:

- "header": the machine and the libraries (environment.describe_machine) and
  the run's settings: model, data, thread budget, ranks, rounds, ...;
- "gemm": {"rounds": [each round's measurements], "limit_flops": the median limit};
- "rows": {"KEY@BATCH": {"label", "rates" (samples/s of every repetition),
  "runs" (each launch's worker result), "summary" (median, min, max, all),
  "model", "flops_per_sample" (of one training step), "vs_pytorch" ({"row":
  its PyTorch row, "ratio": of the medians} or null), "of_gemm_limit" (a
  fraction of gemm.limit_flops)}};
- "time_to_accuracy": time_to_accuracy.measure's result, or null where skipped;
- "targets": every verdict (targets.Verdict), the MLP's, the CNN's, then streamed shards';
- "recipe": accuracy_runs.recipe_runs's result (a named model's time to its
  target accuracy, ddptrain's runs and PyTorch's), or null where skipped;
- "stream_reads": the file read from the disk plainly and by ddptrain's stream
  (streaming.measure_reads: MiB/s of each round), or null where skipped.
"""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path, header, gemm_limit, results, tta, verdicts, reads=None, recipe=None):
    document = {"header": header, "gemm": gemm_limit.as_json(),
                "rows": {f"{key}@{batch}": entry for (key, batch), entry in results.items()},
                "time_to_accuracy": tta, "targets": [verdict.as_json() for verdict in verdicts],
                "stream_reads": reads, "recipe": recipe}
    Path(path).write_text(json.dumps(document, indent=1, default=str))
