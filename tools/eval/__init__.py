"""`trace-eval`: run any agent over a dataset split served by a TRACE env server and score it.

- `tools.eval.agents`: the `Agent` seam (one `run` method) and its registry (`openai-tools`, `react-text`,
  `policy`, `oracle`, `first-hit`).
- `tools.eval.runner`: bounded-concurrency runs with resume; one jsonl row per question, errors recorded per
  question, never dropped.
- `tools.eval.report`: the summary table by dataset and hop count (markdown + csv).
- `tools.eval.cli`: the thin command-line entry point.
"""
