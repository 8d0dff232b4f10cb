"""`trace-eval`: run any agent over a dataset split served by a TRACE env server and score it.

- `evaluator.agents`: the `Agent` seam (one `run` method) and its registry (`openai-tools`, `react-text`,
  `policy`, `oracle`, `first-hit`).
- `evaluator.runner`: bounded-concurrency runs with resume; one jsonl row per question, errors recorded per
  question, never dropped.
- `evaluator.report`: the summary table by dataset and hop count (markdown + csv).
- `evaluator.cli`: the thin command-line entry point.
"""
