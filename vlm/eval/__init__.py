"""Evaluation of checkpoints on held-out data: `vlm eval` (cli.py), metrics, engines and suite adapters.

See vlm/eval/README.md.
"""
