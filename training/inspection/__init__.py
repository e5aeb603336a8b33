"""Look at a run: playground (generate from checkpoints), plots, evaluation and a run report.

    genesis playground runs/genesis-1b                      # every checkpoint of the run, in a browser
    genesis plot runs/a runs/b/metrics.jsonl run-x.wandb --output curves.png
    genesis eval out/genesis-1b-40k --data runs/data        # val loss + bits per byte per source
    genesis report runs/genesis-1b --output runs/genesis-1b/report/README.md

Nothing here writes into a run's folder unless asked to (report --output).
"""


class InspectError(ValueError):
    """Bad input to an inspection tool; the message names the file (and the line or byte)."""
