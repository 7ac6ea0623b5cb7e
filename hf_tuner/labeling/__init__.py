"""The human in the loop: `hf-tuner label`, a local page where a person ranks model outputs (preference data
for the reward model) or judges base vs tuned answers blind (human evaluation for the run's report).

- items.py:   what the page shows, read from candidate files, A/B pair files and run folders
- store.py:   the append-only JSONL the judgments go to (one write + fsync each), read back to resume
- session.py: one labelling round: item order, hidden layouts, validation, idempotent submits
- app.py:     the Starlette app and `serve` (uvicorn on 127.0.0.1)
- candidates.py: generating candidates with a model (`hf-tuner generate`, or on the fly for `label rank`)
"""
