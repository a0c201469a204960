"""Autotuning: search spaces with static pruning (`space`), trial execution in a worker
process (`trial`), Optuna studies that write the tuning DB (`tuner`), and the `tune`/`db`
CLI subcommands (`commands`). Imports stay light here: `trial` workers load this package."""
